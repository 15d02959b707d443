"""`logitcache finalize DIR`: fold writer journals into manifest.json (after multi-writer jobs)."""

from __future__ import annotations

import argparse

from logitcache.cache.manifest import finalize
from logitcache.cache.storage import Location

HELP = "fold writer journals (_parts/) into manifest.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help="dataset folder or fsspec URL")


def run(args: argparse.Namespace) -> int:
    m = finalize(Location(args.dataset))
    print(
        f"finalized {args.dataset}: {len(m.shards)} shards, {m.num_examples} examples, "
        f"{m.num_positions} positions"
    )
    return 0
