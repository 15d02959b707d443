"""`logitcache train`: train a student from a logit dataset (see docs/TRAINING.md)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

HELP = "train a student from a logit dataset (streams shards; never loads the teacher)"

EXAMPLE = """\
examples:
  logitcache train --data.train ./ds --data.eval ./ds-eval --model.path ./student \\
      --train.output runs/a --train.steps 1000 --optim.lr 3e-4
  logitcache train --config run.yaml --set optim.lr=3e-4 --plot runs/a/loss.png
  logitcache train --config runs/a/resolved_config.yaml --resume
  torchrun --nproc-per-node 2 -m logitcache.tools.cli train --config run.yaml
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Only the config module (no torch) is imported to build --help.
    from logitcache.cache.settings import add_flags
    from logitcache.train.config import Config

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLE
    parser.add_argument(
        "--config", metavar="FILE", help="YAML or JSON file of section: {field: value}"
    )
    parser.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override one field, e.g. --set optim.lr=3e-4 (repeatable)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in train.output"
    )
    parser.add_argument(
        "--plot", metavar="FILE.png", help="write loss curves here at the end (= log.plot)"
    )
    add_flags(parser, Config, dotted=True)


def overrides_from_args(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(key, value, where) in the order: --set, then the mirrored flags, then --plot."""
    from logitcache.cache.errors import InputError

    out = []
    bad = []
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            bad.append(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=3e-4")
            continue
        out.append((key.strip(), value, f"--set {key.strip()}"))
    for name, value in vars(args).items():
        if name.startswith("field:") and value is not None:
            key = name.removeprefix("field:")
            out.append((key, value, f"--{key}"))
    if args.plot:
        out.append(("log.plot", args.plot, "--plot"))
    if bad:
        raise InputError("; ".join(bad))
    return out


def run(args: argparse.Namespace) -> int:
    from logitcache.train.config import load_config
    from logitcache.train.trainer import train

    cfg = load_config(args.config, overrides_from_args(args))
    try:
        summary = train(cfg, resume=args.resume)
    except KeyboardInterrupt:
        print(f"logitcache train: interrupted; {next_step(cfg.train.output)}", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if summary["finished"]:
        print(f"done: {summary['steps']} steps; student saved to {summary['output']}/final")
    else:
        print(
            f"stopped at step {summary['step']} of {summary['steps']} (train.stop_after); "
            + next_step(summary["output"])
        )
    return 0


def next_step(output: str) -> str:
    """What to run to continue the run in ``output``: a command to type as it is."""
    from logitcache.train.trainer import CONFIG_NAME

    config = Path(output) / CONFIG_NAME
    if not config.exists():  # stopped before the run was set up: it starts afresh
        return "nothing was saved yet; rerun the same command to start the run"
    return f"to continue, run: {resume_command(str(config))}"


def resume_command(config: str) -> str:
    """The command that resumes the run whose saved config is ``config``, launched as this
    process was (torchrun's environment tells how many processes on how many nodes)."""
    args = f"train --config {shlex.quote(config)} --resume"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if world == 1:
        return f"logitcache {args}"
    if per_node == world:
        return f"torchrun --standalone --nproc-per-node {world} -m logitcache.tools.cli {args}"
    # Several nodes: only the launcher knows the rendezvous; its options stay as they were.
    return (
        f"on each of the {world // per_node} nodes, the same torchrun launch as before with "
        f"-m logitcache.tools.cli {args}"
    )
