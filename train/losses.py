"""Distillation losses against cached teacher targets, dense and chunked.

The trainer flattens the loss positions of a batch into ``N`` rows; every function here takes
student logits ``(N, V)`` (or the hidden states and lm_head that produce them), teacher targets
read from the cache, and an explicit boolean ``mask`` ``(N,)`` of the rows that count. Losses
are means over masked rows, computed in float32 whatever the input dtype, and an all-masked
batch gives 0 with a zero (finite) gradient.

Two kinds of cached targets:

* :class:`TopKTargets` - the teacher's top-k ids with their log-probs under the teacher's
  *full-vocabulary* softmax, plus the log of the mass left outside the top-k. With
  ``tail="bucket"`` (default) both distributions are compared over ``K + 1`` buckets: the K ids
  and one "everything else" bucket. With K = V this is exactly the full-vocabulary divergence.
  ``tail="renorm"`` renormalises the teacher over its top-k and drops the tail (the common,
  biased form; forward KL only).
* :class:`SampledTargets` - RS-KD style: ids drawn from the teacher with their empirical
  frequencies. Only forward KL has an unbiased estimator from samples (see :func:`kd_loss`).

:func:`chunked_distill_loss` takes hidden states and the lm_head instead of logits and runs the
lm_head matmul chunk by chunk and computes each chunk's gradients in the forward pass, so the
``(N, V)`` logits never exist at once and nothing is recomputed; it equals
:func:`distill_loss` on ``hidden @ W.T + b`` (value and gradients).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .targets import (
    DIVERGENCES,
    TAIL_MODES,
    SampledTargets,
    Targets,
    TopKTargets,
    check_lm_head,
    check_options,
    check_rows,
    check_student,
    raise_if,
)

__all__ = [
    "DIVERGENCES",
    "TAIL_MODES",
    "DistillLoss",
    "SampledTargets",
    "TopKTargets",
    "auto_chunk_size",
    "ce_loss",
    "chunked_distill_loss",
    "distill_loss",
    "kd_loss",
]

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
TailMode = Literal["bucket", "renorm"]

# Reverse KL floors the teacher's log-probs at the smallest normal float32. A cached
# tail_logmass of -inf is usually rounding (the top-k summed to 1 in fp32), and an unfloored
# log 0 would make KL(q||p) infinite as soon as the student puts any mass outside the top-k.
_LOG_TINY = math.log(torch.finfo(torch.float32).tiny)
_NEG_INF = float("-inf")


@dataclass(frozen=True)
class DistillLoss:
    """Result of :func:`distill_loss`: the loss to backpropagate and its detached parts.

    The parts stay tensors (no ``.item()``) so logging them does not force a device sync.
    """

    total: torch.Tensor
    """Scalar ``alpha * kd + (1 - alpha) * ce``, with grad."""
    kd: torch.Tensor
    """Scalar distillation term (already times temperature**2), detached."""
    ce: torch.Tensor
    """Scalar cross-entropy to the labels, detached."""
    positions: torch.Tensor
    """Number of masked positions the means were taken over, detached int64."""


# --------------------------------------------------------------------------- public losses


def kd_loss(
    student_logits: torch.Tensor,
    targets: Targets,
    mask: torch.Tensor,
    *,
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    tail: TailMode = "bucket",
) -> torch.Tensor:
    """Mean distillation loss over the rows where ``mask`` is True.

    Args:
        student_logits: (N, V) student logits, any float dtype (upcast to float32).
        targets: cached teacher targets for the same N rows; used as stored (the teacher
            temperature is whatever the cache was written with).
        mask: (N,) bool, True for rows that count.
        divergence: ``"forward_kl"`` KL(p||q), ``"reverse_kl"`` KL(q||p), or ``"jsd"``, the
            generalised JSD of GKD (TRL's convention): with m = beta*p + (1-beta)*q,
            ``beta*KL(p||m) + (1-beta)*KL(q||m)``. The formula vanishes at beta 0 and 1, so
            like TRL those endpoints are defined as forward KL (beta=0) and reverse KL (beta=1).
        beta: JSD mixing weight in [0, 1]; ignored by the KL divergences.
        temperature: the student logits are divided by it and the loss multiplied by its
            square, keeping gradient magnitudes comparable across temperatures.
        tail: for :class:`TopKTargets`, ``"bucket"`` compares K+1 buckets (exact for K = V)
            and ``"renorm"`` uses sum p~ (log p~ - log q) with p~ the teacher renormalised over
            its top-k and q the student's full softmax (forward KL only). Ignored for samples.

    With :class:`SampledTargets` the forward-KL loss is the RS-KD estimator
    ``-sum_j w_j log q_j``. Its expectation over the teacher's draws is CE(p, q) =
    KL(p||q) + H(p): the gradient is an unbiased estimate of the forward-KL gradient, but the
    value is a cross-entropy, offset by the teacher entropy from top-k KL values.

    Returns:
        Scalar float32 tensor.
    """
    problems = check_student(student_logits, targets, None, mask)
    problems += check_options(targets, divergence, beta, temperature, tail)
    raise_if(problems)
    opts = _Options(divergence, beta, temperature, tail)
    kd_sum, _ = _distill_sums(_upcast(student_logits), targets, None, mask, opts)
    return kd_sum / _count(mask)


def ce_loss(student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``labels`` (N,) int64 over rows where ``mask`` (N,) is True.

    Labels of masked-out rows are never read, so they may hold an ignore value such as -100.
    """
    raise_if(check_student(student_logits, None, labels, mask))
    _, ce_sum = _distill_sums(_upcast(student_logits), None, labels, mask, _Options())
    return ce_sum / _count(mask)


def distill_loss(
    student_logits: torch.Tensor,
    targets: Targets,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    alpha: float,
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    tail: TailMode = "bucket",
) -> DistillLoss:
    """``alpha * kd_loss(...) + (1 - alpha) * ce_loss(...)`` with both parts reported.

    The cross-entropy uses the untempered logits; see :func:`kd_loss` for the other options.
    """
    problems = check_student(student_logits, targets, labels, mask)
    problems += check_options(targets, divergence, beta, temperature, tail, alpha=alpha)
    raise_if(problems)
    opts = _Options(divergence, beta, temperature, tail)
    kd_sum, ce_sum = _distill_sums(_upcast(student_logits), targets, labels, mask, opts)
    return _combine(kd_sum, ce_sum, mask, alpha)


def chunked_distill_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: Targets,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    alpha: float,
    chunk_size: int = 0,
    lm_head_bias: torch.Tensor | None = None,
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    tail: TailMode = "bucket",
) -> DistillLoss:
    """:func:`distill_loss` on ``hidden @ lm_head_weight.T + lm_head_bias``, in bounded memory.

    Masked-out rows are dropped first (they cost no vocab-sized work), then the kept rows are
    processed ``chunk_size`` at a time: each chunk runs the lm_head matmul, the loss and its
    gradients (see :class:`_ChunkedLoss`), so only one chunk's ``(chunk_size, V)`` logits and
    their intermediates are alive at once. Sums are divided by the total number of masked
    rows, so the result equals the dense loss.

    Args:
        hidden: (N, H) final hidden states of the student at the loss positions.
        lm_head_weight: (V, H) output projection.
        chunk_size: rows per chunk; peak memory scales with ``chunk_size * V``. 0 (default)
            picks :func:`auto_chunk_size` for the vocabulary.
        lm_head_bias: optional (V,) output bias.
        targets, labels, mask, alpha, divergence, beta, temperature, tail: as in
            :func:`distill_loss`.
    """
    if chunk_size == 0 and lm_head_weight.dim() == 2:
        chunk_size = auto_chunk_size(lm_head_weight.shape[0])
    problems = check_lm_head(hidden, lm_head_weight, lm_head_bias, chunk_size)
    n = hidden.shape[0] if hidden.dim() == 2 else None
    problems += check_rows(n, hidden.device, targets, labels, mask)
    problems += check_options(targets, divergence, beta, temperature, tail, alpha=alpha)
    raise_if(problems)
    opts = _Options(divergence, beta, temperature, tail)

    keep = mask.nonzero().squeeze(1)  # (M,)
    hidden_kept = hidden.index_select(0, keep)  # (M, H)
    rows = (_take_rows(targets, keep), labels.index_select(0, keep))  # M rows each
    count = _count(mask)
    scale = (alpha / count, (1.0 - alpha) / count)  # d total / d (kd_sum, ce_sum)
    total, kd_sum, ce_sum = _ChunkedLoss.apply(
        hidden_kept, lm_head_weight, lm_head_bias, rows, scale, opts, chunk_size
    )
    return DistillLoss(total, kd_sum / count, ce_sum / count, mask.sum().detach())


CHUNK_LOGITS = 2**25
"""Logits per chunk that :func:`auto_chunk_size` aims at: 128 MiB per fp32 ``(n, V)`` buffer."""


def auto_chunk_size(vocab: int) -> int:
    """Rows per chunk so that a chunk holds about :data:`CHUNK_LOGITS` logits: 1,024 rows at
    a 32k vocabulary, 256 at 128k, 128 at Gemma's 262k. The loss keeps a few fp32 buffers of
    that size alive, so its peak stays near half a GiB whatever the batch, and chunks stay
    large enough for the matmuls to run at full speed."""
    return max(1, CHUNK_LOGITS // max(vocab, 1))


class _ChunkedLoss(torch.autograd.Function):
    """``alpha * kd + (1 - alpha) * ce`` from hidden states and the lm_head, a chunk of rows
    at a time, with the gradients computed in the forward pass.

    For each chunk the forward runs the lm_head matmul, the loss sums, autograd of the chunk's
    share of the total back to its ``(n, V)`` logits, and two matmuls that turn that into
    the chunk's gradients for the hidden states and the lm_head; then the chunk's logits are
    freed. Backward only scales the stored gradients by the incoming one. Memory is one chunk's
    logits and their gradient plus a ``(V, H)`` gradient buffer; the lm_head matmul runs once
    forward and twice for the gradients, as in a dense loss (activation checkpointing would
    run it a fourth time). This is the fused linear cross-entropy of Liger Kernel, here for
    every distillation loss. Without grad mode (evaluation) it only computes the sums.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        rows: tuple[Targets, torch.Tensor],
        scale: tuple[torch.Tensor, torch.Tensor],
        opts: _Options,
        chunk_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        targets, labels = rows
        wants = ctx.needs_input_grad[:3]
        grads = [
            torch.zeros_like(t, dtype=torch.float32) if want else None
            for t, want in zip((hidden, weight, bias), wants, strict=True)
        ]
        sums = hidden.new_zeros(2, dtype=torch.float32)  # (kd_sum, ce_sum)
        for start in range(0, hidden.shape[0], chunk_size):
            part = slice(start, start + chunk_size)
            h = hidden[part]  # (n, H)
            raw = torch.nn.functional.linear(h, weight, bias)  # (n, V), maybe bf16
            logits = _upcast(raw).detach().requires_grad_(any(wants))
            with torch.enable_grad():
                part_sums = _chunk_sums(logits, _take_rows(targets, part), labels[part], opts)
                if any(wants):
                    share = scale[0] * part_sums[0] + scale[1] * part_sums[1]
                    (g,) = torch.autograd.grad(share, logits)  # (n, V) fp32
            sums += part_sums.detach()
            if not any(wants):
                continue
            g = g.to(raw.dtype)
            del logits, raw, share
            if grads[0] is not None:
                grads[0][part] = g @ weight  # (n, H)
            if grads[1] is not None and g.dtype == h.dtype == torch.float32:
                grads[1].addmm_(g.t(), h)  # (V, H), no temporary
            elif grads[1] is not None:
                grads[1].add_(g.t() @ h)  # (V, H) in the matmul's dtype, summed in fp32
            if grads[2] is not None:
                grads[2].add_(g.sum(0))  # (V,)
            del g  # before the next chunk's logits exist
        ctx.grads = grads
        ctx.dtypes = [None if t is None else t.dtype for t in (hidden, weight, bias)]
        kd_sum, ce_sum = sums.unbind()
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return scale[0] * kd_sum + scale[1] * ce_sum, kd_sum, ce_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_total: torch.Tensor, *_: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        grads = [
            None if g is None else g.mul_(grad_total).to(dtype)
            for g, dtype in zip(ctx.grads, ctx.dtypes, strict=True)
        ]
        ctx.grads = None
        return (*grads, None, None, None, None)


# --------------------------------------------------------------------------- row losses


@dataclass(frozen=True)
class _Options:
    """The loss options, validated, passed down as one value."""

    divergence: Divergence = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    tail: TailMode = "bucket"


def _chunk_sums(
    logits: torch.Tensor, targets: Targets, labels: torch.Tensor, opts: _Options
) -> torch.Tensor:
    """(2,) fp32 (kd_sum, ce_sum) over every row of one chunk's fp32 ``logits`` (n, V)."""
    rows = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)  # (n,)
    return torch.stack(_distill_sums(logits, targets, labels, rows, opts))


def _distill_sums(
    logits: torch.Tensor,
    targets: Targets | None,
    labels: torch.Tensor | None,
    mask: torch.Tensor,
    opts: _Options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over masked rows of the KD term (times T**2) and of the CE term, from fp32
    ``logits`` (N, V); a term whose targets (or labels) are None is 0.

    Each vocab-sized pass goes through :class:`_StudentLogProbs`, once when the KD and CE
    terms share a temperature of 1 (the CE label is read as one more column).
    """
    kd_sum = ce_sum = logits.new_zeros(())
    label_ids = None if labels is None else torch.where(mask, labels, 0)[:, None]  # (N, 1)
    if targets is not None:
        ids, valid, top = _student_reads(targets, mask, logits.shape[1], opts.tail)
        shared = label_ids is not None and opts.temperature == 1.0
        if shared:
            ids = torch.cat([ids, label_ids], dim=1)  # (N, K + 1)
        z = logits if opts.temperature == 1.0 else logits / opts.temperature  # (N, V)
        log_q, log_q_tail = _StudentLogProbs.apply(z, ids, top)  # (N, J), (N,)
        if shared:
            log_q, label_log_q = log_q[:, :-1], log_q[:, -1]
        rows = _kd_rows(log_q, log_q_tail, targets, valid, mask, opts)  # (N,)
        kd_sum = rows.sum() * opts.temperature**2
    if label_ids is not None:
        if targets is None or opts.temperature != 1.0:
            label_log_q = _StudentLogProbs.apply(logits, label_ids, None)[0][:, 0]  # (N,)
        ce_sum = -torch.where(mask, label_log_q, 0.0).sum()
    return kd_sum, ce_sum


def _student_reads(
    targets: Targets, rows: torch.Tensor, vocab: int, tail: TailMode
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Where the student is read: (N, J) ids with padding sent to id 0, (N, J) which entries
    count, and for bucketed top-k the (N, V) bool set of top-k ids (else None)."""
    weights = targets.weights if isinstance(targets, SampledTargets) else targets.logprobs
    valid = (weights > (0.0 if isinstance(targets, SampledTargets) else _NEG_INF)) & rows[:, None]
    ids = torch.where(valid, targets.ids, 0)  # (N, J)
    if isinstance(targets, SampledTargets) or tail == "renorm":
        return ids, valid, None
    # Padding entries are sent to an extra sink column, which is then cut off.
    sink = torch.where(valid, targets.ids, vocab)  # (N, K)
    top = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool, device=ids.device)
    return ids, valid, top.scatter_(1, sink, True)[:, :vocab]  # (N, V)


def _kd_rows(
    log_q: torch.Tensor,
    log_q_tail: torch.Tensor,
    targets: Targets,
    valid: torch.Tensor,
    rows: torch.Tensor,
    opts: _Options,
) -> torch.Tensor:
    """(N,) per-row divergence from the student's log-probs at the target ids (N, J) and of
    the tail (N,); 0 on rows outside ``rows``."""
    if isinstance(targets, SampledTargets):
        w = torch.where(valid, targets.weights.detach().float(), 0.0)  # (N, S)
        return -(w * log_q).sum(-1)
    lp = torch.where(valid, targets.logprobs.detach().float(), _NEG_INF)  # (N, K)
    if opts.tail == "renorm":
        norm = torch.logsumexp(lp, dim=-1, keepdim=True)  # (N, 1)
        log_p = lp - torch.where(norm > _NEG_INF, norm, 0.0)  # teacher over its top-k
        return _kl(log_p, log_q, valid)
    # K+1 buckets. A row whose top-k lists every vocab id has no tail (log_q_tail = -inf):
    # its cached tail_logmass is then rounding noise and is ignored.
    log_p = torch.cat([lp, targets.tail_logmass.detach().float()[:, None]], dim=1)
    log_q = torch.cat([log_q, log_q_tail[:, None]], dim=1)
    ok = torch.cat([valid, (rows & (log_q_tail > _NEG_INF))[:, None]], dim=1)
    return _divergence(log_p, log_q, ok, opts.divergence, opts.beta)  # (N,)


class _StudentLogProbs(torch.autograd.Function):
    """Student log-softmax read at a few ids, and of the ids outside a set, with a
    hand-written backward.

    forward(z (n, V) fp32, ids (n, J) int64, top (n, V) bool | None) returns log q at ``ids``
    (n, J) and log q of the tail, the ids where ``top`` is False (n,; -inf when ``top`` is
    None or all True). ``top`` must only mark ids that appear in ``ids``. The tail is a
    logsumexp over the ids outside the top-k, not log(1 - sum q), which cancels
    catastrophically when the top-k holds nearly all the mass.

    Autograd's logsumexp / masked_fill / gather would keep a masked copy of the logits and
    build the gradient from several vocab-sized pieces; here only ``z`` and ``top`` are saved
    and the gradient is built in place in one (n, V) buffer, which cut the measured peak of
    loss + backward (tools/bench/loss.py, dense or per chunk) from 25 to 9 bytes per logit.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        z: torch.Tensor,
        ids: torch.Tensor,
        top: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lse = _logsumexp(z)  # (n,)
        tail_lse = torch.full_like(lse, _NEG_INF) if top is None else _logsumexp(z, top)
        ctx.save_for_backward(z, ids, top, lse, tail_lse)
        return z.gather(1, ids) - lse[:, None], tail_lse - lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_ids: torch.Tensor, grad_tail: torch.Tensor
    ) -> tuple[torch.Tensor, None, None]:
        z, ids, top, lse, tail_lse = ctx.saved_tensors
        # d log q_j / dz = onehot(j) - softmax(z), and d log q_tail / dz = tail_softmax(z) -
        # softmax(z), where tail_softmax is the softmax over the tail ids alone (0 elsewhere).
        total = (grad_ids.sum(-1) + grad_tail)[:, None]  # (n, 1) weight of -softmax(z)
        if top is None:
            return (z - lse[:, None]).exp_().mul_(-total).scatter_add_(1, ids, grad_ids), None, None
        # On tail ids softmax = tail_softmax * tail_mass, so one exp shifted by the tail's
        # logsumexp serves both terms there. It may overflow on top-k ids, which masked_fill_
        # overwrites; those few entries are then set from the softmax itself.
        tail_mass = (tail_lse - lse).exp()[:, None]  # (n, 1); 0 for a row without a tail
        shift = torch.where(tail_lse > _NEG_INF, tail_lse, 0.0)[:, None]  # (n, 1)
        grad = (z - shift).exp_().masked_fill_(top, 0.0)  # (n, V) tail_softmax
        grad.mul_(grad_tail[:, None] - total * tail_mass)
        at_top = top.gather(1, ids)  # (n, J)
        top_grad = (z.gather(1, ids) - lse[:, None]).exp_().mul_(-total)  # (n, J)
        grad.scatter_(1, ids, torch.where(at_top, top_grad, grad.gather(1, ids)))
        return grad.scatter_add_(1, ids, grad_ids), None, None


def _logsumexp(z: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """(n,) logsumexp of each row of ``z`` (n, V) over the entries where ``exclude`` is not
    True, with a single (n, V) temporary; -inf for a row with nothing left."""
    masked = z if exclude is None else z.masked_fill(exclude, _NEG_INF)  # (n, V)
    peak = masked.amax(dim=-1, keepdim=True)  # (n, 1)
    peak = torch.where(peak > _NEG_INF, peak, 0.0)  # an empty row sums exp(-inf) = 0
    shifted = z - peak if exclude is None else masked.sub_(peak)  # (n, V)
    return shifted.exp_().sum(-1).log_() + peak.squeeze(-1)


def _divergence(
    log_p: torch.Tensor, log_q: torch.Tensor, ok: torch.Tensor, divergence: Divergence, beta: float
) -> torch.Tensor:
    """(N,) divergence between teacher ``log_p`` and student ``log_q`` over ``ok`` buckets."""
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return _kl(log_p, log_q, ok)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return _kl(log_q, log_p.clamp(min=_LOG_TINY), ok)
    # Buckets that take no part get a finite stand-in so logaddexp's gradient stays finite.
    log_p = torch.where(ok, log_p, 0.0)
    log_q = torch.where(ok, log_q, 0.0)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))  # (N, B)
    return beta * _kl(log_p, log_m, ok) + (1.0 - beta) * _kl(log_q, log_m, ok)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """(N,) sum over ``ok`` entries of a * (log a - log b); entries with a = 0 add exactly 0.

    Excluded entries are replaced before the arithmetic, not after, so that neither the value
    nor the gradient can pick up inf - inf or 0 * inf.
    """
    ok = ok & (log_a > _NEG_INF)
    log_a = torch.where(ok, log_a, 0.0)
    log_b = torch.where(ok, log_b, 0.0)
    return torch.where(ok, log_a.exp() * (log_a - log_b), 0.0).sum(-1)


# --------------------------------------------------------------------------- helpers


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _count(mask: torch.Tensor) -> torch.Tensor:
    """Number of masked rows, at least 1 so an all-masked batch divides 0 by 1."""
    return mask.sum().clamp(min=1)


def _combine(
    kd_sum: torch.Tensor, ce_sum: torch.Tensor, mask: torch.Tensor, alpha: float
) -> DistillLoss:
    count = _count(mask)
    kd, ce = kd_sum / count, ce_sum / count
    total = alpha * kd + (1.0 - alpha) * ce
    return DistillLoss(total, kd.detach(), ce.detach(), mask.sum().detach())


def _take_rows(targets: Targets, index: torch.Tensor | slice) -> Targets:
    if isinstance(targets, TopKTargets):
        return TopKTargets(targets.ids[index], targets.logprobs[index], targets.tail_logmass[index])
    return SampledTargets(targets.ids[index], targets.weights[index])
