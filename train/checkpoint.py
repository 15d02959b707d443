"""Checkpoints: safetensors for tensors, JSON/YAML for everything else; nothing pickled.

A checkpoint is a folder ``checkpoints/step-<8 digits>/`` holding

* ``model.safetensors``      the student's weights (tied weights stored once); a LoRA run
  (``lora.r > 0``) stores ``adapter.safetensors`` instead: its trainable tensors by parameter
  name, the frozen base coming from ``model.path`` again;
* ``optimizer.safetensors``  AdamW's per-parameter tensors, keys ``<param index>.<name>``;
* ``sharded/``               instead of the two above in an FSDP run (``train.parallel=fsdp``):
  model and optimizer as a ``torch.distributed.checkpoint`` folder written by every rank
  (:mod:`logitcache.train.fsdp`);
* ``rng.safetensors``        each rank's torch RNG states (``cpu.rank<R>``, ``cuda.rank<R>``);
* ``state.json``             step, optimizer param groups, the data stream's position, written
  last of the files;
* ``resolved_config.yaml``   the config of the run.

It is assembled under a temporary name and renamed into place, so a folder named ``step-*``
is always complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from logitcache.cache.errors import InputError

from .adapters import load_trainable_state, trainable_state
from .config import Config

CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
STATE_NAME = "state.json"
ADAPTER_NAME = "adapter.safetensors"


def checkpoint_dir(output: str | Path) -> Path:
    return Path(output) / "checkpoints"


def latest_checkpoint(output: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    folder = checkpoint_dir(output)
    if not folder.is_dir():
        return None
    done = [
        p for p in folder.iterdir() if CHECKPOINT_RE.match(p.name) and (p / STATE_NAME).exists()
    ]
    return max(done, key=lambda p: p.name, default=None)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into safetensors-able tensors and JSON-able groups."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, per_param in sd["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    output: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: Config,
    state: dict[str, Any],
    rng: dict[str, torch.Tensor],
    keep: int,
    sharded: Path | None = None,
) -> Path:
    """Write a complete checkpoint for ``step`` (rank 0 only), then prune old ones.
    ``sharded``: the temporary folder every rank already wrote the FSDP model and optimizer to
    (:func:`sharded_tmp`); only the rest is added to it."""
    folder = checkpoint_dir(output)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    opt_meta: dict[str, Any] = {}
    if sharded is not None:
        tmp = sharded
    else:
        tmp = folder / f".tmp-step-{step:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if config.lora.r > 0:
            save_file(trainable_state(model), str(tmp / ADAPTER_NAME))
        else:
            save_model(model, str(tmp / "model.safetensors"))
        tensors, opt_meta = optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
    save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
    config.dump(tmp / "resolved_config.yaml")
    payload = {"step": step, "optimizer": opt_meta, **state}
    (tmp / STATE_NAME).write_text(json.dumps(payload, indent=1, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    done = sorted(p for p in folder.iterdir() if CHECKPOINT_RE.match(p.name))
    # Older checkpoints beyond `keep`, and temp folders of runs killed mid-checkpoint.
    stale = [p for p in folder.iterdir() if p.name.startswith(".tmp-step-")]
    for old in done[:-keep] + stale:
        shutil.rmtree(old, ignore_errors=True)
    return final


def sharded_tmp(output: str | Path, step: int) -> Path:
    """The temporary folder of an FSDP checkpoint: one name that every rank agrees on."""
    return checkpoint_dir(output) / f".tmp-step-{step:08d}-sharded"


def load_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    adapter: bool = False,
    sharded: bool = False,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore model (its trainable tensors only, with ``adapter``) and optimizer in place;
    returns (state.json, rng tensors). ``sharded``: leave model and optimizer to
    :func:`logitcache.train.fsdp.load_sharded`."""
    try:
        state = json.loads((path / STATE_NAME).read_text())
        if sharded:
            rng = load_file(str(path / "rng.safetensors"))
            return state, rng
        if adapter:
            wrong = load_trainable_state(model, load_file(str(path / ADAPTER_NAME)))
            if wrong:
                raise InputError(
                    f"checkpoint {path}: its adapter does not match the run's ({wrong[:5]} on "
                    "one side only); resume with the checkpointed run's lora settings"
                )
            missing, unexpected = [], []
        else:
            missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise InputError(
                f"checkpoint {path}: the student does not match its weights (missing "
                f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}); resume with the "
                "same model.path / model.config as the checkpointed run"
            )
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        load_optimizer(optimizer, opt_tensors, state["optimizer"])
        rng = load_file(str(path / "rng.safetensors"))
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
        raise InputError(
            f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); delete it to resume "
            "from the previous one"
        ) from None
    return state, rng
