"""Synthetic examples with realistic (peaked, long-tailed) teacher distributions."""

from __future__ import annotations

from functools import partial

import numpy as np

from logitcache.cache.codecs import tail_logmass
from logitcache.cache.format import DatasetInfo, Example, Sampled, TopK
from logitcache.tools.reliability.synth import synth_info

make_info = partial(synth_info, teacher="tiny-teacher")
"""The reliability trials' synthetic dataset description, under the test teacher's name."""


def full_logprobs(rng: np.random.Generator, positions: int, vocab: int) -> np.ndarray:
    """Zipf-like logits, so a few ids hold most of the mass, as with real teachers."""
    logits = rng.normal(size=(positions, vocab)) * 2.0 - 1.5 * np.log1p(rng.permutation(vocab))
    return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)


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
            targets = TopK(ids, top.astype(np.float32), tail_logmass(top))
        else:
            ids_l, counts_l, nun = [], [], []
            for p in range(P):
                draws = rng.choice(
                    info.vocab_size, size=spec.n, p=np.exp(lp[p]) / np.exp(lp[p]).sum()
                )
                u, c = np.unique(draws, return_counts=True)
                ids_l.append(u)
                counts_l.append(c)
                nun.append(len(u))
            targets = Sampled(
                np.concatenate(ids_l) if ids_l else np.zeros(0, np.int64),
                np.concatenate(counts_l) if counts_l else np.zeros(0, np.int64),
                np.array(nun, dtype=np.int64),
            )
        out.append(
            Example(
                f"{prefix}{i}",
                rng.integers(0, info.vocab_size, size=int(rng.integers(1, 9))),
                rng.integers(0, info.vocab_size, size=P),
                targets,
            )
        )
    return out
