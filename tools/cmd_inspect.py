"""`logitcache inspect DIR`: the manifest in words, then a few decoded examples."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from logitcache.cache.reader import open_dataset
from logitcache.cache.stats import describe
from logitcache.cache.tokenizer import load_local_tokenizer
from logitcache.tools.cli import count

HELP = "describe a dataset's manifest and decode a few examples"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help="dataset folder or fsspec URL")
    p.add_argument("-n", "--examples", type=count, default=2, help="examples to decode (default 2)")
    p.add_argument("--positions", type=count, default=4, help="positions to show per example")
    p.add_argument("--tokenizer", help="tokenizer folder: show tokens as text")


def run(args: argparse.Namespace) -> int:
    ds = open_dataset(args.dataset)
    print(describe(ds))
    tok = None
    if args.tokenizer:
        tok = load_local_tokenizer(
            args.tokenizer,
            f"--tokenizer {args.tokenizer}",
            "give the folder of the dataset's tokenizer (the teacher's)",
        )

    def text(ids: Any) -> str:
        ids = [int(i) for i in np.atleast_1d(ids)]
        return repr(tok.decode(ids)) if tok is not None else str(ids)

    for n, ex in enumerate(ds.iter_examples()):
        if n >= args.examples:
            break
        print(
            f"\nexample {ex.id!r}: prompt {len(ex.prompt_ids)} tokens, response {ex.num_positions}"
        )
        print(f"  prompt   {text(ex.prompt_ids)[:300]}")
        print(f"  response {text(ex.response_ids)[:300]}")
        for j in range(min(args.positions, ex.num_positions)):
            t = ex.targets
            head = f"  [{j}] next {text(ex.response_ids[j])}:"
            if hasattr(t, "logprobs"):
                kept = t.ids.shape[1] if t.counts is None else int(t.counts[j])  # rest: padding
                order = np.argsort(-t.logprobs[j][:kept])[:5]
                tops = ", ".join(
                    f"{text(t.ids[j][o])} {np.exp(t.logprobs[j][o]):.3f}" for o in order
                )
                k = f" (k={kept})" if t.counts is not None else ""
                line = f"{head} {tops}{k}; tail {np.exp(t.tail_logmass[j]):.3f}"
                if t.tail_draws is not None:
                    line += f", {_draws(t.tail_draws, j, text)}"
                print(line)
            else:
                print(f"{head} {_draws(t, j, text)}")
    return 0


def _draws(t: Any, j: int, text: Any) -> str:
    """Position ``j``'s draws of :class:`Sampled` ``t``: their number, and the 5 most drawn."""
    s0 = int(t.nunique[:j].sum())
    ids, counts = t.ids[s0 : s0 + t.nunique[j]], t.counts[s0 : s0 + t.nunique[j]]
    order = np.argsort(-counts, kind="stable")[:5]
    shown = ", ".join(f"{text(ids[o])}×{counts[o]}" for o in order)
    more = ", …" if len(ids) > 5 else ""
    return f"{int(counts.sum())} draws: {shown}{more}" if len(ids) else "no draws"
