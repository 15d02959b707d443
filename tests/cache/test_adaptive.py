"""Adaptive targets: per-position k by mass, tail draws by tail mass, and the variable-k
format (version 2) through the writer and the reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from logitcache.cache.capture_config import TargetConfig
from logitcache.cache.errors import ManifestError
from logitcache.cache.format import Example, TargetSpec, TopK
from logitcache.cache.reader import open_dataset
from logitcache.cache.targets import (
    assemble_targets,
    draws_per_row,
    kept_per_row,
    rate_for_budget,
    row_keys,
    topk_targets,
    uniforms,
)
from logitcache.cache.writer import DatasetWriter

from .synth import make_info

NEG_INF = float("-inf")


def peaked_logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """(rows, vocab) logits from near-certain to flat, as a teacher's positions are."""
    g = torch.Generator().manual_seed(seed)
    zipf = -1.5 * torch.log1p(torch.randperm(vocab, generator=g).double())
    sharp = torch.exp(torch.empty(rows, 1, dtype=torch.float64).uniform_(-1.5, 2.5, generator=g))
    return (zipf + 2.0 * torch.randn(rows, vocab, generator=g, dtype=torch.float64)) * sharp


def test_kept_ids_reach_the_mass_between_floor_and_cap() -> None:
    p = torch.tensor(
        [[0.97, 0.02, 0.01, 0.0], [0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]
    ).double()
    lp = p.log()
    assert kept_per_row(lp, 0.9).tolist() == [1, 3, 4]
    assert kept_per_row(lp, 0.9, k_min=2).tolist() == [2, 3, 4]
    assert kept_per_row(lp[:, :2], 0.9).tolist() == [1, 2, 2]  # the cap: all k
    assert kept_per_row(lp, 0.5).tolist() == [1, 1, 2]  # 0.5 reached by the first id


def test_adaptive_tail_is_everything_outside_the_kept_ids() -> None:
    logits = peaked_logits(400, 300)
    p = logits.softmax(-1)
    t = topk_targets(logits.clone(), 16, 1.0, k_mass=0.9, k_min=1)
    assert t.counts is not None and t.counts.min() >= 1 and t.counts.max() <= 16
    assert t.counts.min() == 1 and t.counts.max() == 16  # near-certain rows and flat ones
    kept = torch.arange(16) < t.counts[:, None]  # (P, 16)
    assert torch.isneginf(t.logprobs[~kept]).all() and torch.isfinite(t.logprobs[kept]).all()
    head = torch.where(kept, t.logprobs.double().exp(), 0.0).sum(-1)
    torch.testing.assert_close(t.tail.double().exp(), 1 - head, atol=1e-6, rtol=0)
    # The mass is reached, or the cap is: the ids kept are the fewest that reach it.
    reached = head >= 0.9 - 1e-6
    assert torch.all(reached | (t.counts == 16))
    top = p.sort(-1, descending=True).values.cumsum(-1)  # (P, V)
    fewer = top.gather(1, (t.counts.long() - 2).clamp(min=0)[:, None]).squeeze(1)
    assert torch.all((t.counts == 1) | (fewer < 0.9 + 1e-6))


def test_budget_rule_sums_to_the_budget_is_monotone_and_spares_certain_positions() -> None:
    rng = np.random.default_rng(0)
    m = np.concatenate([rng.beta(0.5, 3.0, size=5000), [1e-4, 3e-3]])  # tail masses
    rate = rate_for_budget(m, budget=8.0, n=32)
    n = draws_per_row(torch.from_numpy(np.log(m)), 32, rate).numpy()
    assert abs(n.sum() - 8.0 * len(m)) <= 0.002 * 8.0 * len(m)  # the budget, to rounding
    order = np.argsort(m)
    assert np.all(np.diff(n[order]) >= 0)  # more tail mass, never fewer draws
    assert n[-2] == 0 and n[-1] == 0  # near-certain positions: no draws
    assert n.max() == 32  # the cap
    with pytest.raises(ValueError, match=r"budget 40 must be in \(0, n = 32\]"):
        rate_for_budget(m, budget=40, n=32)


def test_budgeted_adaptive_estimate_is_unbiased() -> None:
    """Head at its probabilities plus each drawn tail id at m · count / n_p: over the draw
    keys, the mean is the teacher's distribution at every position that gets draws."""
    vocab, n = 40, 16
    base = peaked_logits(6, vocab, seed=1)
    rows = 6000  # each of the 6 distributions under 1,000 keys
    logits = base.repeat(rows // 6, 1)
    keys = row_keys(torch.arange(rows), torch.zeros(rows, dtype=torch.int64), 5)
    for sampling in ("systematic", "multinomial"):
        t = topk_targets(
            logits.clone(), 8, 1.0, tail_uniforms=uniforms(keys, n, sampling),
            k_mass=0.8, n_rate=40.0, sampling=sampling,
        ).reduced()  # fmt: skip
        s = t.tail_sampled
        assert s is not None and t.counts is not None
        dense = torch.zeros(rows, vocab, dtype=torch.float64)
        kept = torch.arange(8) < t.counts[:, None]
        dense.scatter_add_(1, t.ids.long(), torch.where(kept, t.logprobs.double().exp(), 0.0))
        pos = torch.repeat_interleave(torch.arange(rows), s.nunique)
        n_p = torch.zeros(rows, dtype=torch.float64).index_add_(0, pos, s.counts.double())
        w = t.tail.double().exp()[pos] * s.counts.double() / n_p[pos]
        dense.index_put_((pos, s.ids.long()), w, accumulate=True)
        drawn = n_p > 0
        want = base.double().softmax(-1).repeat(rows // 6, 1)
        assert drawn.float().mean() > 0.5  # most rows get draws; the rest are checked below
        per_dist = dense.view(-1, 6, vocab)[:, :, :].mean(0)  # (6, V) mean over keys
        for j in range(6):
            rows_j = drawn.view(-1, 6)[:, j]
            if rows_j.all():  # this distribution always gets draws: unbiased
                torch.testing.assert_close(per_dist[j], want[j], atol=0.01, rtol=0)
        # Without draws, the tail mass is left out, and it is below 0.5 / rate.
        assert torch.all(t.tail.double().exp()[~drawn] < 0.5 / 40.0 + 1e-9)


def adaptive_examples(spec: TargetSpec, count: int, vocab: int, seed: int = 0) -> list[Example]:
    """Examples with the capture's own adaptive targets (cache.targets.assemble_targets)."""
    g = np.random.default_rng(seed)
    lengths = [int(x) for x in g.integers(0, 20, size=count)]
    logits = peaked_logits(sum(lengths), vocab, seed).float()
    keys = torch.from_numpy(np.repeat(np.arange(count), lengths))
    pos = torch.cat([torch.arange(n) for n in lengths]) if lengths else torch.zeros(0)
    targets = assemble_targets(logits, TargetConfig(spec=spec), keys, pos.long())
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [
        Example(f"a{i}", g.integers(0, vocab, size=3), g.integers(0, vocab, size=n), t)
        for i, (n, t) in enumerate(zip(lengths, targets.split(bounds), strict=True))
    ]


@pytest.mark.parametrize("codec", ["f32", "u8"])
@pytest.mark.parametrize("n_rate", [None, 24.0])
def test_variable_k_round_trip(tmp_path, codec: str, n_rate: float | None) -> None:
    vocab = 300
    spec = TargetSpec("topk", k=12, n=16, codec=codec, sampling="systematic", k_mass=0.85,
                      k_min=2, n_rate=n_rate)  # fmt: skip
    info = make_info("topk", k=12, n=16, codec=codec, vocab=vocab, tail_draws=16)
    from dataclasses import replace

    info = replace(info, targets=spec)
    examples = adaptive_examples(spec, 30, vocab)
    with DatasetWriter(tmp_path / "ds", info, shard_positions=100, batch_rows=7) as w:
        for ex in examples:
            w.add(ex)
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["format_version"] == 3 and manifest["targets"]["k_mass"] == 0.85
    ds = open_dataset(tmp_path / "ds", verify=True)
    got = {e.id: e.by_id() for e in ds.iter_examples()}
    for ex in examples:
        t, r = ex.targets, got[ex.id].targets
        assert isinstance(t, TopK) and isinstance(r, TopK) and t.counts is not None
        assert np.array_equal(r.counts, t.counts)
        for p in range(ex.num_positions):
            c = int(t.counts[p])
            order = np.argsort(t.ids[p, :c])
            assert r.ids[p, :c].tolist() == t.ids[p, :c][order].tolist()
            want = t.logprobs[p, :c][order]
            if codec == "f32":  # bit for bit
                assert np.array_equal(r.logprobs[p, :c], want)
                assert r.tail_logmass[p] == t.tail_logmass[p]
            else:
                assert np.allclose(np.exp(r.logprobs[p, :c]), np.exp(want), atol=0.02)
            assert np.isneginf(r.logprobs[p, c:]).all()
        assert t.tail_draws is not None and r.tail_draws is not None
        assert np.array_equal(r.tail_draws.ids, t.tail_draws.ids)
        assert np.array_equal(r.tail_draws.counts, t.tail_draws.counts)
        assert np.array_equal(r.tail_draws.nunique, t.tail_draws.nunique)
    if n_rate is not None:  # draws by tail mass: fewer than n at some positions, none at some
        per_pos = [
            np.add.reduceat(
                e.targets.tail_draws.counts, np.r_[0, np.cumsum(e.targets.tail_draws.nunique)[:-1]]
            )
            for e in examples
            if e.targets.tail_draws.nunique.all() and e.num_positions
        ]  # type: ignore[union-attr]
        assert any((c < 16).any() for c in per_pos)


def test_new_datasets_are_version_3_and_a_misversioned_manifest_is_refused(tmp_path) -> None:
    info = make_info("topk", k=4, vocab=50)
    with DatasetWriter(tmp_path / "fixed", info):
        pass
    assert json.loads((tmp_path / "fixed" / "manifest.json").read_text())["format_version"] == 3
    from dataclasses import replace

    spec = TargetSpec("topk", k=4, codec="u8", k_mass=0.9)
    with DatasetWriter(tmp_path / "var", replace(info, targets=spec)):
        pass
    path = tmp_path / "var" / "manifest.json"
    m = json.loads(path.read_text())
    assert m["format_version"] == 3 and m["targets"]["k_min"] == 1
    m["format_version"] = 1  # variable k needs version 2 or later
    path.write_text(json.dumps(m))
    with pytest.raises(
        ManifestError, match=r"format_version is 1 but its targets .* need version 2"
    ):
        open_dataset(tmp_path / "var")


def test_writer_names_missing_or_out_of_range_counts(tmp_path) -> None:
    from dataclasses import replace

    spec = TargetSpec("topk", k=4, codec="u8", k_mass=0.9, k_min=2)
    info = replace(make_info("topk", k=4, vocab=50), targets=spec)
    ids = np.tile(np.arange(4), (3, 1))
    lp = np.full((3, 4), -2.0, dtype=np.float32)
    tail = np.full(3, -1.0, dtype=np.float32)
    with DatasetWriter(tmp_path / "ds", info) as w:
        with pytest.raises(ValueError, match=r"TopK.counts must give the ids kept"):
            w.add(Example("a", np.arange(2), np.arange(3), TopK(ids, lp, tail)))
        bad = TopK(ids, lp, tail, None, np.array([1, 2, 4]))
        with pytest.raises(ValueError, match=r"TopK.counts must lie in \[2, 4\]"):
            w.add(Example("b", np.arange(2), np.arange(3), bad))


def test_verify_export_and_stats_read_variable_k(tmp_path) -> None:
    import pyarrow.parquet as pq

    from logitcache.cache.export import export_dataset
    from logitcache.cache.stats import collect_stats
    from logitcache.cache.verify import verify_dataset

    spec = TargetSpec("topk", k=10, n=8, codec="u8", sampling="systematic", k_mass=0.8,
                      n_rate=20.0)  # fmt: skip
    from dataclasses import replace

    info = replace(make_info("topk", k=10, n=8, vocab=200, tail_draws=8), targets=spec)
    examples = adaptive_examples(spec, 12, 200, seed=4)
    with DatasetWriter(tmp_path / "ds", info) as w:
        for ex in examples:
            w.add(ex)
    report = verify_dataset(tmp_path / "ds")
    assert report.ok, report.problems
    export_dataset(tmp_path / "ds", tmp_path / "out")
    table = pq.read_table(next((tmp_path / "out" / "data").glob("*.parquet")))
    got = {r["id"]: r for r in table.to_pylist()}
    for ex in examples:
        counts = ex.targets.counts  # type: ignore[union-attr]
        assert [len(ids) for ids in got[ex.id]["topk_ids"]] == counts.tolist()
    stats = collect_stats(open_dataset(tmp_path / "ds"))
    stored = [
        ex.targets.counts + ex.targets.tail_draws.nunique  # type: ignore[union-attr]
        for ex in open_dataset(tmp_path / "ds").iter_examples()
    ]
    assert np.array_equal(stats.unique, np.concatenate(stored))  # k_j + distinct draws
