"""This process's place in a torchrun job, and the few collectives capture and training use.

Without torchrun a process is rank 0 of 1 and every collective returns its input. Capture and
training share this one helper; each picks its device itself (``--device`` vs
``train.device``) and hands it to :meth:`Ranks.start`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch

from .errors import InputError

_CPU = torch.device("cpu")


@dataclass(frozen=True)
class Ranks:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world: int = 1
    device: torch.device = _CPU
    """Where this rank computes (and where nccl reduces)."""
    owns_group: bool = False
    """True when :meth:`start` created the process group (and :meth:`close` destroys it)."""
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        """RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them (0, 1, 0 without it)."""
        env = os.environ
        try:
            return cls(
                rank=int(env.get("RANK", "0")),
                world=int(env.get("WORLD_SIZE", "1")),
                local_rank=int(env.get("LOCAL_RANK", "0")),
            )
        except ValueError as e:
            raise InputError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({e})") from None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def start(self, device: torch.device, timeout: timedelta | None = None) -> Ranks:
        """These ranks on ``device``, in the process group (nccl on GPU, gloo on CPU), which is
        created unless there is one rank or a group exists already. ``timeout`` bounds every
        collective (None: torch's default)."""
        owns = self.world > 1 and not torch.distributed.is_initialized()
        if owns:
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            torch.distributed.init_process_group(backend, timeout=timeout)
        return replace(self, device=device, owns_group=owns)

    def close(self) -> None:
        """Destroy the process group if :meth:`start` created it."""
        if self.owns_group:
            torch.distributed.destroy_process_group()

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of ``t`` over ranks, in place; returns ``t``."""
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t

    def sum_values(self, values: list[float]) -> list[float]:
        """Element-wise sum of plain numbers over ranks, in fp64."""
        if self.world == 1:
            return values
        # nccl reduces GPU tensors only, gloo CPU ones (the group may not be ours).
        on = self.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=on)
        torch.distributed.all_reduce(t)
        return t.cpu().tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out
