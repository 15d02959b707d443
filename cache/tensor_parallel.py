"""A tensor-parallel teacher in process: torchrun ranks in groups, the teacher split over each.

``torchrun --nproc-per-node N -m logitcache.tools.cli build --tp T ...`` makes the N ranks (of
all nodes) into N/T groups of T consecutive ranks; a group stays within a node when T divides
the processes per node. Each group is one data-parallel part of the capture: all its ranks
read the same records, make the same batches and feed the same input ids to the teacher, which
transformers shards over the group with the model's own tensor-parallel plan
(``DistributedConfig(tp_size=T, tp_plan="auto")``, Megatron-style column/row splits of the
attention and MLP projections); the group's first rank writes. The logits every rank gets back
are the whole (gathered) rows, so the targets are computed as in one process.

transformers (5.24) builds its device mesh over the whole world on its default accelerator, so
it shards over T = WORLD_SIZE ranks only; :func:`sharded_loading` hands it a (groups, T) mesh on
``--device``'s kind instead, of which it uses this rank's row, and nothing else changes (one
group: the same mesh as its own).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .capture_config import TeacherConfig
from .errors import InputError
from .ranks import Ranks


@dataclass(frozen=True)
class Groups:
    """This rank's tensor-parallel group: ranks ``[index × tp, (index + 1) × tp)``."""

    tp: int = 1
    rank: int = 0
    world: int = 1

    @property
    def count(self) -> int:
        """Data-parallel groups: the capture's parts per job."""
        return self.world // self.tp

    @property
    def index(self) -> int:
        """This rank's group: the part it captures."""
        return self.rank // self.tp

    @property
    def writes(self) -> bool:
        """The group's first rank writes its shards and journal; the others only compute."""
        return self.rank % self.tp == 0


def tp_groups(cfg: TeacherConfig, ranks: Ranks) -> Groups:
    """The groups of ``--tp`` over these ranks; InputError when ``--tp`` does not fit the launch
    or the teacher (checked before any slow work). vLLM and a served teacher split the teacher
    themselves: every rank is then a group of one."""
    tp, world = cfg.tp, ranks.world
    if tp == 1 or cfg.engine != "hf" or cfg.url is not None:
        return Groups(1, ranks.rank, world)
    if world == 1:
        if sys.argv[1:2] == ["build"]:  # the command line: the same command, under torchrun
            how = "run: torchrun --standalone --nproc-per-node {tp} -m logitcache.tools.cli "
            how = how.format(tp=tp) + shlex.join(sys.argv[1:])
        else:
            how = f"launch it with torchrun --nproc-per-node {tp} (or a multiple of {tp})"
        raise InputError(
            f"--tp {tp} splits the teacher over {tp} processes, but this is one process "
            f"(no torchrun); {how}; or drop --tp to load the whole teacher in this process"
        )
    if world % tp:
        fits = ", ".join(str(d) for d in range(1, world + 1) if world % d == 0)
        raise InputError(
            f"--tp {tp} does not divide the {world} processes torchrun started (WORLD_SIZE "
            f"{world}): groups of --tp ranks must cover them all; pass a --tp that divides "
            f"{world} ({fits}), or start a multiple of {tp} processes"
        )
    check_tp_teacher(cfg)
    return Groups(tp, ranks.rank, world)


def check_tp_teacher(cfg: TeacherConfig) -> None:
    """Refuse a teacher that transformers cannot split ``cfg.tp`` ways: no tensor-parallel plan
    for its architecture, or attention heads that do not divide evenly."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            cfg.path, local_files_only=True, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise InputError(f"--teacher {cfg.path}: cannot read its config.json ({e})") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text, "base_model_tp_plan", None):
        raise InputError(
            f"--tp {cfg.tp}: the teacher {cfg.path} ({getattr(config, 'model_type', '?')}) has "
            "no tensor-parallel plan in transformers (its config class defines no "
            "base_model_tp_plan); drop --tp, so that each process loads the whole teacher "
            "(data parallel), or add a base_model_tp_plan to the folder's config.json "
            "(transformers' tensor-parallel docs list the styles)"
        )
    heads = {
        "attention heads": getattr(text, "num_attention_heads", None),
        "key/value heads": getattr(text, "num_key_value_heads", None),
    }
    uneven = {name: n for name, n in heads.items() if isinstance(n, int) and n % cfg.tp}
    if uneven:
        shown = ", ".join(f"{n} {name}" for name, n in uneven.items())
        counts = [n for n in heads.values() if isinstance(n, int)]
        fits = [d for d in range(1, min(counts) + 1) if all(n % d == 0 for n in counts)]
        raise InputError(
            f"--tp {cfg.tp}: the teacher {cfg.path} has {shown}, which tensor parallelism "
            f"cannot split {cfg.tp} ways; pass a --tp that divides its head counts "
            f"({', '.join(map(str, fits))})"
        )


@contextmanager
def sharded_loading(tp: int, device: torch.device) -> Iterator[dict[str, Any]]:
    """``from_pretrained`` keyword arguments that shard the model over this rank's group of
    ``tp`` ranks, valid inside the ``with`` block (the process group must exist)."""
    import transformers

    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        raise InputError(
            f"--tp needs transformers' DistributedConfig (tensor-parallel loading), which the "
            f"installed transformers {transformers.__version__} lacks; pip install -U "
            "'transformers>=5.24'"
        ) from None
    kwargs = {"distributed_config": DistributedConfig(tp_size=tp, tp_plan="auto")}
    world = torch.distributed.get_world_size()
    try:
        import transformers.distributed.mixin as mixin
        from transformers.distributed.utils import TransformersDeviceMesh
    except ImportError:
        mixin = None
    if mixin is None or not hasattr(mixin, "initialize_distributed_mesh"):
        if world == tp:  # one group: transformers' own mesh over every rank
            yield kwargs
            return
        raise InputError(
            f"--tp {tp} under {world} processes needs several tensor-parallel groups, which "
            f"this code builds on transformers 5.24's device mesh; the installed transformers "
            f"{transformers.__version__} has another: start --nproc-per-node {tp} (one group), "
            "or pip install 'transformers==5.24.*'"
        )

    def group_mesh(config: Any) -> tuple[torch.device, Any]:
        # The dimensions transformers names, with the groups on dp_replicate: the model takes
        # its mesh as ("pp", "fsdp", "tp"), i.e. this rank's row, and never reduces across rows.
        groups = world // tp
        init = torch.distributed.init_device_mesh
        dense = init(device.type, (1, groups, 1, tp), mesh_dim_names=_DENSE)
        expert = init(device.type, (1, groups, tp, 1), mesh_dim_names=_EXPERT)
        return device, TransformersDeviceMesh(dense, expert)

    saved = mixin.initialize_distributed_mesh
    mixin.initialize_distributed_mesh = group_mesh
    try:
        yield kwargs
    finally:
        mixin.initialize_distributed_mesh = saved


_DENSE = ("pp", "dp_replicate", "fsdp", "tp")
_EXPERT = ("pp", "dp_replicate", "efsdp", "ep")
