"""`logitcache verify DIR`: every problem with a dataset, each naming shard, field, expected, found."""

from __future__ import annotations

import argparse

from logitcache.cache.format import sizes
from logitcache.cache.verify import verify_dataset

HELP = "check checksums, schema, counts and id uniqueness of a dataset"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help="dataset folder or fsspec URL")


def run(args: argparse.Namespace) -> int:
    report = verify_dataset(args.dataset)
    for w in report.warnings:
        print(f"warning: {w}")
    for problem in report.problems:
        print(f"problem: {problem}")
    if report.ok:
        print(f"ok: {sizes(report.shards, report.examples, report.positions)}")
        return 0
    print(f"FAILED: {len(report.problems)} problem(s) in {args.dataset}")
    return 1
