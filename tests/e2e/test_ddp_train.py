"""`torchrun --nproc-per-node 2` on CPU (gloo): each epoch, every example exactly once, and
an interrupted run resumes onto the uninterrupted run's losses."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from logitcache.train.metrics import read_metrics
from tests.train.helpers import capture_dataset


def torchrun_train(ds: Path, student: Path, out: Path, *extra: str, nproc: int = 2) -> str:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
        "-m", "logitcache.tools.cli", "train",
        "--data.train", str(ds),
        "--data.eval", str(ds),
        "--model.path", str(student),
        "--train.output", str(out),
        "--data.batch_size", "4",
        "--data.shuffle_buffer", "8",
        "--train.steps", "7",
        "--log.progress", "false",
        *extra,
    ]  # fmt: skip
    return run(cmd)


def run(cmd: list[str]) -> str:
    """Run ``cmd`` with this venv's commands (torchrun, logitcache) on the PATH; its stdout."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": path}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_two_process_ddp_sees_every_example_once_per_epoch(
    tiny_teacher_dir: Path, tiny_student_dir: Path, tmp_path: Path
) -> None:
    ds = capture_dataset(tiny_teacher_dir, tmp_path / "ds", count=40, shard_positions=120)
    out = tmp_path / "run"
    torchrun_train(ds, tiny_student_dir, out, "--log.example_ids", "true")

    seen: dict[int, list[str]] = {}
    for rank in (0, 1):
        for line in (out / f"examples-rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            seen.setdefault(rec["epoch"], []).extend(rec["ids"])
    # 40 examples, 2 ranks × 4 per micro-batch: epoch 0 is steps 1-5; steps 6-7 are epoch 1.
    assert sorted(seen[0]) == sorted(f"ex{i}" for i in range(40))
    assert len(seen[1]) == len(set(seen[1])) == 2 * 2 * 4
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 8))
    assert all(r["examples"] == 8 for r in steps)  # both ranks' micro-batches counted
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval/kl" in r]
    assert evals[0]["eval/positions"] == sum(r["positions"] for r in steps[:5])  # whole set, once
    assert (out / "final" / "config.json").exists()


def test_two_process_ddp_resume_reproduces_the_uninterrupted_losses(
    tiny_teacher_dir: Path, tiny_student_dir: Path, tmp_path: Path
) -> None:
    ds = capture_dataset(tiny_teacher_dir, tmp_path / "ds", count=40, shard_positions=120)
    every = ("--log.checkpoint_every", "3", "--log.eval_every", "3")
    torchrun_train(ds, tiny_student_dir, tmp_path / "a", *every)
    # Stopped after step 5, mid-epoch (an epoch is 5 steps of 8); the checkpoint is step 3.
    torchrun_train(ds, tiny_student_dir, tmp_path / "b", *every, "--train.stop_after", "5")
    assert not (tmp_path / "b" / "final").exists()
    torchrun_train(ds, tiny_student_dir, tmp_path / "b", *every, "--resume")
    keys = ("step", "loss", "kd", "ce", "grad_norm", "lr", "positions", "epoch", "eval/kl")

    def losses(run: str) -> list[dict]:
        records = read_metrics(tmp_path / run / "metrics.jsonl")
        return [{k: r[k] for k in keys if k in r} for r in records]

    assert [r["step"] for r in losses("a") if "loss" in r] == list(range(1, 8))
    assert losses("a") == losses("b")  # bit for bit, across both ranks' all-reduces


@pytest.mark.parametrize(
    "workers,how",
    [
        ("0", "2 reader slots (2 ranks, data.num_workers 0) and this one on 1 reader slot "
         "(1 rank, data.num_workers 0): the rest of epoch 0 is spread over the new slots"),
        ("2", "2 reader slots (2 ranks, data.num_workers 0) and this one on 2 reader slots "
         "(1 rank, data.num_workers 2): each slot continues where it stood"),
    ],
)  # fmt: skip
def test_resumed_on_one_process_each_example_is_trained_once_per_epoch(
    tiny_teacher_dir: Path, tiny_student_dir: Path, tmp_path: Path, workers: str, how: str
) -> None:
    ds = capture_dataset(tiny_teacher_dir, tmp_path / "ds", count=40, shard_positions=120)
    out = tmp_path / "run"
    epochs = ("--train.steps", "0", "--train.epochs", "2", "--log.example_ids", "true")
    # 2 ranks × 4 examples a step: 5 steps an epoch. Stopped after step 3, checkpoint at 2.
    every = ("--log.checkpoint_every", "2", "--log.eval_every", "0")
    torchrun_train(ds, tiny_student_dir, out, *epochs, *every, "--train.stop_after", "3")
    one = [
        sys.executable, "-m", "logitcache.tools.cli", "train", "--config",
        str(out / "resolved_config.yaml"), "--resume", "--data.num_workers", workers,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(one, capture_output=True, text=True, env=env, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The rest of epoch 0 (24 examples) and epoch 1 (40) on 1 rank, batches of 4: 6 and 10
    # micro-batches (on 2 slots: 3 + 3 and 5 + 5), so 16 more steps.
    message = f"--resume at step 2: the checkpointed run read its data on {how}, so each"
    assert message in proc.stderr
    assert "18 steps in all" in proc.stderr
    assert proc.stdout.strip().endswith(f"done: 18 steps; student saved to {out}/final")
    seen: dict[int, Counter[str]] = {0: Counter(), 1: Counter()}
    for rank in (0, 1):  # rank 1's records after step 2 were dropped on resume
        for line in (out / f"examples-rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            seen[rec["epoch"]].update(rec["ids"])
    everyone = Counter(f"ex{i}" for i in range(40))
    assert seen == {0: everyone, 1: everyone}
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 19))


def test_two_process_epochs_run_with_uneven_ranks_resumes_as_it_advises(
    tiny_teacher_dir: Path, tiny_student_dir: Path, tmp_path: Path
) -> None:
    # 41 examples: ranks read 20 and 21, i.e. 5 and 6 micro-batches of 4 an epoch. Two epochs
    # at grad_accum 2 are 5 steps for rank 0 and 6 for rank 1: rank 0 idles through step 6.
    ds = capture_dataset(tiny_teacher_dir, tmp_path / "ds", count=41, shard_positions=120)
    out = tmp_path / "run"
    epochs = ("--train.steps", "0", "--train.epochs", "2", "--optim.grad_accum", "2")
    logs = ("--log.example_ids", "true", "--log.checkpoint_every", "2")
    cut = torchrun_train(ds, tiny_student_dir, out, *epochs, *logs, "--train.stop_after", "3")
    advice = cut.strip().splitlines()[-1]  # rank 0 alone prints it
    assert advice.startswith("stopped at step 3 of 6 (train.stop_after); to continue, run: ")
    command = shlex.split(advice.rsplit("to continue, run: ", 1)[1])
    assert command[:4] == ["torchrun", "--standalone", "--nproc-per-node", "2"]
    assert run(command).strip().splitlines()[-1] == f"done: 6 steps; student saved to {out}/final"

    per_epoch: dict[int, Counter[str]] = {0: Counter(), 1: Counter()}
    for rank in (0, 1):
        for line in (out / f"examples-rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            per_epoch[rec["epoch"]].update(rec["ids"])
    everyone = Counter(f"ex{i}" for i in range(41))
    assert per_epoch[0] == everyone and per_epoch[1] == everyone
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    # Each rank's epoch ends with a short batch (rank 1: 1 example); in step 6 only rank 1 trains.
    assert [r["examples"] for r in steps] == [16, 16, 13, 16, 16, 5]
    assert all(r["positions"] > 0 for r in steps)
