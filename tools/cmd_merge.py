"""`logitcache merge OUT DIR...`: combine compatible datasets, refusing otherwise with the reason."""

from __future__ import annotations

import argparse

from logitcache.cache.format import sizes
from logitcache.cache.merge import merge_datasets

HELP = "combine compatible datasets into one"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="new dataset folder or fsspec URL")
    p.add_argument("inputs", nargs="+", help="datasets to combine")
    p.add_argument(
        "--allow-different-teachers",
        action="store_true",
        help="merge datasets captured from different teachers (same tokenizer)",
    )


def run(args: argparse.Namespace) -> int:
    m = merge_datasets(
        args.out, args.inputs, allow_different_teachers=args.allow_different_teachers
    )
    print(
        f"merged {len(args.inputs)} datasets into {args.out}: "
        f"{sizes(len(m.shards), m.num_examples, m.num_positions)}"
    )
    return 0
