"""LoRA under `torchrun --nproc-per-node 2` on CPU (gloo): the adapters train and are saved."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from logitcache.train.metrics import read_metrics
from tests.e2e.test_ddp_train import torchrun_train
from tests.train.helpers import capture_dataset

pytest.importorskip("peft")


def test_two_process_ddp_trains_lora_adapters(
    tiny_teacher_dir: Path, tiny_student_dir: Path, tmp_path: Path
) -> None:
    ds = capture_dataset(tiny_teacher_dir, tmp_path / "ds", count=40, shard_positions=120)
    out = tmp_path / "run"
    torchrun_train(ds, tiny_student_dir, out, "--lora.r", "4", "--optim.lr", "1e-2")
    rows = read_metrics(out / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 8))
    assert all(math.isfinite(r["loss"]) and r["examples"] == 8 for r in steps)
    evals = [r for r in rows if "eval/kl" in r]
    assert evals[-1]["eval/kl"] < evals[0]["eval/kl"]
    assert (out / "final" / "adapter_config.json").exists()
    assert not (out / "final" / "config.json").exists()
