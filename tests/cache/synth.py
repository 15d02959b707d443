"""Synthetic examples with realistic (peaked, long-tailed) teacher distributions."""

from __future__ import annotations

from functools import partial

import numpy as np

from logitcache.cache.codecs import tail_logmass
from logitcache.cache.format import DatasetInfo, Example, Sampled, TopK
from logitcache.tools.synth import synth_info

make_info = partial(synth_info, teacher="tiny-teacher")
"""The reliability trials' synthetic dataset description, under the test teacher's name."""


def full_logprobs(rng: np.random.Generator, positions: int, vocab: int) -> np.ndarray:
    """Zipf-like logits, so a few ids hold most of the mass, as with real teachers."""
    logits = rng.normal(size=(positions, vocab)) * 2.0 - 1.5 * np.log1p(rng.permutation(vocab))
    return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)


def draw(rng: np.random.Generator, weights: np.ndarray, n: int) -> Sampled:
    """``n`` draws per row of (P, V) non-negative ``weights`` (normalised per row), as unique
    ids and counts; a row of zeros gets no draws."""
    ids_l, counts_l, nun = [], [], []
    for w in weights:
        total = w.sum()
        u, c = (np.unique(rng.choice(len(w), size=n, p=w / total), return_counts=True)
                if total > 0 else (np.zeros(0, np.int64), np.zeros(0, np.int64)))  # fmt: skip
        ids_l.append(u)
        counts_l.append(c)
        nun.append(len(u))
    return Sampled(
        np.concatenate(ids_l) if ids_l else np.zeros(0, np.int64),
        np.concatenate(counts_l) if counts_l else np.zeros(0, np.int64),
        np.array(nun, dtype=np.int64),
    )


def make_examples(
    info: DatasetInfo, count: int, seed: int = 0, max_len: int = 24, prefix: str = "ex"
) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    spec = info.targets
    for i in range(count):
        P = int(rng.integers(0, max_len))
        lp = full_logprobs(rng, P, info.vocab_size)
        targets: TopK | Sampled
        if spec.kind == "topk":
            ids = np.argsort(-lp, axis=1)[:, : spec.k]
            top = np.take_along_axis(lp, ids, axis=1)
            tail = None
            if spec.n:
                rest = np.exp(lp)
                np.put_along_axis(rest, ids, 0.0, axis=1)
                tail = draw(rng, rest, spec.n)
            targets = TopK(ids, top.astype(np.float32), tail_logmass(top), tail)
        else:
            targets = draw(rng, np.exp(lp), spec.n)
        out.append(
            Example(
                f"{prefix}{i}",
                rng.integers(0, info.vocab_size, size=int(rng.integers(1, 9))),
                rng.integers(0, info.vocab_size, size=P),
                targets,
            )
        )
    return out
