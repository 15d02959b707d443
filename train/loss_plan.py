"""The loss configuration resolved once, against the training set, into what each part reads.

``loss.tail`` says what a top-k dataset's tail becomes, and its default ``auto`` depends on the
dataset: its tail draws are trained on when it stores them and the divergence is forward KL,
otherwise the tail is one bucket. :func:`plan_loss` decides it at setup; the loader (whether
training batches carry the draws), the student's loss and the held-out metrics read the
:class:`LossPlan` instead of deciding again, and the run's resolved_config.yaml records
``plan.loss``. Whether the run may train on the dataset so is checked with the run's other
problems, in :mod:`logitcache.train.compat`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from logitcache.cache.format import TargetSpec

from .config import LossConfig


@dataclass(frozen=True)
class LossPlan:
    """The loss settings of one run on one training set, resolved."""

    loss: LossConfig
    """The loss settings with loss.tail resolved (never auto): what the run records."""
    targets: TargetSpec
    """The training set's targets."""
    stored_draws: bool
    """The training set is top-k with tail draws."""
    tail_draws: bool
    """Training batches carry the top-k and its tail draws, as sampled targets (tail=draws)."""
    sampled: bool
    """The training targets reach the loss as sampled targets (a sampled set, or tail draws)."""
    topk_tail: Literal["bucket", "renorm"]
    """How the losses compare top-k targets: always the training set's without draws, and the
    held-out set's, which is scored on its exact top-k and tail mass, never on draws."""


def plan_loss(loss: LossConfig, targets: TargetSpec) -> LossPlan:
    """``loss`` resolved for a training set holding ``targets``: ``tail=auto`` becomes draws
    when the set stores tail draws and the divergence is forward KL, else bucket."""
    stored_draws = targets.tail_draws
    tail = loss.tail
    if tail == "auto":
        tail = "draws" if stored_draws and loss.divergence == "forward_kl" else "bucket"
    return LossPlan(
        loss=replace(loss, tail=tail),
        targets=targets,
        stored_draws=stored_draws,
        tail_draws=tail == "draws",
        sampled=targets.kind == "sampled" or tail == "draws",
        topk_tail="renorm" if tail == "renorm" else "bucket",
    )
