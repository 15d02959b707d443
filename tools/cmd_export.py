"""`logitcache export DIR OUT --format parquet|arrow`: plain columns any Arrow tool reads."""

from __future__ import annotations

import argparse

from logitcache.cache.export import EXPORT_FORMATS, export_dataset

HELP = "write a dataset as plain Parquet/Arrow columns (ids and log-probs per position)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help="dataset folder or fsspec URL")
    p.add_argument("out", help="new folder for the export (must not exist or be empty)")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="parquet", help="file format")


def run(args: argparse.Namespace) -> int:
    r = export_dataset(args.dataset, args.out, args.format)
    print(
        f"exported {args.dataset} to {args.out}: {len(r.files)} {args.format} files, "
        f"{r.examples} examples, {r.positions} positions, {r.bytes} bytes"
    )
    return 0
