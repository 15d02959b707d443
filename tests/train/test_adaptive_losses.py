"""The losses on variable-k targets read back from a version-2 dataset: with every id of the
teacher's support stored they equal the dense loss (value and gradient, dense and chunked);
with tail draws allocated by tail mass their targets are unbiased."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from logitcache.cache.format import Example, TargetSpec, TopK
from logitcache.cache.reader import open_dataset
from logitcache.cache.writer import DatasetWriter
from logitcache.train.loss_inputs import SampledTargets, TopKTargets, stack_targets
from logitcache.train.losses import chunked_distill_loss, kd_loss

from ..cache.synth import make_info
from ..cache.test_adaptive import adaptive_examples

V = 48


def grad_of(loss_fn, *tensors: torch.Tensor) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = loss_fn(*leaves)
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


def supported_teacher(rows: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """(rows, V) teacher log-probs whose support (the ids with mass) has 1 to V ids per row,
    and the support sizes (rows,)."""
    g = torch.Generator().manual_seed(seed)
    size = torch.randint(1, V + 1, (rows,), generator=g)
    size[0], size[1] = 1, V
    logits = 3.0 * torch.randn(rows, V, generator=g, dtype=torch.float64)
    rank = logits.argsort(-1, descending=True).argsort(-1)  # (rows, V) 0 = most likely
    logits = logits.masked_fill(rank >= size[:, None], float("-inf"))
    return logits.log_softmax(-1).float(), size.numpy()


def stored_rows(tmp_path, log_p: torch.Tensor, size: np.ndarray) -> TopKTargets:
    """The teacher's whole support per row, written as adaptive top-k (f32) and read back."""
    spec = TargetSpec("topk", k=V, codec="f32", k_mass=1.0)
    info = replace(make_info("topk", k=V, codec="f32", vocab=V), targets=spec)
    order = log_p.argsort(-1, descending=True).numpy()  # kept ids first
    lp = np.take_along_axis(log_p.numpy(), order, 1)
    lp[np.arange(V)[None, :] >= size[:, None]] = -np.inf
    tail = np.full(len(size), -np.inf, dtype=np.float32)  # nothing outside the support
    ex = Example(
        "e", np.arange(2), np.zeros(len(size), np.int64), TopK(order, lp, tail, None, size)
    )
    with DatasetWriter(tmp_path / "ds", info) as w:
        w.add(ex)
    back = next(open_dataset(tmp_path / "ds").iter_examples())
    assert np.array_equal(back.targets.counts, size)  # type: ignore[union-attr]
    targets = stack_targets([(back, 0, len(size))], info.targets)
    assert isinstance(targets, TopKTargets) and targets.ids.shape == (len(size), int(size.max()))
    return targets


# Reverse KL is left out: with no teacher mass outside the support it is infinite, and the
# loss's documented floor on log p makes the tail bucket differ from a per-id floor.
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_variable_k_with_every_id_stored_is_the_dense_loss(tmp_path, divergence: str) -> None:
    log_p, size = supported_teacher(12)
    targets = stored_rows(tmp_path, log_p, size)
    student = torch.randn(12, V, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(12, dtype=torch.bool)
    mask[5] = False

    def dense(s: torch.Tensor) -> torch.Tensor:
        log_q = s.log_softmax(-1)
        p = log_p.exp()
        if divergence == "forward_kl":
            rows = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)
        else:
            log_m = torch.logaddexp(log_p + math.log(0.5), log_q + math.log(0.5))
            kl_pm = torch.where(p > 0, p * (log_p - log_m), 0.0).sum(-1)
            kl_qm = F.kl_div(log_m, log_q, reduction="none", log_target=True).sum(-1)
            rows = 0.5 * kl_pm + 0.5 * kl_qm
        return rows[mask].mean()

    got = grad_of(lambda s: kd_loss(s, targets, mask, divergence=divergence), student)
    want = grad_of(dense, student)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    # The chunked loss from hidden states and the lm_head gives the same, chunk by chunk.
    gen = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(12, 16, generator=gen), torch.randn(V, 16, generator=gen)
    labels = torch.zeros(12, dtype=torch.long)

    def chunked(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return chunked_distill_loss(
            h, w, targets, labels, mask, alpha=1.0, chunk_size=5, divergence=divergence
        ).total

    got = grad_of(chunked, hidden, weight)
    want = grad_of(lambda h, w: dense(h @ w.T), hidden, weight)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_budgeted_tail_draws_give_unbiased_training_targets(tmp_path) -> None:
    """Through the writer, the reader and stack_targets: over many examples of one teacher
    distribution (other draw keys), the mean sparse target is the teacher's distribution."""
    spec = TargetSpec("topk", k=8, n=16, codec="f32", sampling="systematic", k_mass=0.7,
                      n_rate=64.0)  # fmt: skip
    info = replace(make_info("topk", k=8, n=16, codec="f32", vocab=V, tail_draws=16), targets=spec)
    examples = adaptive_examples(spec, 1, V, seed=3)
    one = examples[0]
    assert one.num_positions > 3
    # The same positions under 1,500 example ids: other keys, other draws.
    from logitcache.cache.capture_config import TargetConfig
    from logitcache.cache.targets import assemble_targets, example_keys
    from tests.cache.test_adaptive import peaked_logits

    reps, P = 1500, one.num_positions
    logits = peaked_logits(P, V, seed=3).float()
    want = logits.double().log_softmax(-1).exp()  # (P, V)
    keys = torch.from_numpy(example_keys([f"r{i}" for i in range(reps)], 0)).repeat_interleave(P)
    t = assemble_targets(
        logits.repeat(reps, 1), TargetConfig(spec=spec), keys, torch.arange(P).repeat(reps)
    )
    bounds = np.arange(reps + 1) * P
    with DatasetWriter(tmp_path / "ds", info) as w:
        for i, tk in enumerate(t.split(bounds)):
            w.add(Example(f"r{i}", np.arange(2), np.zeros(P, np.int64), tk))
    rows = [(e, 0, P) for e in open_dataset(tmp_path / "ds").iter_examples()]
    targets = stack_targets(rows, info.targets, tail_draws=True)
    assert isinstance(targets, SampledTargets)
    dense = torch.zeros(reps * P, V, dtype=torch.float64)
    dense.scatter_add_(1, targets.ids, targets.weights.double())
    mean = dense.view(reps, P, V).mean(0)  # (P, V)
    tail = t.tail.view(reps, P)[0].double().exp()
    drawn = torch.round(64.0 * tail) > 0  # positions that get draws
    assert (drawn.any() and (~drawn).any()) or drawn.all()
    torch.testing.assert_close(mean[drawn], want[drawn], atol=0.01, rtol=0)
    # A position without draws keeps its head exactly; its tail mass (< 0.5 / rate) is left out.
    if (~drawn).any():
        assert torch.all(mean[~drawn].sum(-1) > 1 - 0.5 / 64.0 - 1e-6)
