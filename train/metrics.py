"""metrics.jsonl: one JSON record per step and eval, kept exactly once across resumes, and its
loss curves as a PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from logitcache.cache.errors import InputError
from logitcache.cache.paths import make_parents


def kl_label(sampled: bool) -> str:
    """The name of an eval's ``kl`` wherever it is shown. On sampled held-out targets
    (``sampled``) it is the cross-entropy to the teacher's draws: the KL plus the teacher's
    entropy, and named so (docs/TRAINING.md)."""
    return "KL + teacher entropy" if sampled else "KL"


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_jsonl(path: Path, step: int) -> None:
    """Drop records after ``step``: an interrupted run logged steps its resume will redo."""
    if not path.exists():
        return
    keep = [
        line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in keep))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def plot_metrics(metrics: str | Path, png: str | Path) -> None:
    """Loss curves (train loss, KD, CE; eval KL) from a metrics.jsonl."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'logitcache[plot]'") from None
    rows = read_metrics(metrics)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval/kl" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))

    def values(rows: list[dict[str, Any]], key: str) -> list[float]:
        return [math.nan if r[key] is None else r[key] for r in rows]  # null: nothing to score

    for key in ("loss", "kd", "ce"):
        axes[0].plot([r["step"] for r in train_rows], values(train_rows, key), label=key)
    axes[0].set(xlabel="step", title="training (per step)")
    axes[0].legend()
    for key in ("eval/kl", "eval/ce"):
        axes[1].plot([r["step"] for r in eval_rows], values(eval_rows, key), marker="o", label=key)
    axes[1].set(xlabel="step", title="held-out")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(make_parents(png), dpi=100)
    plt.close(fig)
