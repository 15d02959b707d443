"""How a student's weights move: AdamW with weight decay on matrices only, a learning rate that
warms up linearly then decays on a cosine, and steps with the global gradient norm clipped.

:func:`~logitcache.train.trainer.train` uses these; so does any loop that must move a student
exactly as it does (the fidelity study's online-KD runs, tools/studies/fidelity/runs.py).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .config import Config, OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Matrices (embeddings, projections) decay by ``weight_decay``; vectors (norms, biases)
    never do. Frozen parameters (a LoRA run's base weights) are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def make_optimizer(
    model: torch.nn.Module, o: OptimConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with optim's betas and eps, at optim.lr until
    :func:`set_lr` moves it."""
    return torch.optim.AdamW(
        param_groups(model, o.weight_decay),
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        foreach=device.type == "cuda",
    )


def lr_at(step: int, cfg: Config, total: int) -> float:
    """Linear warmup to optim.lr, then cosine decay to optim.lr × optim.min_lr_ratio."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(total - o.warmup_steps, 1)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return o.lr * (o.min_lr_ratio + (1.0 - o.min_lr_ratio) * cosine)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The learning rate of every parameter group, for the next step."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def clipped_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, o: OptimConfig
) -> torch.Tensor:
    """Clip the global gradient norm to optim.grad_clip (0: never), step, and drop the
    gradients; returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(
        model.parameters(), o.grad_clip if o.grad_clip > 0 else math.inf
    )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
