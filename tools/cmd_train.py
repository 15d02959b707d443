"""`logitcache train`: train a student from a logit dataset (see docs/TRAINING.md)."""

from __future__ import annotations

import argparse
from dataclasses import fields

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
    from logitcache.train.config import SECTIONS, describe_field

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
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} ({cls.__doc__})")
        for f in fields(cls):
            group.add_argument(
                f"--{section}.{f.name}",
                dest=f"field:{section}.{f.name}",
                metavar="V",
                help=describe_field(section, f.name).replace("%", "%%"),
            )


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
    summary = train(cfg, resume=args.resume)
    if summary["finished"]:
        print(f"done: {summary['steps']} steps; student saved to {summary['output']}/final")
    else:
        print(
            f"stopped at step {summary['step']} of {summary['steps']}; rerun with --resume to continue"
        )
    return 0
