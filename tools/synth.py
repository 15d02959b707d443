"""Synthetic datasets, and a snapshot of what a reader returns.

Shared by the reliability trials (tools/reliability/) and the test suite (tests/cache/synth.py,
tests/reliability/), as tools/tiny.py shares its tiny tokenizer and models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from logitcache.cache.format import DatasetInfo, Example, Sampled, TargetSpec, TopK
from logitcache.cache.reader import open_dataset
from logitcache.cache.writer import DatasetWriter

# --------------------------------------------------------------------------- synthetic data


def synth_info(
    kind: str = "topk",
    *,
    k: int = 8,
    n: int = 16,
    codec: str = "u8",
    vocab: int = 1000,
    teacher: str = "synthetic",
    tail_draws: int = 0,
) -> DatasetInfo:
    """The description of a synthetic dataset (also the test suite's, tests/cache/synth.py):
    ``n`` draws for sampled targets, top-``k`` with ``tail_draws`` tail draws for top-k."""
    return DatasetInfo(
        vocab_size=vocab,
        tokenizer_fingerprint="sha256:" + "ab" * 32,
        targets=TargetSpec(
            kind,  # type: ignore[arg-type]
            k=k if kind == "topk" else 0,
            n=n if kind == "sampled" else tail_draws,
            codec=codec,  # type: ignore[arg-type]
        ),
        teacher={"name_or_path": teacher, "revision": None, "config_hash": "0" * 8},
        capture={"temperature": 1.0, "mode": "score"},
    )


def synth_examples(
    info: DatasetInfo, count: int, *, max_len: int = 24, seed: int = 0, prefix: str = "ex"
) -> list[Example]:
    """Peaked random targets, cheap enough for 10^5 examples (no full-vocabulary softmax)."""
    rng = np.random.default_rng(seed)
    spec, V = info.targets, info.vocab_size
    out = []
    for i in range(count):
        P = int(rng.integers(1, max_len + 1))
        targets: TopK | Sampled
        if spec.kind == "topk":
            k = spec.k
            gaps = rng.integers(1, max(2, V // (2 * k)), size=(P, k))  # distinct ascending ids
            ids = rng.integers(0, V // 2, size=(P, 1)) + np.cumsum(gaps, axis=1)
            logits = rng.normal(size=(P, k + 1)) * 2.0
            logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)  # k ids + tail
            targets = TopK(ids, logp[:, :k].astype(np.float32), logp[:, k].astype(np.float32))
        else:
            nunique = rng.integers(1, min(spec.n, 8) + 1, size=P)
            ids = np.concatenate([np.sort(rng.choice(V, u, replace=False)) for u in nunique])
            counts = np.concatenate(
                [1 + rng.multinomial(spec.n - u, np.full(u, 1.0 / u)) for u in nunique]
            )
            targets = Sampled(ids, counts, nunique)
        prompt = rng.integers(0, V, size=int(rng.integers(1, 9)))
        out.append(Example(f"{prefix}{i}", prompt, rng.integers(0, V, size=P), targets))
    return out


def write_synth(
    url: str | Path,
    info: DatasetInfo,
    examples: list[Example],
    *,
    shard_positions: int,
    storage_options: dict[str, Any] | None = None,
) -> None:
    with DatasetWriter(
        url, info, shard_positions=shard_positions, batch_rows=8, storage_options=storage_options
    ) as w:
        for ex in examples:
            w.add(ex)


def snapshot(url: str | Path, **open_kwargs: Any) -> list[tuple[Any, ...]]:
    """Every decoded example as bytes, in stored order: equal snapshots are bit-for-bit equal."""
    rows = []
    for ex in open_dataset(url, **open_kwargs).iter_examples():
        t = ex.targets
        draws = t.tail_draws if isinstance(t, TopK) else t
        arrays = (t.ids, t.logprobs, t.tail_logmass) if isinstance(t, TopK) else ()
        if draws is not None:
            arrays += (draws.ids, draws.counts, draws.nunique)
        rows.append(
            (
                ex.id,
                *(
                    np.ascontiguousarray(a).tobytes()
                    for a in (ex.prompt_ids, ex.response_ids, *arrays)
                ),
            )
        )
    return rows
