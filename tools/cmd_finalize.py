"""`logitcache finalize DIR`: fold writer journals into manifest.json (after multi-writer jobs)."""

from __future__ import annotations

import argparse

from logitcache.cache.format import sizes
from logitcache.cache.manifest import finalize
from logitcache.cache.storage import Location

HELP = "fold writer journals (_parts/) into manifest.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help="dataset folder or fsspec URL")
    p.add_argument(
        "--partial",
        action="store_true",
        help="publish what is committed even though a writer has not finished its share or a "
        "job-array part has not run (without it finalize refuses and says what to rerun)",
    )


def run(args: argparse.Namespace) -> int:
    m = finalize(Location(args.dataset), partial=args.partial)
    print(
        f"finalized {args.dataset}{' (partial)' if args.partial else ''}: "
        f"{sizes(len(m.shards), m.num_examples, m.num_positions)}"
    )
    return 0
