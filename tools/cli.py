"""The ``logitcache`` command line: one subcommand per module ``tools/cmd_<name>.py``.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) ->
int``. Modules are imported only when their command runs, so ``logitcache verify`` never pays
for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from logitcache.cache.errors import LogitCacheError

COMMANDS: dict[str, str] = {
    "build": "capture teacher targets over full-context prompts into a logit dataset",
    "train": "train a student from a logit dataset (streams shards; never loads the teacher)",
    "eval": "score students on a held-out logit dataset (KL, CE, top-1, answers) into a report",
    "demo": "context distillation end to end on the real SmolLM2 teacher",
    "verify": "check checksums, schema, counts and id uniqueness of a dataset",
    "inspect": "describe a dataset's manifest and decode a few examples",
    "stats": "top-k mass coverage, teacher entropy and lengths of a dataset",
    "merge": "combine compatible datasets into one",
    "finalize": "fold writer journals (_parts/) into manifest.json",
    "export": "write a dataset as plain Parquet/Arrow columns (ids and log-probs per position)",
    "import": "import top-k ids and log-probs (or logits) per position from Parquet, Arrow or JSONL",
}


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"logitcache.tools.cmd_{name}")


def count(text: str) -> int:
    """argparse type of a flag that counts something: a whole number ≥ 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 0, got {text!r}")
    return value


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="logitcache",
        description="Offline teacher-logit cache and streaming student trainer for distillation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Only the chosen command's module is imported (and only its arguments are defined).
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(command_parser=p)
        if name == chosen:
            try:
                _module(name).add_arguments(p)
            except ModuleNotFoundError as e:
                if e.name != f"logitcache.tools.cmd_{name}":
                    raise
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported with the command's own usage line, not the top level's
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        module = _module(args.command)
    except ModuleNotFoundError as e:
        if e.name != f"logitcache.tools.cmd_{args.command}":
            raise
        print(f"logitcache {args.command}: not built yet", file=sys.stderr)
        return 2
    try:
        return int(module.run(args) or 0)
    except LogitCacheError as e:
        print(f"logitcache {args.command}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader of our output went away (`logitcache inspect DS | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    except KeyboardInterrupt:
        print(
            f"logitcache {args.command}: interrupted; rerun the same command to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
