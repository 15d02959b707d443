"""The distillation loss from hidden states and the lm_head, a chunk of rows at a time.

:func:`chunked_distill_loss` runs the lm_head matmul chunk by chunk and computes each chunk's
gradients in the forward pass, so the ``(N, V)`` logits never exist at once and nothing is
recomputed; it equals :func:`~logitcache.train.losses.distill_loss` on ``hidden @ W.T + b``
(value and gradients).
"""

from __future__ import annotations

import torch

from .loss_inputs import Targets, check_lm_head, check_options, check_rows, raise_if
from .row_losses import (
    DistillLoss,
    Divergence,
    LossOptions,
    TailMode,
    distill_sums,
    row_count,
    upcast,
)

CHUNK_LOGITS = 2**25
"""Logits per chunk that :func:`auto_chunk_size` aims at: 128 MiB per fp32 ``(n, V)`` buffer."""


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
    gradients (see :class:`ChunkedLoss`), so only one chunk's ``(chunk_size, V)`` logits and
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
    opts = LossOptions(divergence, beta, temperature, tail)

    keep = mask.nonzero().squeeze(1)  # (M,)
    hidden_kept = hidden.index_select(0, keep)  # (M, H)
    rows = (targets[keep], labels.index_select(0, keep))  # M rows each
    count = row_count(mask)
    scale = (alpha / count, (1.0 - alpha) / count)  # d total / d (kd_sum, ce_sum)
    total, kd_sum, ce_sum = ChunkedLoss.apply(
        hidden_kept, lm_head_weight, lm_head_bias, rows, scale, opts, chunk_size
    )
    return DistillLoss(total, kd_sum / count, ce_sum / count, mask.sum().detach())


def auto_chunk_size(vocab: int) -> int:
    """Rows per chunk so that a chunk holds about :data:`CHUNK_LOGITS` logits: 1,024 rows at
    a 32k vocabulary, 256 at 128k, 128 at Gemma's 262k. The loss keeps a few fp32 buffers of
    that size alive, so its peak stays near half a GiB whatever the batch, and chunks stay
    large enough for the matmuls to run at full speed."""
    return max(1, CHUNK_LOGITS // max(vocab, 1))


class ChunkedLoss(torch.autograd.Function):
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
        opts: LossOptions,
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
            logits = upcast(raw).detach().requires_grad_(any(wants))
            with torch.enable_grad():
                part_sums = _chunk_sums(logits, targets[part], labels[part], opts)
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


def _chunk_sums(
    logits: torch.Tensor, targets: Targets, labels: torch.Tensor, opts: LossOptions
) -> torch.Tensor:
    """(2,) fp32 (kd_sum, ce_sum) over every row of one chunk's fp32 ``logits`` (n, V)."""
    rows = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)  # (n,)
    return torch.stack(distill_sums(logits, targets, labels, rows, opts))
