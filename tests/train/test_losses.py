"""Distillation losses: exactness against dense references, estimator bias, chunking, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from logitcache.train.losses import (
    SampledTargets,
    TopKTargets,
    auto_chunk_size,
    ce_loss,
    chunked_distill_loss,
    distill_loss,
    kd_loss,
)

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
NEG_INF = float("-inf")


# --------------------------------------------------------------------------- fixtures


def make_logits(n: int = 9, v: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher, student) random logits; the teacher is peakier, like a real LM."""
    g = torch.Generator().manual_seed(seed)
    return 3.0 * torch.randn(n, v, generator=g), torch.randn(n, v, generator=g)


def make_mask(n: int, seed: int = 0) -> torch.Tensor:
    mask = torch.rand(n, generator=torch.Generator().manual_seed(seed)) > 0.3  # (N,)
    mask[0] = True
    mask[-1] = False
    return mask


def topk_targets(teacher: torch.Tensor, k: int, *, shuffle: bool = False) -> TopKTargets:
    """What the cache stores: top-k ids, full-softmax log-probs and the tail's log-mass."""
    logprobs = teacher.log_softmax(-1)  # (N, V)
    if shuffle:  # order within a row must not matter
        g = torch.Generator().manual_seed(1)
        ids = torch.stack([torch.randperm(teacher.shape[1], generator=g)[:k] for _ in teacher])
        top = logprobs.gather(1, ids)  # (N, K)
    else:
        top, ids = logprobs.topk(k, dim=-1)  # (N, K)
    # log(1 - sum p_top) cancels catastrophically when the top-k holds nearly all the mass;
    # a logsumexp over the ids left out is exact (and -inf when k = V).
    tail = torch.logsumexp(logprobs.scatter(1, ids, NEG_INF), dim=-1)  # (N,)
    return TopKTargets(ids, top, tail)


def ref_divergence(p: torch.Tensor, q: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """(N,) textbook divergence between probability rows p (teacher) and q (student)."""

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * (a.log() - b.log()), 0.0).sum(-1)

    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
        return kl(p, q)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def ref_bucket_loss(
    teacher: torch.Tensor,
    student: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    divergence: str,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Straightforward float64 K+1 bucket loss: the top-k ids plus one 'rest' bucket."""
    p = teacher.double().softmax(-1)  # (N, V)
    q = (student.double() / temperature).softmax(-1)  # (N, V)
    p_top, q_top = p.gather(1, ids), q.gather(1, ids)  # (N, K)
    p_b = torch.cat([p_top, (1 - p_top.sum(-1, keepdim=True)).clamp(min=0)], 1)  # (N, K+1)
    q_b = torch.cat([q_top, (1 - q_top.sum(-1, keepdim=True)).clamp(min=0)], 1)
    rows = ref_divergence(p_b, q_b, divergence, beta) * temperature**2
    return rows[mask].sum() / max(int(mask.sum()), 1)


def grad_of(loss_fn, *tensors: torch.Tensor) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = loss_fn(*leaves)
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_topk_with_k_equal_vocab_is_the_dense_divergence(divergence: str) -> None:
    teacher, student = make_logits(v=50)
    mask = make_mask(teacher.shape[0])
    targets = topk_targets(teacher, k=50, shuffle=True)

    def dense(s: torch.Tensor) -> torch.Tensor:
        # Independent of the module: full-vocabulary divergence via F.kl_div where possible.
        log_p, log_q = teacher.log_softmax(-1), s.log_softmax(-1)
        if divergence == "forward_kl":
            rows = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
        elif divergence == "reverse_kl":
            rows = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
        else:
            log_m = torch.logaddexp(log_p + math.log(0.5), log_q + math.log(0.5))
            kl_pm = F.kl_div(log_m, log_p, reduction="none", log_target=True).sum(-1)
            kl_qm = F.kl_div(log_m, log_q, reduction="none", log_target=True).sum(-1)
            rows = 0.5 * kl_pm + 0.5 * kl_qm
        return rows[mask].mean()

    got = grad_of(lambda s: kd_loss(s, targets, mask, divergence=divergence), student)
    want = grad_of(dense, student)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_k_equal_vocab_ignores_a_rounding_noise_tail() -> None:
    teacher, student = make_logits(v=40)
    mask = make_mask(teacher.shape[0])
    exact = topk_targets(teacher, k=40)
    noisy = TopKTargets(exact.ids, exact.logprobs, torch.full_like(exact.tail_logmass, -16.0))
    torch.testing.assert_close(kd_loss(student, noisy, mask), kd_loss(student, exact, mask))


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("k", [1, 8, 63])
def test_topk_bucket_matches_reference(divergence: str, beta: float, k: int) -> None:
    teacher, student = make_logits(v=64)
    mask = make_mask(teacher.shape[0])
    targets = topk_targets(teacher, k=k)
    kwargs = {"divergence": divergence, "beta": beta}
    got = grad_of(lambda s: kd_loss(s, targets, mask, **kwargs), student)
    want = grad_of(lambda s: ref_bucket_loss(teacher, s, targets.ids, mask, **kwargs), student)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w.float(), rtol=1e-4, atol=1e-5)


def test_jsd_endpoints_are_the_kl_divergences() -> None:
    teacher, student = make_logits()
    mask = make_mask(teacher.shape[0])
    targets = topk_targets(teacher, k=8)
    jsd0 = kd_loss(student, targets, mask, divergence="jsd", beta=0.0)
    jsd1 = kd_loss(student, targets, mask, divergence="jsd", beta=1.0)
    torch.testing.assert_close(jsd0, kd_loss(student, targets, mask, divergence="forward_kl"))
    torch.testing.assert_close(jsd1, kd_loss(student, targets, mask, divergence="reverse_kl"))


def test_renorm_matches_reference() -> None:
    teacher, student = make_logits()
    mask = make_mask(teacher.shape[0])
    targets = topk_targets(teacher, k=8)

    def ref(s: torch.Tensor) -> torch.Tensor:
        p_top = teacher.double().softmax(-1).gather(1, targets.ids)  # (N, K)
        p_tilde = p_top / p_top.sum(-1, keepdim=True)
        log_q = s.double().log_softmax(-1).gather(1, targets.ids)  # full-vocab student
        rows = (p_tilde * (p_tilde.log() - log_q)).sum(-1)
        return rows[mask].mean()

    got = grad_of(lambda s: kd_loss(s, targets, mask, tail="renorm"), student)
    want = grad_of(ref, student)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w.float(), rtol=1e-5, atol=1e-6)


def test_sampled_matches_reference() -> None:
    _, student = make_logits(v=30)
    mask = make_mask(student.shape[0])
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(30, generator=g)[:4] for _ in range(student.shape[0])])
    weights = torch.tensor([0.5, 0.25, 0.125, 0.125]).expand(student.shape[0], 4)
    targets = SampledTargets(ids, weights.contiguous())
    want = -(weights * student.log_softmax(-1).gather(1, ids)).sum(-1)[mask].mean()
    torch.testing.assert_close(kd_loss(student, targets, mask), want)


def test_reverse_kl_with_zero_teacher_tail_is_finite() -> None:
    # The cache writes -inf when the top-k sums to 1 in fp32 even though K < V.
    teacher, student = make_logits()
    mask = make_mask(teacher.shape[0])
    t = topk_targets(teacher, k=8)
    targets = TopKTargets(t.ids, t.logprobs, torch.full_like(t.tail_logmass, NEG_INF))
    for divergence in DIVERGENCES:
        s = student.clone().requires_grad_(True)
        loss = kd_loss(s, targets, mask, divergence=divergence)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all(), divergence


def test_hand_written_student_gradient_passes_gradcheck() -> None:
    # The one hand-written backward in the module, checked in float64 against finite
    # differences: duplicate ids, an id outside the top-k, and a row whose top-k is the vocab.
    from logitcache.train.row_losses import StudentLogProbs

    n, v = 3, 5
    z = torch.randn(n, v, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[2, 3, 0, 0, 4], [1, 1, 3, 4, 0], [3, 1, 2, 0, 4]])  # (n, J)
    top = torch.zeros(n, v, dtype=torch.bool)  # may only mark ids that are read
    top[0, [2, 3]] = True  # ids 0 and 4 are read but lie in the tail
    top[1, [1, 3]] = True
    top[2] = True  # no tail: log q_tail = -inf

    def fn(z: torch.Tensor, top: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        log_q, log_q_tail = StudentLogProbs.apply(z, ids, top)
        return log_q, torch.where(log_q_tail > NEG_INF, log_q_tail, 0.0)

    assert torch.autograd.gradcheck(lambda z: fn(z, top), (z.requires_grad_(True),))
    assert torch.autograd.gradcheck(lambda z: fn(z, None), (z,))


# --------------------------------------------------------------------------- estimator bias


def test_sampled_estimator_is_unbiased_for_cross_entropy_and_kl_gradient() -> None:
    v, draws, rows = 20, 8, 20_000
    g = torch.Generator().manual_seed(0)
    p = (2.0 * torch.randn(v, generator=g)).softmax(-1)  # (V,) teacher
    student_row = torch.randn(v, generator=g).requires_grad_(True)  # (V,)
    samples = torch.multinomial(p.expand(rows, v), draws, replacement=True, generator=g)
    counts = torch.zeros(rows, v).scatter_add_(1, samples, torch.ones(rows, draws))  # (R, V)
    # Cache layout: unique ids by count, padded with weight 0 to at most `draws` entries.
    sorted_counts, order = counts.sort(dim=-1, descending=True)
    targets = SampledTargets(order[:, :draws].contiguous(), sorted_counts[:, :draws] / draws)

    student = student_row.expand(rows, v)  # every row: same q, independent draws
    loss = kd_loss(student, targets, torch.ones(rows, dtype=torch.bool))
    loss.backward()

    q = student_row.detach().softmax(-1)
    per_row = -(counts / draws * q.log()).sum(-1)  # (R,) the estimator, by hand
    torch.testing.assert_close(loss.detach(), per_row.mean())
    cross_entropy = -(p * q.log()).sum()
    stderr = per_row.std() / math.sqrt(rows)
    assert abs(loss.item() - cross_entropy.item()) < 4 * stderr.item()

    # d/dlogits of KL(p||q) is q - p; the estimator's gradient averages to it.
    grad_stderr = (counts / draws).std(dim=0) / math.sqrt(rows)  # (V,)
    assert ((student_row.grad - (q - p)).abs() <= 4 * grad_stderr + 1e-7).all()


# --------------------------------------------------------------------------- options


def test_temperature_divides_logits_and_scales_by_t_squared() -> None:
    teacher, student = make_logits()
    mask = make_mask(teacher.shape[0])
    targets = topk_targets(teacher, k=8)
    for divergence in DIVERGENCES:
        hot = kd_loss(student, targets, mask, divergence=divergence, temperature=2.0)
        cool = kd_loss(student / 2.0, targets, mask, divergence=divergence)
        torch.testing.assert_close(hot, 4.0 * cool)
        ref = ref_bucket_loss(teacher, student, targets.ids, mask, divergence, temperature=2.0)
        torch.testing.assert_close(hot, ref.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_alpha_mixes_kd_and_ce(alpha: float) -> None:
    teacher, student = make_logits()
    student.requires_grad_(True)
    mask = make_mask(teacher.shape[0])
    labels = torch.randint(0, 64, (teacher.shape[0],))
    labels[~mask] = -100  # ignored rows may hold anything
    targets = topk_targets(teacher, k=8)
    out = distill_loss(student, targets, labels, mask, alpha=alpha, temperature=1.5)
    kd = kd_loss(student, targets, mask, temperature=1.5)
    ce = ce_loss(student, labels, mask)
    torch.testing.assert_close(ce, F.cross_entropy(student[mask], labels[mask]))
    torch.testing.assert_close(out.kd, kd)
    torch.testing.assert_close(out.ce, ce)
    torch.testing.assert_close(out.total, alpha * kd + (1 - alpha) * ce)
    assert out.positions.item() == mask.sum().item()
    assert not out.kd.requires_grad and out.total.requires_grad


def all_kinds_of_targets(teacher: torch.Tensor) -> list[tuple[TopKTargets | SampledTargets, dict]]:
    topk = topk_targets(teacher, k=8)
    sampled = SampledTargets(topk.ids, torch.full(topk.ids.shape, 1 / 8))
    cases: list[tuple[TopKTargets | SampledTargets, dict]] = [
        (topk, {"divergence": d}) for d in DIVERGENCES
    ]
    return [*cases, (topk, {"tail": "renorm"}), (sampled, {})]


def test_all_masked_batch_is_zero_with_finite_zero_grads() -> None:
    teacher, student = make_logits()
    n = teacher.shape[0]
    mask = torch.zeros(n, dtype=torch.bool)
    labels = torch.full((n,), -100)
    for targets, kwargs in all_kinds_of_targets(teacher):
        # Rows that are masked out may hold garbage; none of it may leak.
        if isinstance(targets, TopKTargets):
            targets = TopKTargets(
                torch.full_like(targets.ids, -1),
                torch.full_like(targets.logprobs, NEG_INF),
                torch.full_like(targets.tail_logmass, math.nan),
            )
        s = student.clone().requires_grad_(True)
        loss = distill_loss(s, targets, labels, mask, alpha=0.5, **kwargs).total
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s)), kwargs

        h = torch.randn(n, 8, requires_grad=True)
        w = torch.randn(64, 8, requires_grad=True)
        out = chunked_distill_loss(h, w, targets, labels, mask, alpha=0.5, **kwargs)
        out.total.backward()
        assert out.total.item() == 0.0 and not h.grad.any() and not w.grad.any(), kwargs


def pad(
    targets: TopKTargets | SampledTargets, extra_ids: list[int]
) -> TopKTargets | SampledTargets:
    """Append padding entries with the given ids (one repeats a real id, one is new)."""
    n = targets.ids.shape[0]
    ids = torch.cat([targets.ids, torch.tensor(extra_ids).expand(n, -1)], 1)
    if isinstance(targets, TopKTargets):
        lp = torch.cat([targets.logprobs, torch.full((n, len(extra_ids)), NEG_INF)], 1)
        return TopKTargets(ids, lp, targets.tail_logmass)
    weights = torch.cat([targets.weights, torch.zeros(n, len(extra_ids))], 1)
    return SampledTargets(ids, weights)


def test_padding_entries_change_nothing() -> None:
    teacher, student = make_logits()
    mask = make_mask(teacher.shape[0])
    for targets, kwargs in all_kinds_of_targets(teacher):
        real_id = int(targets.ids[0, 0])
        outside = next(i for i in range(64) if i not in targets.ids[0].tolist())
        padded = pad(targets, [real_id, outside, 0])
        got = grad_of(lambda s, t=padded, kw=kwargs: kd_loss(s, t, mask, **kw), student)
        want = grad_of(lambda s, t=targets, kw=kwargs: kd_loss(s, t, mask, **kw), student)
        for g, w in zip(got, want, strict=True):
            assert torch.isfinite(g).all(), kwargs
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_bf16_logits_are_upcast() -> None:
    teacher, student = make_logits()
    mask = make_mask(teacher.shape[0])
    labels = torch.randint(0, 64, (teacher.shape[0],))
    for targets, kwargs in all_kinds_of_targets(teacher):
        s16 = student.bfloat16().requires_grad_(True)
        out = distill_loss(s16, targets, labels, mask, alpha=0.5, **kwargs)
        out.total.backward()
        assert out.total.dtype == torch.float32
        assert s16.grad.dtype == torch.bfloat16 and torch.isfinite(s16.grad).all()
        want = distill_loss(s16.detach().float(), targets, labels, mask, alpha=0.5, **kwargs)
        torch.testing.assert_close(out.total, want.total)


# --------------------------------------------------------------------------- chunked


CHUNKED_CASES = [
    *[{"divergence": d} for d in DIVERGENCES],
    {"divergence": "jsd", "beta": 0.2, "temperature": 2.0},
    {"tail": "renorm"},
    {"sampled": True, "temperature": 0.5},
]


@pytest.mark.parametrize("case", CHUNKED_CASES, ids=lambda c: "-".join(map(str, c.values())))
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_equals_dense_loss_and_grads(case: dict, chunk_size: int, bias: bool) -> None:
    n, v, h = 13, 48, 16  # 13 rows: no tested chunk size divides it; 64 > N
    teacher, _ = make_logits(n=n, v=v, seed=5)
    g = torch.Generator().manual_seed(6)
    hidden, weight = torch.randn(n, h, generator=g), 0.3 * torch.randn(v, h, generator=g)
    b = torch.randn(v, generator=g) if bias else None
    labels, mask = torch.randint(0, v, (n,), generator=g), make_mask(n, seed=7)
    kwargs = dict(case)
    targets: TopKTargets | SampledTargets = topk_targets(teacher, k=6)
    if kwargs.pop("sampled", False):
        targets = SampledTargets(targets.ids, targets.logprobs.softmax(-1))
    leaves = [t for t in (hidden, weight, b) if t is not None]

    def dense(hid: torch.Tensor, w: torch.Tensor, *bb: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hid, w, bb[0] if bb else None)  # (N, V)
        return distill_loss(logits, targets, labels, mask, alpha=0.7, **kwargs).total

    def chunked(hid: torch.Tensor, w: torch.Tensor, *bb: torch.Tensor) -> torch.Tensor:
        return chunked_distill_loss(
            hid,
            w,
            targets,
            labels,
            mask,
            alpha=0.7,
            chunk_size=chunk_size,
            lm_head_bias=bb[0] if bb else None,
            **kwargs,
        ).total

    got, want = grad_of(chunked, *leaves), grad_of(dense, *leaves)
    for gg, ww in zip(got, want, strict=True):
        torch.testing.assert_close(gg, ww, rtol=1e-5, atol=1e-5)


def test_chunked_gradients_follow_the_graph_around_the_loss() -> None:
    # The chunked loss computes its gradients in the forward pass; backward must still scale
    # them by the incoming gradient and add them to other uses of a tied lm_head weight.
    n, v, h = 9, 40, 8
    teacher, _ = make_logits(n=n, v=v, seed=3)
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, v, (n,), generator=g)
    weight = (0.3 * torch.randn(v, h, generator=g)).requires_grad_(True)
    labels, mask = torch.randint(0, v, (n,), generator=g), make_mask(n, seed=2)
    targets = topk_targets(teacher, k=5)

    def total(loss_fn) -> torch.Tensor:
        hidden = torch.tanh(weight[tokens] * 1.5)  # tied: the embedding is the lm_head
        return 3.0 * loss_fn(hidden).total + weight.square().sum()

    def dense(hidden: torch.Tensor):
        return distill_loss(hidden @ weight.T, targets, labels, mask, alpha=0.4)

    def chunked(hidden: torch.Tensor):
        return chunked_distill_loss(hidden, weight, targets, labels, mask, alpha=0.4, chunk_size=4)

    (want,) = torch.autograd.grad(total(dense), weight)
    (got,) = torch.autograd.grad(total(chunked), weight)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_auto_chunk_size_bounds_the_chunk_logits() -> None:
    assert auto_chunk_size(32_000) == 1_048
    assert auto_chunk_size(131_072) == 256
    assert auto_chunk_size(2**30) == 1
    teacher, _ = make_logits(n=7, v=32)
    hidden, weight = torch.randn(7, 8), torch.randn(32, 8)
    labels, mask = torch.randint(0, 32, (7,)), make_mask(7)
    targets = topk_targets(teacher, k=4)
    auto = chunked_distill_loss(hidden, weight, targets, labels, mask, alpha=0.5)
    dense = distill_loss(hidden @ weight.T, targets, labels, mask, alpha=0.5)
    torch.testing.assert_close(auto.total, dense.total)


def test_chunked_bf16_gradients_keep_their_dtypes() -> None:
    n, v, h = 6, 32, 8
    teacher, _ = make_logits(n=n, v=v)
    hidden = torch.randn(n, h).bfloat16().requires_grad_(True)
    weight = torch.randn(v, h).bfloat16().requires_grad_(True)
    labels, mask = torch.randint(0, v, (n,)), make_mask(n)
    targets = topk_targets(teacher, k=4)
    out = chunked_distill_loss(hidden, weight, targets, labels, mask, alpha=0.5, chunk_size=4)
    out.total.backward()
    assert out.total.dtype == torch.float32
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    want = distill_loss(
        hidden.detach().float() @ weight.detach().float().T, targets, labels, mask, alpha=0.5
    )
    torch.testing.assert_close(out.total, want.total.detach(), rtol=2e-2, atol=2e-2)


def test_chunked_reports_parts_and_runs_without_grad() -> None:
    n, v, h = 10, 32, 8
    teacher, _ = make_logits(n=n, v=v)
    hidden, weight = torch.randn(n, h), torch.randn(v, h)
    labels, mask = torch.randint(0, v, (n,)), make_mask(n)
    targets = topk_targets(teacher, k=4)
    dense = distill_loss(hidden @ weight.T, targets, labels, mask, alpha=0.5)
    with torch.no_grad():
        out = chunked_distill_loss(hidden, weight, targets, labels, mask, alpha=0.5, chunk_size=3)
    for name in ("total", "kd", "ce"):
        torch.testing.assert_close(getattr(out, name), getattr(dense, name).detach())
    assert out.positions.item() == mask.sum().item()


# --------------------------------------------------------------------------- errors


def small_case() -> tuple[torch.Tensor, TopKTargets, torch.Tensor, torch.Tensor]:
    teacher, student = make_logits(n=6, v=20)
    return student, topk_targets(teacher, k=4), torch.randint(0, 20, (6,)), make_mask(6)


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_sampled_targets_reject_reverse_kl_and_jsd(divergence: str) -> None:
    student, topk, _, mask = small_case()
    sampled = SampledTargets(topk.ids, torch.full(topk.ids.shape, 0.25))
    with pytest.raises(ValueError, match=rf"divergence='{divergence}' cannot be estimated .*"):
        kd_loss(student, sampled, mask, divergence=divergence)
    with pytest.raises(ValueError, match=r"cache TopKTargets for reverse_kl/jsd"):
        kd_loss(student, sampled, mask, divergence=divergence)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"divergence": "kl"}, r"divergence='kl' is not one of forward_kl, reverse_kl, jsd"),
        ({"tail": "drop"}, r"tail='drop' is not one of bucket, renorm"),
        ({"beta": 1.5}, r"beta=1.5 is outside \[0, 1\]"),
        ({"temperature": 0.0}, r"temperature=0.0 must be a positive finite number"),
        ({"tail": "renorm", "divergence": "jsd"}, r"tail='renorm' is defined for forward_kl"),
    ],
)
def test_bad_options_are_named(kwargs: dict, message: str) -> None:
    student, targets, _, mask = small_case()
    with pytest.raises(ValueError, match=message):
        kd_loss(student, targets, mask, **kwargs)


def test_shape_and_dtype_errors_name_the_fix() -> None:
    student, targets, labels, mask = small_case()
    with pytest.raises(ValueError, match=r"TopKTargets has 5 rows but the student has 6 \(N\)"):
        kd_loss(
            student,
            TopKTargets(targets.ids[:5], targets.logprobs[:5], targets.tail_logmass[:5]),
            mask,
        )
    with pytest.raises(ValueError, match=r"must be 2-D \(N, V\).*use logits.flatten\(0, -2\)"):
        kd_loss(student[None], targets, mask)
    with pytest.raises(ValueError, match=r"mask must be torch.bool, got torch.int64"):
        kd_loss(student, targets, mask.long())
    with pytest.raises(ValueError, match=r"mask has shape \(5,\), expected \(6,\)"):
        kd_loss(student, targets, mask[:5])
    with pytest.raises(ValueError, match=r"labels has shape \(6, 1\), expected \(6,\)"):
        ce_loss(student, labels[:, None], mask)
    with pytest.raises(ValueError, match=r"alpha=2.0 is outside \[0, 1\]"):
        distill_loss(student, targets, labels, mask, alpha=2.0)
    with pytest.raises(TypeError, match=r"targets must be TopKTargets or SampledTargets"):
        kd_loss(student, {"ids": targets.ids}, mask)  # type: ignore[arg-type]


def test_all_problems_are_reported_at_once() -> None:
    student, targets, _, mask = small_case()
    with pytest.raises(ValueError, match=r"(?s)2 problems:.*mask must be torch.bool.*beta=-1"):
        kd_loss(student, targets, mask.long(), beta=-1.0)


def test_targets_validate_their_own_fields() -> None:
    ids = torch.zeros(4, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"TopKTargets.logprobs has shape \(4, 2\) but ids"):
        TopKTargets(ids, torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match=r"TopKTargets.tail_logmass has shape \(3,\), expected"):
        TopKTargets(ids, torch.zeros(4, 3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"SampledTargets.ids must be int64, got torch.int32"):
        SampledTargets(ids.int(), torch.zeros(4, 3))


def test_chunked_errors_name_the_lm_head_problem() -> None:
    _, targets, labels, mask = small_case()
    hidden, weight = torch.randn(6, 8), torch.randn(20, 8)
    with pytest.raises(ValueError, match=r"lm_head_weight has shape \(20, 4\) but hidden has H=8"):
        chunked_distill_loss(hidden, weight[:, :4], targets, labels, mask, alpha=0.5)
    with pytest.raises(ValueError, match=r"chunk_size=-1 must be a positive int"):
        chunked_distill_loss(hidden, weight, targets, labels, mask, alpha=0.5, chunk_size=-1)
    with pytest.raises(ValueError, match=r"lm_head_bias has shape \(19,\), expected \(20,\)"):
        chunked_distill_loss(
            hidden, weight, targets, labels, mask, alpha=0.5, lm_head_bias=torch.zeros(19)
        )
