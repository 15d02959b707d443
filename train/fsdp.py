"""FSDP2 (``train.parallel=fsdp``): the student's weights, gradients and AdamW state sharded
over the ranks, for students larger than one card.

Each decoder layer is its own ``fully_shard`` group; the root group is the whole
:class:`~logitcache.train.student.DistillStudent`, so the embeddings, the final norm and the
lm_head stay together in it. The chunked loss runs inside ``DistillStudent.forward``, i.e.
while the root group is unsharded: ``head.weight`` there is the full ``(V, H)`` tensor, not a
DTensor shard, and its gradient is reduce-scattered by FSDP after backward like any other.
Outside forward (eval) :func:`unsharded` gathers the root group around the call.

Checkpoints hold the sharded model and optimizer as a ``torch.distributed.checkpoint`` folder
(``sharded/``) written by every rank; the final student is gathered to rank 0 once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

SHARDED_NAME = "sharded"


def shard_student(student: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``fully_shard`` each decoder layer, then the whole student (the root group), and give
    each rank its shards of rank 0's weights on ``device``. On GPU the weights compute in bf16
    and gradients reduce in fp32; on CPU everything stays fp32.

    Rank 0 holds the student's weights on the host; every other rank holds it on the meta
    device (no memory). After sharding, each rank allocates only its shards on ``device`` and
    receives them from rank 0 (``set_model_state_dict`` with ``broadcast_from_rank0``, as
    PyTorch's FSDP2 guide loads a checkpoint); buffers (rotary tables, which no state dict
    holds) are broadcast too. So a node holds one whole copy of the student, not one per rank.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    main = dist.get_rank() == 0
    full = student.state_dict() if main else {}  # rank 0's tensors, kept alive past sharding
    buffers = {name: b.detach().clone() for name, b in student.named_buffers()} if main else {}
    _fully_shard(student, device)
    student.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(student, full, options=options)
    for name, b in student.named_buffers():
        if main:
            b.copy_(buffers[name])
        dist.broadcast(b, src=0)
    return student


def _fully_shard(student: torch.nn.Module, device: torch.device) -> None:
    """Each decoder layer its own group, then the root; bf16 compute on GPU."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()
    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layers = getattr(student.model.get_decoder(), "layers", None)
    assert layers is not None, "train.parallel=fsdp: the decoder has no .layers"
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(student, mp_policy=mp)


@contextlib.contextmanager
def unsharded(module: torch.nn.Module) -> Iterator[None]:
    """The root group's full weights (embeddings, norm, lm_head) for calls outside forward."""
    # Before the first forward (the step-0 eval) the root must be initialised as the root, or
    # the layers' own forwards would each claim to be one; unshard() does not do it (torch 2.13).
    module._get_fsdp_state()._lazy_init()  # type: ignore[operator]
    module.unshard()  # type: ignore[operator]
    try:
        yield
    finally:
        module.reshard()  # type: ignore[operator]


def save_sharded(folder: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the model and optimizer to ``folder/sharded``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(module, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder / SHARDED_NAME))


def load_sharded(folder: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore the model and optimizer from ``folder/sharded`` (any world size: DCP reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(module, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(folder / SHARDED_NAME))
    set_state_dict(
        module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )


def full_model_state(module: torch.nn.Module) -> dict[str, Any]:
    """The student's full weights on rank 0's CPU (empty elsewhere); a collective. Keys as the
    bare model's (``DistillStudent.model.`` stripped), for ``save_pretrained``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(module, options=options)
    # Tied weights (lm_head = embeddings) come back as two copies; keep the first name only,
    # as save_pretrained does for the shared tensor of an unsharded model.
    first: dict[int, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
    keep = set(first.values()) | {name for name, _ in module.named_buffers()}
    return {k.removeprefix("model."): v for k, v in sd.items() if k in keep}
