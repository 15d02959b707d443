"""Distillation losses against cached teacher targets: the public API, dense and chunked.

The trainer flattens the loss positions of a batch into ``N`` rows; every function here takes
student logits ``(N, V)`` (or the hidden states and lm_head that produce them), teacher targets
read from the cache, and an explicit boolean ``mask`` ``(N,)`` of the rows that count. Losses
are means over masked rows, computed in float32 whatever the input dtype, and an all-masked
batch gives 0 with a zero (finite) gradient.

Two kinds of cached targets (:mod:`logitcache.train.loss_inputs`):

* :class:`TopKTargets` - the teacher's top-k ids with their log-probs under the teacher's
  *full-vocabulary* softmax, plus the log of the mass left outside the top-k. With
  ``tail="bucket"`` (default) both distributions are compared over ``K + 1`` buckets: the K ids
  and one "everything else" bucket. With K = V this is exactly the full-vocabulary divergence.
  ``tail="renorm"`` renormalises the teacher over its top-k and drops the tail (the common,
  biased form; forward KL only).
* :class:`SampledTargets` - RS-KD style: ids drawn from the teacher with their empirical
  frequencies. Only forward KL has an unbiased estimator from samples (see :func:`kd_loss`).

:func:`chunked_distill_loss` (:mod:`logitcache.train.chunked`) takes hidden states and the
lm_head instead of logits and never holds the ``(N, V)`` logits at once; it equals
:func:`distill_loss` on ``hidden @ W.T + b`` (value and gradients). The per-row math both
share is in :mod:`logitcache.train.row_losses`.
"""

from __future__ import annotations

import torch

from .chunked import auto_chunk_size, chunked_distill_loss
from .loss_inputs import (
    DIVERGENCES,
    TAIL_MODES,
    SampledTargets,
    Targets,
    TopKTargets,
    check_options,
    check_student,
    raise_if,
)
from .row_losses import (
    DistillLoss,
    Divergence,
    LossOptions,
    TailMode,
    combine,
    distill_sums,
    row_count,
    upcast,
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
    opts = LossOptions(divergence, beta, temperature, tail)
    kd_sum, _ = distill_sums(upcast(student_logits), targets, None, mask, opts)
    return kd_sum / row_count(mask)


def ce_loss(student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``labels`` (N,) int64 over rows where ``mask`` (N,) is True.

    Labels of masked-out rows are never read, so they may hold an ignore value such as -100.
    """
    raise_if(check_student(student_logits, None, labels, mask))
    _, ce_sum = distill_sums(upcast(student_logits), None, labels, mask, LossOptions())
    return ce_sum / row_count(mask)


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
    opts = LossOptions(divergence, beta, temperature, tail)
    kd_sum, ce_sum = distill_sums(upcast(student_logits), targets, labels, mask, opts)
    return combine(kd_sum, ce_sum, mask, alpha)
