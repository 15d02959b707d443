"""TensorBoard event files: the scalars of metrics.jsonl, written by rank 0 (``log.tensorboard``).

Tags are metrics.jsonl's keys, training ones under ``train/`` (``train/loss``, ``train/lr``,
``train/grad_norm``, ``train/tokens_per_s``, ...) and eval ones as they are (``eval/kl``, ...),
at the same step. A null (a mean over no position) is left out, as the plots do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from logitcache.cache.errors import InputError

TENSORBOARD_NAME = "tensorboard"


def open_writer(output: Path, *, purge_step: int | None) -> Any:
    """A SummaryWriter on ``<output>/tensorboard``. ``purge_step``: on resume, the first step
    the run will log again; readers drop what an interrupted run logged from there on."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise InputError(
            "log.tensorboard needs tensorboard: pip install 'logitcache[tensorboard]' (or set "
            "log.tensorboard false)"
        ) from None
    return SummaryWriter(str(output / TENSORBOARD_NAME), purge_step=purge_step)


def tag(key: str) -> str:
    """The TensorBoard tag of a metrics.jsonl key."""
    return key if key.startswith("eval/") else f"train/{key}"


def write_scalars(writer: Any, record: dict[str, Any]) -> None:
    """Every numeric value of one metrics.jsonl record, at its step."""
    step = record["step"]
    for key, value in record.items():
        if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
            writer.add_scalar(tag(key), value, step)
    writer.flush()
