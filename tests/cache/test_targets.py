"""Target math on the device: top-k + tail, inverse-CDF draws, counter RNG, top-p sampler."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch

from logitcache.cache.capture_config import GenerateConfig, TargetConfig
from logitcache.cache.engine import TokenSampler
from logitcache.cache.format import Sampled, TargetSpec, TopK
from logitcache.cache.targets import (
    assemble_targets,
    mix32,
    row_keys,
    row_targets,
    sample_ids,
    sampled_targets,
    stack_steps,
    topk_targets,
    uniforms,
    unique_counts,
    unit_interval,
)


def lowbias32(x: int) -> int:
    """Reference in plain Python integers."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_mix32_matches_the_reference_hash() -> None:
    xs = [0, 1, 2, 12345, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xDEADBEEF]
    got = mix32(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [lowbias32(x) for x in xs]


def test_uniforms_are_uniform_and_keyed() -> None:
    keys = row_keys(torch.arange(4000), torch.zeros(4000, dtype=torch.int64), 1)
    u = uniforms(keys, 64)  # (4000, 64)
    assert u.min() > 0 and u.max() < 1
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert torch.all((hist - 0.1).abs() < 0.005)
    assert torch.equal(uniforms(keys, 64), u)  # a function of the keys only
    other = uniforms(row_keys(torch.arange(4000), torch.ones(4000, dtype=torch.int64), 1), 64)
    assert (other == u).float().mean() < 0.001


def test_the_largest_hash_maps_below_one() -> None:
    u = unit_interval(torch.tensor([0, 0xFFFFFFFF], dtype=torch.int64))
    assert u.dtype == torch.float64 and u[0] > 0 and u[1] < 1
    # A draw at the top of the unit interval still respects a zero-mass last id.
    logp = torch.tensor([[0.5, 0.5, 0.0]]).log()
    assert sample_ids(logp, u[1:].reshape(1, 1)).item() == 1


def test_topk_tail_is_the_rest_of_the_mass() -> None:
    logits = torch.randn(50, 300, generator=torch.Generator().manual_seed(0)) * 3
    t = topk_targets(logits, 10, temperature=2.0)
    logp = torch.log_softmax(logits.double() / 2.0, -1)
    vals, idx = logp.topk(10)
    assert torch.equal(t.ids.long(), idx)
    torch.testing.assert_close(t.logprobs.double(), vals, atol=1e-6, rtol=0)
    torch.testing.assert_close(t.tail.double(), torch.log1p(-vals.exp().sum(-1)), atol=1e-5, rtol=0)
    full = topk_targets(logits, 300, temperature=1.0)
    assert torch.all(full.tail == float("-inf"))
    # Generate mode hands in the logits that generate still uses: they must stay as they were.
    before = logits.clone()
    topk_targets(logits, 10, temperature=1.0)
    assert torch.equal(logits, before)
    again = topk_targets(logits.clone(), 10, temperature=1.0, inplace=True)
    ref = topk_targets(logits, 10, temperature=1.0)
    assert torch.equal(again.ids, ref.ids) and torch.equal(again.logprobs, ref.logprobs)


def test_inverse_cdf_draws_follow_the_distribution_and_skip_zero_mass() -> None:
    p = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]])
    logp = p.log().expand(20000, -1)
    keys = row_keys(torch.arange(20000), torch.zeros(20000, dtype=torch.int64), 7)
    draws = sample_ids(logp, uniforms(keys, 1))
    freq = torch.bincount(draws.reshape(-1), minlength=6).double() / draws.numel()
    assert freq[[0, 2, 5]].sum() == 0
    torch.testing.assert_close(freq, p[0].double(), atol=0.01, rtol=0)


def test_systematic_draws_are_unbiased_and_within_one_of_n_p() -> None:
    p = torch.tensor([0.46, 0.3, 0.002, 0.138, 0.1, 0.0])
    rows, n = 20000, 16
    logp = p.log().expand(rows, -1)
    keys = row_keys(torch.arange(rows), torch.zeros(rows, dtype=torch.int64), 7)
    u = uniforms(keys, n, "systematic")  # (rows, n)
    assert u.min() > 0 and u.max() < 1
    assert torch.all((u * n).floor() == torch.arange(n))  # one point in each n-th of (0, 1)
    draws = sample_ids(logp, u)
    counts = torch.nn.functional.one_hot(draws, 6).sum(1).double()  # (rows, 6)
    # Unbiased: the mean count is n·p (standard error below 0.004 here).
    torch.testing.assert_close(counts.mean(0), n * p.double(), atol=0.02, rtol=0)
    # Low variance: every count is floor(n·p) or ceil(n·p), where independent draws spread.
    assert torch.all((counts - n * p.double()).abs() < 1)
    independent = torch.nn.functional.one_hot(sample_ids(logp, uniforms(keys, n)), 6).sum(1)
    assert (independent.double() - n * p.double()).abs().max() >= 3
    with pytest.raises(ValueError, match=r"sampling='stratified'; expected 'systematic'"):
        uniforms(keys, n, "stratified")


def test_topk_tail_draws_follow_the_renormalised_tail() -> None:
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.04, 0.01, 0.0])
    rows, n = 20000, 8
    logits = p.log().expand(rows, -1).clone()
    keys = row_keys(torch.arange(rows), torch.zeros(rows, dtype=torch.int64), 3)
    t = topk_targets(logits, 2, 1.0, tail_uniforms=uniforms(keys, n))
    assert t.tail_draws is not None and t.tail_draws.shape == (rows, n)
    counts = torch.nn.functional.one_hot(t.tail_draws, 7).sum((0, 1)).double() / (rows * n)
    # Never a top-k id or a zero-mass id; the rest in proportion (standard error < 0.002).
    want = torch.tensor([0, 0, 0.15, 0.1, 0.04, 0.01, 0], dtype=torch.float64) / 0.3
    torch.testing.assert_close(counts, want, atol=0.006, rtol=0)
    torch.testing.assert_close(t.tail.exp(), torch.full((rows,), 0.3), atol=1e-6, rtol=0)
    # Same uniforms, same draws: the keys alone decide them.
    again = topk_targets(logits[:5].clone(), 2, 1.0, tail_uniforms=uniforms(keys[:5], n))
    assert torch.equal(again.tail_draws, t.tail_draws[:5])
    # k = V: no tail, and unique_counts keeps no draws for such rows.
    full = topk_targets(logits[:3].clone(), 7, 1.0, tail_uniforms=uniforms(keys[:3], n))
    s = unique_counts(full.tail_draws, full.tail > float("-inf"))
    assert s.nunique.tolist() == [0, 0, 0] and len(s.ids) == 0


def test_unique_counts() -> None:
    draws = torch.tensor([[5, 3, 5, 5], [1, 1, 1, 1], [9, 2, 7, 4]])
    s = unique_counts(draws)
    assert s.nunique.tolist() == [2, 1, 4]
    assert s.ids.tolist() == [3, 5, 1, 2, 4, 7, 9]
    assert s.counts.tolist() == [1, 3, 4, 1, 1, 1, 1]
    # Rows not kept get no ids, and the runs of the rows around them keep their counts.
    s = unique_counts(draws, torch.tensor([True, False, True]))
    assert s.nunique.tolist() == [2, 0, 4]
    assert s.ids.tolist() == [3, 5, 2, 4, 7, 9]
    assert s.counts.tolist() == [1, 3, 1, 1, 1, 1]
    s = unique_counts(draws, torch.tensor([False, True, False]))
    assert (s.nunique.tolist(), s.ids.tolist(), s.counts.tolist()) == ([0, 1, 0], [1], [4])
    s = sampled_targets(torch.randn(7, 50), 40, 1.0, torch.arange(7))
    bounds = np.concatenate([[0], np.cumsum(s.nunique.numpy())])
    assert all(s.counts[bounds[i] : bounds[i + 1]].sum() == 40 for i in range(7))


@pytest.mark.parametrize(
    ("top_p", "expected"), [(1.0, [0.5, 0.3, 0.15, 0.05]), (0.7, [0.625, 0.375, 0, 0])]
)
def test_sampler_draws_from_the_nucleus(top_p: float, expected: list[float]) -> None:
    B = 20000
    scores = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(B, -1).contiguous()
    sampler = TokenSampler(GenerateConfig(temperature=1.0, top_p=top_p), torch.arange(B))
    out = sampler(torch.zeros(B, 1, dtype=torch.long), scores)
    assert torch.all((out == 0).sum(-1) == 1)  # exactly one allowed token per row
    freq = torch.bincount(out.argmax(-1), minlength=4).double() / B
    torch.testing.assert_close(
        freq, torch.tensor(expected, dtype=torch.float64), atol=0.012, rtol=0
    )
    second = sampler(torch.zeros(B, 1, dtype=torch.long), scores)  # next step: new draws
    assert (second.argmax(-1) != out.argmax(-1)).any()


@pytest.mark.parametrize(
    "spec",
    [
        TargetSpec("topk", k=6, n=0),
        TargetSpec("topk", k=6, n=9, sampling="systematic"),
        TargetSpec("topk", k=40, n=4, sampling="multinomial"),  # k = V: no tail, no draws
        TargetSpec("sampled", n=9, sampling="multinomial"),
    ],
    ids=lambda spec: spec.label,
)
def test_generation_steps_stack_into_what_one_pass_assembles(spec: TargetSpec) -> None:
    """Generate mode's per-step targets, stacked over the valid steps and cut per example, are
    score mode's targets of the same rows in one pass, bit for bit."""
    B, S, V = 3, 5, 40
    logits = torch.randn(B, S, V, generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([5, 2, 4])
    valid = torch.arange(S)[None, :] < lengths[:, None]  # (B, S)
    targets = TargetConfig(spec=spec, temperature=0.8)
    keys = torch.tensor([11, 22, 33])
    steps = [row_targets(logits[:, s], targets, keys, torch.full((B,), s)) for s in range(S)]
    stacked = stack_steps(steps, valid)
    rows, positions = valid.nonzero(as_tuple=True)  # example-major
    flat = assemble_targets(logits[valid], targets, keys[rows], positions)
    bounds = np.concatenate([[0], np.cumsum(lengths.numpy())])
    got, want = stacked.split(bounds), flat.split(bounds)
    assert len(got) == len(want) == B
    for g, w, n in zip(got, want, lengths.tolist(), strict=True):
        assert len(g.nunique if isinstance(g, Sampled) else g.tail_logmass) == n
        np.testing.assert_equal(asdict(g), asdict(w))
    if spec.k == V and spec.n:  # the top k hold all the mass: no tail draws anywhere
        assert all(isinstance(t, TopK) and t.tail_draws.nunique.sum() == 0 for t in got)
