"""The target-bytes benchmark's measure of ids stored as ranks by frequency (format version 3)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from logitcache.cache.format import Example, TopK
from logitcache.cache.reader import open_dataset
from logitcache.cache.writer import DatasetWriter
from logitcache.tools.bench.target_bytes import id_rank_bytes
from tests.cache.synth import make_info


def test_frequency_ranks_shrink_the_gaps_of_popular_far_apart_ids(tmp_path) -> None:
    # Every position's top-4 is drawn from the same 8 ids spread over a 65,536-id vocabulary:
    # as ids their gaps need two bytes; as ranks by frequency they are 0..7, gaps of a few.
    vocab, popular = 65536, np.arange(8) * 8000 + 1234
    info = make_info("topk", k=4, n=0, codec="f32", vocab=vocab)
    info = replace(info, targets=replace(info.targets, k=4))
    rng = np.random.default_rng(0)
    with DatasetWriter(tmp_path / "ds", info) as w:
        for i in range(50):
            ids = np.stack([np.sort(rng.choice(popular, 4, replace=False)) for _ in range(8)])
            lp = np.log(np.full((8, 4), 0.2, np.float32))
            w.add(
                Example(
                    f"ex{i}",
                    np.array([1]),
                    rng.integers(0, vocab, 8),
                    TopK(ids, lp, np.log(np.full(8, 0.2, np.float32))),
                )
            )
    by_group, tables, rates = id_rank_bytes(open_dataset(tmp_path / "ds"), repeats=1)
    assert set(by_group) == {"top-k ids"}  # no draws stored
    plain, ranked = by_group["top-k ids"]
    assert ranked < 0.6 * plain  # 3 bits of entropy per rank gap against ~13 per id gap
    assert 0 < tables < 200  # the 8 ranked ids (int32), zstd-framed, base64 in JSON
    assert len(rates) == 4 and min(rates) > 0  # encode and decode, as ids and as ranks
