"""Writer → reader round trips: ids bit-exact, log-probs within each codec's documented bound."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from logitcache.cache.codecs import CODECS
from logitcache.cache.reader import committed_ids, open_dataset
from logitcache.cache.writer import DatasetWriter

from .synth import make_examples, make_info

# Documented per-value bounds (docs/FORMAT.md), checked before renormalization is undone.
SQRT_STEP = {"u8": 1 / 510, "u16": 1 / 131070}


def _write(path, info, examples, **kw):
    with DatasetWriter(path, info, **kw) as w:
        for ex in examples:
            w.add(ex)
    return open_dataset(path, verify=True)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("vocab", [200, 70_000])  # 1... 2 and 3 id byte planes
def test_topk_round_trip(tmp_path, codec, vocab):
    info = make_info("topk", k=8, codec=codec, vocab=vocab)
    examples = make_examples(info, 40 if vocab < 10_000 else 12, max_len=20)
    ds = _write(tmp_path / "ds", info, examples, shard_positions=40, batch_rows=7)
    assert len(ds.shards) > 1
    got = [g.by_id() for g in ds.iter_examples()]  # version 3 stores ids by rank
    assert [g.id for g in got] == [e.id for e in examples]
    for g, e in zip(got, examples, strict=True):
        np.testing.assert_array_equal(g.prompt_ids, e.prompt_ids)
        np.testing.assert_array_equal(g.response_ids, e.response_ids)
        order = np.argsort(e.targets.ids, axis=1)
        np.testing.assert_array_equal(g.targets.ids, np.take_along_axis(e.targets.ids, order, 1))
        want = np.take_along_axis(e.targets.logprobs, order, 1)
        if codec == "f32":
            np.testing.assert_array_equal(g.targets.logprobs, want)
            np.testing.assert_array_equal(g.targets.tail_logmass, e.targets.tail_logmass)
        elif codec == "f16":
            np.testing.assert_allclose(g.targets.logprobs, want, rtol=2**-11, atol=1e-7)
        else:
            # Bound: |Δ sqrt p| ≤ step/2 per value, then one shared renormalization shift.
            p_true = np.exp(np.concatenate([want, e.targets.tail_logmass[:, None]], 1))
            p_got = np.exp(np.concatenate([g.targets.logprobs, g.targets.tail_logmass[:, None]], 1))
            np.testing.assert_allclose(p_got.sum(1), 1.0, atol=1e-5)
            k1 = p_true.shape[1]
            assert np.all(
                np.abs(np.sqrt(p_got) - np.sqrt(p_true)) <= SQRT_STEP[codec] * (1 + k1) + 1e-7
            )


@pytest.mark.parametrize("vocab", [200, 70_000])
def test_sampled_round_trip(tmp_path, vocab):
    info = make_info("sampled", n=24, vocab=vocab)
    examples = make_examples(info, 30, max_len=15)
    ds = _write(tmp_path / "ds", info, examples, shard_positions=100)
    for g, e in zip((g.by_id() for g in ds.iter_examples()), examples, strict=True):
        np.testing.assert_array_equal(g.targets.nunique, e.targets.nunique)
        np.testing.assert_array_equal(g.targets.ids, e.targets.ids)  # np.unique order = ascending
        np.testing.assert_array_equal(g.targets.counts, e.targets.counts)


@pytest.mark.parametrize("vocab", [200, 70_000])
def test_topk_with_tail_draws_round_trip(tmp_path, vocab):
    info = make_info("topk", k=4, tail_draws=12, codec="f32", vocab=vocab)
    examples = make_examples(info, 30, max_len=15)
    ds = _write(tmp_path / "ds", info, examples, shard_positions=100)
    assert ds.info.targets.has_draws and "+ 12 tail draws" in repr(ds)
    for g, e in zip((g.by_id() for g in ds.iter_examples()), examples, strict=True):
        order = np.argsort(e.targets.ids, axis=1)
        np.testing.assert_array_equal(g.targets.ids, np.take_along_axis(e.targets.ids, order, 1))
        np.testing.assert_array_equal(g.targets.tail_logmass, e.targets.tail_logmass)
        got, want = g.targets.tail_draws, e.targets.tail_draws
        np.testing.assert_array_equal(got.nunique, want.nunique)
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_array_equal(got.counts, want.counts)
        # Draws come from outside the top k.
        starts = np.concatenate([[0], np.cumsum(got.nunique)])
        for p, (a, b) in enumerate(itertools.pairwise(starts)):
            assert not set(got.ids[a:b]) & set(g.targets.ids[p])


def test_tail_draws_must_match_the_spec(tmp_path):
    with_draws = make_info("topk", k=4, tail_draws=8)
    ex = make_examples(with_draws, 1, max_len=6, seed=5)[0]
    plain = make_info("topk", k=4)
    with pytest.raises(ValueError, match="has tail_draws but the dataset stores none"):
        _write(tmp_path / "a", plain, [ex])
    ex.targets.tail_draws = None
    with pytest.raises(ValueError, match=r"4 with 8 tail draws .* has no tail_draws"):
        _write(tmp_path / "b", with_draws, [ex])


def test_sampled_ids_sorted_by_writer(tmp_path):
    info = make_info("sampled", n=24)
    ex = make_examples(info, 1, max_len=10, seed=3)[0]
    while ex.num_positions == 0:
        ex = make_examples(info, 1, max_len=10, seed=4)[0]
    starts = np.concatenate([[0], np.cumsum(ex.targets.nunique)])
    sorted_ids = ex.targets.ids.copy()
    for a, b in itertools.pairwise(starts):  # reverse each position's ids
        ex.targets.ids[a:b] = ex.targets.ids[a:b][::-1]
        ex.targets.counts[a:b] = ex.targets.counts[a:b][::-1]
    got = next(_write(tmp_path / "ds", info, [ex]).iter_examples()).by_id()
    np.testing.assert_array_equal(got.targets.ids, sorted_ids)


def test_manifest_counts_and_committed_ids(tmp_path):
    info = make_info("topk", k=4)
    examples = make_examples(info, 25)
    ds = _write(tmp_path / "ds", info, examples, shard_positions=60)
    m = ds.manifest
    assert m.num_examples == 25
    assert m.num_positions == sum(e.num_positions for e in examples)
    assert sum(s.rows for s in m.shards) == 25
    assert committed_ids(tmp_path / "ds") == {e.id for e in examples}


def test_background_writer_equals_foreground(tmp_path):
    info = make_info("topk", k=8, codec="u8")
    examples = make_examples(info, 30)
    a = _write(tmp_path / "a", info, examples, shard_positions=80)
    b = _write(tmp_path / "b", info, examples, shard_positions=80, background=True)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


def test_empty_dataset(tmp_path):
    info = make_info("topk")
    ds = _write(tmp_path / "ds", info, [])
    assert ds.num_examples == 0 and list(ds.iter_examples()) == []


def test_memory_filesystem_url():
    info = make_info("topk", k=4)
    examples = make_examples(info, 10)
    ds = _write("memory://logitcache-test/ds", info, examples)
    assert [e.id for e in ds.iter_examples()] == [e.id for e in examples]
