"""What may change on ``--resume``, and how long a resumed run is.

A resumed run must keep its config, except for settings that do not change its numbers (logging,
eval, checkpoints) and those that reshape it as the number of ranks may (reader workers,
gradient accumulation): the data is then carried over onto the new reader slots
(:mod:`logitcache.train.reslot`) and a ``train.epochs`` run's steps are counted again.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from logitcache.cache.errors import InputError
from logitcache.cache.format import counted

from .config import Config
from .epochs import micro_batches, steps_for
from .stream import StreamLoader
from .student import Dist

RESUMABLE_CHANGES = {
    "train.stop_after",
    "loss.allow_temperature_mismatch",
    "data.prefetch",
    "data.cache_dir",
    "data.verify",
    "log.progress",
    "log.tensorboard",
    "lora.merge",
    "log.plot",
    "log.eval_every",
    "log.eval_batches",
    "log.checkpoint_every",
    "log.keep_checkpoints",
}
"""Config keys that may differ on --resume without changing the run's numbers."""

RESHAPING_CHANGES = {"data.num_workers", "optim.grad_accum"}
"""Config keys that may differ on --resume as the number of ranks may: the data is carried over
onto the new reader slots (:mod:`logitcache.train.reslot`) and the step count is redone."""


def check_resumable(saved: dict[str, Any], cfg: Config, where: Path) -> None:
    """Refuse a resume whose config differs from the checkpoint's ``saved`` one in anything
    but :data:`RESUMABLE_CHANGES` and :data:`RESHAPING_CHANGES`."""
    now, default = cfg.to_dict(), Config().to_dict()
    # A key the checkpoint lacks (saved before it existed) held its default.
    changed = [
        f"{s}.{k}: {saved.get(s, {}).get(k, default[s][k])!r} → {v!r}"
        for s, fields_ in now.items()
        for k, v in fields_.items()
        if f"{s}.{k}" not in RESUMABLE_CHANGES | RESHAPING_CHANGES
        and saved.get(s, {}).get(k, default[s][k]) != v
    ]
    if changed:
        raise InputError(
            f"--resume: the config differs from the checkpoint's ({where}) in "
            + "; ".join(changed)
            + ". Resume with the original config (only logging, eval and checkpoint settings, "
            "train.stop_after, the number of ranks, data.num_workers and optim.grad_accum may "
            "change), or start a new run in another train.output"
        )


def resumed_steps(
    cfg: Config, saved: dict[str, Any], loader: StreamLoader, dist: Dist, step: int
) -> int:
    """The run's steps once resumed at ``step``: train.steps, or ``step`` plus what every rank
    has left of train.epochs (equal to the whole run's count when nothing changed; counted
    from the loaded position only, not from the start as well). On other ranks, workers or
    grad_accum, rank 0 says what that means for the data."""
    steps = cfg.train.steps or step + steps_for(
        dist.gather(micro_batches(loader)), cfg.optim.grad_accum
    )
    accum = saved.get("optim", {}).get("grad_accum", Config().optim.grad_accum)
    if not dist.main or (loader.resumed_from is None and accum == cfg.optim.grad_accum):
        return steps
    what = []
    if loader.resumed_from is not None:
        (ranks, slots), carry = loader.resumed_from, loader.stream.carry
        if slots == loader.num_slots:
            how = "each slot continues where it stood"
        elif carry is not None and carry.last >= carry.first:
            epochs = f"{carry.first}" + (f"-{carry.last}" if carry.last > carry.first else "")
            how = f"the rest of epoch{'s' * (carry.last > carry.first)} {epochs} is spread over the new slots"
        else:
            how = "the next epoch is laid out for the new slots"
        if not cfg.train.steps and steps == step:
            how = "no data is left to train on"
        workers = saved.get("data", {}).get("num_workers", Config().data.num_workers)
        what.append(
            f"the checkpointed run read its data on {_slots(slots, ranks, workers)} and this "
            f"one on {_slots(loader.num_slots, dist.world, cfg.data.num_workers)}: {how}, so "
            "each example is still trained once per epoch, in other batches than an "
            "uninterrupted run's"
        )
    if accum != cfg.optim.grad_accum:
        what.append(f"optim.grad_accum {accum} → {cfg.optim.grad_accum}")
    print(f"--resume at step {step}: {'; '.join(what)}; {steps} steps in all", file=sys.stderr)
    return steps


def _slots(slots: int, ranks: int, workers: int) -> str:
    """'2 reader slots (2 ranks, data.num_workers 0)'."""
    return f"{counted(slots, 'reader slot')} ({counted(ranks, 'rank')}, data.num_workers {workers})"
