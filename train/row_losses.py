"""The per-row math every distillation loss shares: from fp32 student logits ``(N, V)`` and
the loss inputs to sums of the KD term and of the CE term over the rows that count.

The student's log-softmax is read only at the target ids and, for bucketed top-k, over the
ids outside the top-k (:class:`StudentLogProbs`, one vocab-sized pass with a hand-written
backward). The KD term per row is then, by the kind of targets (:func:`_kd_rows`, the one place
a loss tells them apart): the sampled (RS-KD) estimator ``-sum_j w_j log q_j``; forward KL to
the teacher renormalised over its top-k; or a divergence over the K ids plus one tail bucket
(:func:`_divergence`). :mod:`logitcache.train.losses` and :mod:`logitcache.train.chunked` turn
the sums into means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .loss_inputs import SampledTargets, Targets, TopKTargets

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
TailMode = Literal["bucket", "renorm"]

# Reverse KL floors the teacher's log-probs at the smallest normal float32. A cached
# tail_logmass of -inf is usually rounding (the top-k summed to 1 in fp32), and an unfloored
# log 0 would make KL(q||p) infinite as soon as the student puts any mass outside the top-k.
_LOG_TINY = math.log(torch.finfo(torch.float32).tiny)
_NEG_INF = float("-inf")


@dataclass(frozen=True)
class LossOptions:
    """The loss options, validated, passed down as one value."""

    divergence: Divergence = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    tail: TailMode = "bucket"


@dataclass(frozen=True)
class DistillLoss:
    """What a distillation loss returns: the loss to backpropagate and its detached parts.

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


def upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def row_count(mask: torch.Tensor) -> torch.Tensor:
    """Number of masked rows, at least 1 so an all-masked batch divides 0 by 1."""
    return mask.sum().clamp(min=1)


def combine(
    kd_sum: torch.Tensor, ce_sum: torch.Tensor, mask: torch.Tensor, alpha: float
) -> DistillLoss:
    """The sums as means over the masked rows, and ``alpha * kd + (1 - alpha) * ce``."""
    count = row_count(mask)
    kd, ce = kd_sum / count, ce_sum / count
    total = alpha * kd + (1.0 - alpha) * ce
    return DistillLoss(total, kd.detach(), ce.detach(), mask.sum().detach())


def distill_sums(
    logits: torch.Tensor,
    targets: Targets | None,
    labels: torch.Tensor | None,
    mask: torch.Tensor,
    opts: LossOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over masked rows of the KD term (times T**2) and of the CE term, from fp32
    ``logits`` (N, V); a term whose targets (or labels) are None is 0.

    Each vocab-sized pass goes through :class:`StudentLogProbs`, once when the KD and CE
    terms share a temperature of 1 (the CE label is read as one more column).
    """
    kd_sum = ce_sum = logits.new_zeros(())
    label_ids = None if labels is None else torch.where(mask, labels, 0)[:, None]  # (N, 1)
    label_log_q = None
    if targets is not None:
        shared = label_ids if opts.temperature == 1.0 else None
        z = logits if opts.temperature == 1.0 else logits / opts.temperature  # (N, V)
        rows, label_log_q = _kd_rows(z, targets, mask, opts, shared)  # (N,)
        kd_sum = rows.sum() * opts.temperature**2
    if label_ids is not None:
        if label_log_q is None:
            label_log_q = StudentLogProbs.apply(logits, label_ids, None)[0][:, 0]  # (N,)
        ce_sum = -torch.where(mask, label_log_q, 0.0).sum()
    return kd_sum, ce_sum


def _kd_rows(
    z: torch.Tensor,
    targets: Targets,
    rows: torch.Tensor,
    opts: LossOptions,
    extra_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N,) the KD term of each row of tempered logits ``z`` (N, V), 0 outside ``rows``; and
    the student's log-probs at ``extra_ids`` (N, 1), read in the same pass (None without).

    This is the one place a loss tells the kinds of targets apart."""
    valid = targets.counted() & rows[:, None]  # (N, J)
    ids = torch.where(valid, targets.ids, 0)  # (N, J), padding read at id 0
    if isinstance(targets, SampledTargets):
        log_q, _, extra = _read(z, ids, None, extra_ids)
        w = torch.where(valid, targets.weights.detach().float(), 0.0)  # (N, S)
        return -(w * log_q).sum(-1), extra
    if opts.tail == "renorm":
        log_q, _, extra = _read(z, ids, None, extra_ids)
        return _renorm_rows(log_q, targets, valid), extra
    log_q, log_q_tail, extra = _read(z, ids, _top_set(targets, valid, z.shape[1]), extra_ids)
    return _bucket_rows(log_q, log_q_tail, targets, valid, rows, opts), extra


def _read(
    z: torch.Tensor, ids: torch.Tensor, top: torch.Tensor | None, extra_ids: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:class:`StudentLogProbs` at ``ids`` (N, J), with ``extra_ids`` (N, 1) as one more
    column: (log q at ids, log q of the tail, log q at the extra ids (N,) or None)."""
    if extra_ids is not None:
        ids = torch.cat([ids, extra_ids], dim=1)  # (N, J + 1)
    log_q, log_q_tail = StudentLogProbs.apply(z, ids, top)  # (N, J'), (N,)
    if extra_ids is None:
        return log_q, log_q_tail, None
    return log_q[:, :-1], log_q_tail, log_q[:, -1]


def _top_set(targets: TopKTargets, valid: torch.Tensor, vocab: int) -> torch.Tensor:
    """(N, V) bool: the top-k ids of each row (padding entries marked nowhere)."""
    # Padding entries are sent to an extra sink column, which is then cut off.
    sink = torch.where(valid, targets.ids, vocab)  # (N, K)
    top = torch.zeros(sink.shape[0], vocab + 1, dtype=torch.bool, device=sink.device)
    return top.scatter_(1, sink, True)[:, :vocab]  # (N, V)


def _renorm_rows(log_q: torch.Tensor, targets: TopKTargets, valid: torch.Tensor) -> torch.Tensor:
    """(N,) forward KL from the teacher renormalised over its top-k to the student's full
    softmax read at the top-k ids."""
    lp = torch.where(valid, targets.logprobs.detach().float(), _NEG_INF)  # (N, K)
    norm = torch.logsumexp(lp, dim=-1, keepdim=True)  # (N, 1)
    log_p = lp - torch.where(norm > _NEG_INF, norm, 0.0)  # teacher over its top-k
    return _kl(log_p, log_q, valid)


def _bucket_rows(
    log_q: torch.Tensor,
    log_q_tail: torch.Tensor,
    targets: TopKTargets,
    valid: torch.Tensor,
    rows: torch.Tensor,
    opts: LossOptions,
) -> torch.Tensor:
    """(N,) divergence over K+1 buckets: the top-k ids and the rest of the vocabulary."""
    lp = torch.where(valid, targets.logprobs.detach().float(), _NEG_INF)  # (N, K)
    # A row whose top-k lists every vocab id has no tail (log_q_tail = -inf): its cached
    # tail_logmass is then rounding noise and is ignored.
    log_p = torch.cat([lp, targets.tail_logmass.detach().float()[:, None]], dim=1)
    log_q = torch.cat([log_q, log_q_tail[:, None]], dim=1)
    ok = torch.cat([valid, (rows & (log_q_tail > _NEG_INF))[:, None]], dim=1)
    return _divergence(log_p, log_q, ok, opts.divergence, opts.beta)  # (N,)


class StudentLogProbs(torch.autograd.Function):
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
