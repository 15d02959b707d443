"""`logitcache import SRC... OUT --tokenizer DIR`: top-k targets in the plain layout, in.

The flags besides SRC and OUT are generated from
:class:`logitcache.cache.importer.ImportConfig`. Examples:

    logitcache import export/data/*.parquet ds/ --tokenizer TOK --tail-column tail_logmass
    logitcache import logits.jsonl ds/ --tokenizer TOK --input-ids-column input_ids \\
        --ids-column token_ids --values-column logits --values logits --on-error skip
"""

from __future__ import annotations

import argparse

from logitcache.cache.importer import ImportConfig, import_plain, load_import_config
from logitcache.cache.settings import add_flags, flag_sources

HELP = "import top-k ids and log-probs (or logits) per position from Parquet, Arrow or JSONL"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", nargs="+", help="*.parquet, *.arrow, *.jsonl(.zst), folders or globs")
    p.add_argument("out", help="new dataset folder (must not exist or be empty)")
    add_flags(p, ImportConfig, dotted=False)


def run(args: argparse.Namespace) -> int:
    cfg = load_import_config(flag_sources(args, ImportConfig))
    m = import_plain(args.src, args.out, cfg)
    t = m.info.targets
    print(
        f"imported {m.num_examples} examples, {m.num_positions} positions ({t.label}) into "
        f"{args.out}; {m.extra.get('skipped_count', 0)} row(s) skipped; tail: "
        f"{m.info.capture['imported']['tail']}"
    )
    return 0
