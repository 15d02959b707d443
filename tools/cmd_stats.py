"""`logitcache stats DIR [--plot FILE.png]`: coverage, entropy and lengths of a dataset."""

from __future__ import annotations

import argparse

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
        help="positions to sample for the per-position statistics (default 1M)",
    )


def run(args: argparse.Namespace) -> int:
    ds = open_dataset(args.dataset)
    s = collect_stats(ds, args.max_positions)
    print(repr(ds))
    print(format_stats(s))
    if args.plot:
        plot_stats(s, args.plot, title=str(args.dataset))
        print(f"wrote {args.plot}")
    return 0
