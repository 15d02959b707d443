"""`logitcache stats DIR [--plot FILE.png]`: coverage, entropy and lengths of a dataset."""

from __future__ import annotations

import argparse

from logitcache.cache.errors import InputError
from logitcache.cache.format import counted
from logitcache.cache.paths import plot_problem
from logitcache.cache.reader import open_dataset
from logitcache.cache.stats import collect_stats, format_stats, plot_stats

HELP = "top-k mass coverage, teacher entropy and lengths of a dataset"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help="dataset folder or fsspec URL")
    p.add_argument("--plot", metavar="FILE.png", help="write histograms to this PNG")
    p.add_argument(
        "--max-positions",
        type=int,
        default=1_000_000,
        metavar="N",
        help="positions to sample for the per-position statistics (default 1M; at least 1)",
    )


def run(args: argparse.Namespace) -> int:
    problems = []
    if args.max_positions < 1:
        problems.append(
            f"--max-positions {args.max_positions}: must be at least 1 (the positions sampled "
            "for coverage, entropy and ids per position); e.g. --max-positions 1000000"
        )
    if args.plot and (problem := plot_problem(args.plot, f"--plot {args.plot}")):
        problems.append(problem)
    if problems:
        raise InputError("; ".join(problems))
    ds = open_dataset(args.dataset)
    s = collect_stats(ds, args.max_positions)
    print(
        f"{ds.loc}: {counted(ds.num_examples, 'example')}, "
        f"{counted(ds.num_positions, 'position')}, {counted(len(ds.shards), 'shard')}, "
        f"{ds.info.targets.label}"
    )
    print(format_stats(s))
    if args.plot:
        plot_stats(s, args.plot, title=str(args.dataset))
        print(f"wrote {args.plot}")
    return 0
