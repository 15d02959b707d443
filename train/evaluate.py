"""Held-out metrics against the stored teacher targets: KL, CE and top-1 agreement.

* ``kl``: forward KL(teacher ‖ student) per response position, from the stored targets as the
  trainer sees them (top-k: K+1 buckets with the tail mass, or renormalised; sampled: the
  RS-KD cross-entropy estimate, which is KL plus the teacher's entropy), with the student's
  logits divided by ``temperature`` as in the KD term (the targets hold the teacher at its
  capture temperature) but without the KD term's T² factor.
* ``ce``: cross-entropy of the response tokens.
* ``top1``: how often the student's argmax is the teacher's most likely id (top-k: the
  highest stored log-prob; sampled: the most drawn id).

All are means over positions, summed across ranks before dividing. Over zero positions (every
target dropped, or no examples) there is nothing to score, and they are None, never 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .batching import Batch
from .losses import auto_chunk_size, ce_loss, kd_loss
from .row_losses import TailMode

HiddenFn = Callable[[Batch], torch.Tensor]
"""Batch → (N, H) final hidden states at its loss positions."""


@torch.no_grad()
def evaluate(
    batches: Iterable[Batch],
    hidden_fn: HiddenFn,
    lm_head: torch.nn.Module,
    *,
    device: torch.device,
    tail: TailMode = "bucket",
    temperature: float = 1.0,
    chunk_size: int = 0,
    max_batches: int = 0,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float | int | None]:
    """Mean ``kl``, ``ce``, ``top1`` over every loss position of ``batches`` (None when there
    are none), with the counts of ``positions``, ``examples`` and ``dropped_targets``."""
    # kl, ce, top1, positions, examples, dropped targets
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    chunk_size = chunk_size or auto_chunk_size(lm_head.weight.shape[0])
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        batch = batch.to(device)
        sums[4] += len(batch.ids)
        sums[5] += batch.dropped_targets
        hidden = hidden_fn(batch)  # (N, H)
        for start in range(0, batch.num_positions, chunk_size):
            rows = torch.arange(start, min(start + chunk_size, batch.num_positions), device=device)
            logits = lm_head(hidden[rows]).float()  # (n, V)
            targets = batch.targets[rows]
            mask = torch.ones(len(rows), dtype=torch.bool, device=device)
            n = len(rows)
            tempered = logits if temperature == 1.0 else logits / temperature  # (n, V)
            kl = kd_loss(tempered, targets, mask, divergence="forward_kl", tail=tail)
            ce = ce_loss(logits, batch.labels[rows], mask)
            agree = (logits.argmax(dim=-1) == targets.top1()).sum()
            sums[0] += kl.double() * n
            sums[1] += ce.double() * n
            sums[2] += agree.double()
            sums[3] += n
    if all_reduce is not None:
        sums = all_reduce(sums)
    count = float(sums[3])
    return {
        "kl": float(sums[0]) / count if count else None,
        "ce": float(sums[1]) / count if count else None,
        "top1": float(sums[2]) / count if count else None,
        "positions": int(sums[3]),
        "examples": int(sums[4]),
        "dropped_targets": int(sums[5]),
    }
