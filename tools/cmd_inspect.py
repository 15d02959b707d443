"""`logitcache inspect DIR`: the manifest in words, then a few decoded examples."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from logitcache.cache.reader import LogitDataset, open_dataset

HELP = "describe a dataset's manifest and decode a few examples"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help="dataset folder or fsspec URL")
    p.add_argument("-n", "--examples", type=int, default=2, help="examples to decode (default 2)")
    p.add_argument("--positions", type=int, default=4, help="positions to show per example")
    p.add_argument("--tokenizer", help="tokenizer folder: show tokens as text")


def describe(ds: LogitDataset) -> str:
    m, info = ds.manifest, ds.info
    t = info.targets
    targets = (
        f"top-{t.k} ids + log-probs ({t.codec}) + tail mass"
        + (f" + {t.n} {t.sampling} draws from the tail (ids + counts)" if t.n else "")
        if t.kind == "topk"
        else f"{t.n} {t.sampling} sampled draws per position (ids + counts)"
    )
    cap = info.capture
    lines = [
        f"dataset      {ds.loc}",
        f"teacher      {info.teacher.get('name_or_path')} (revision {info.teacher.get('revision')}, "
        f"config {str(info.teacher.get('config_hash'))[:12]})",
        f"tokenizer    {info.tokenizer_fingerprint[:23]}…, vocab {info.vocab_size}",
        f"targets      {targets}; ids as {info.id_bytes} byte plane(s) of sorted gaps",
        f"capture      temperature {cap.get('temperature')}, mode {cap.get('mode')}",
        f"size         {m.num_examples} examples, {m.num_positions} positions, {len(m.shards)} shards, "
        f"{m.num_bytes / 1e6:.2f} MB ({m.num_bytes / max(m.num_positions, 1):.1f} B/position)",
    ]
    templates = cap.get("templates") or {}
    for view in ("teacher", "student"):
        if view in templates:
            text = str(templates[view]).replace("\n", "\\n")
            lines.append(f"{view:<12} {text[:150]}{'…' if len(text) > 150 else ''}")
    if m.extra:
        lines.append(f"extra        {', '.join(f'{k}={_short(v)}' for k, v in m.extra.items())}")
    return "\n".join(lines)


def _short(v: Any) -> str:
    return f"[{len(v)} items]" if isinstance(v, list) else str(v)


def run(args: argparse.Namespace) -> int:
    ds = open_dataset(args.dataset)
    print(describe(ds))
    tok = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)

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
            if hasattr(t, "logprobs"):
                order = np.argsort(-t.logprobs[j])[:5]
                tops = ", ".join(
                    f"{text(t.ids[j][o])} {np.exp(t.logprobs[j][o]):.3f}" for o in order
                )
                print(
                    f"  [{j}] next {text(ex.response_ids[j])}: {tops}; tail {np.exp(t.tail_logmass[j]):.3f}"
                )
            else:
                s0 = int(t.nunique[:j].sum())
                ids, counts = t.ids[s0 : s0 + t.nunique[j]], t.counts[s0 : s0 + t.nunique[j]]
                order = np.argsort(-counts)[:5]
                tops = ", ".join(f"{text(ids[o])}×{counts[o]}" for o in order)
                print(f"  [{j}] next {text(ex.response_ids[j])}: {tops}")
    return 0
