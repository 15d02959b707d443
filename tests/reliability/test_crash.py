"""SIGKILL in the middle of `logitcache build` and `logitcache train`, then rerun / --resume.

Slow (real subprocesses, each importing torch and transformers); more trials and the figures:
`python -m logitcache.tools.reliability capture-crash` and `... train-crash`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from logitcache.tools.reliability.crashes import (
    after_shards,
    build_command,
    capture_state,
    compare_capture,
    logged_steps,
    run_killed,
    run_rank_killed,
    run_to_end,
    torchrun_build_command,
    train_command,
    train_losses,
    write_prompts,
)

pytestmark = pytest.mark.slow


def test_killed_capture_rerun_holds_every_example_once(tmp_path: Path, tiny_teacher_dir) -> None:
    prompts = write_prompts(tmp_path / "prompts.jsonl", 300)
    reference = tmp_path / "reference"
    first: list[float] = []
    t0 = time.perf_counter()

    def note_first_commit() -> bool:
        if not first and (reference / "_parts" / "r00000.json").exists():
            first.append(time.perf_counter() - t0)
        return False

    total = run_killed(build_command(tiny_teacher_dir, prompts, reference), note_first_commit)[1]
    assert first, "the reference run committed nothing before it finished"
    rng = np.random.default_rng(0)
    for trial in range(2):
        out = tmp_path / f"trial{trial}"
        at = float(rng.uniform(first[0], total))
        t1 = time.perf_counter()
        run_killed(
            build_command(tiny_teacher_dir, prompts, out),
            lambda at=at, t1=t1: time.perf_counter() - t1 >= at,
        )
        left = capture_state(out)
        run_to_end(build_command(tiny_teacher_dir, prompts, out))  # the same command again
        c = compare_capture(out, reference)
        assert c["examples"] == 300 and c["duplicates"] == 0 and c["missing"] == [], (left, c)
        assert c["mismatched"] == [] and c["max_logprob_diff"] <= 1e-4, (left, c)
        assert c["verify_ok"] and c["warnings"] == [], (left, c)


def test_one_killed_torchrun_rank_then_rerun_holds_every_example_once(
    tmp_path: Path, tiny_teacher_dir
) -> None:
    prompts = write_prompts(tmp_path / "prompts.jsonl", 300)
    reference = tmp_path / "reference"
    run_to_end(build_command(tiny_teacher_dir, prompts, reference))  # one process
    out = tmp_path / "two-ranks"
    # Rank 1 dies after rank 0 and it together committed some shards; torchrun stops rank 0.
    kill_rank_then_rerun(torchrun_build_command(tiny_teacher_dir, prompts, out), 1, out, reference)


def kill_rank_then_rerun(cmd: list[str], rank: int, out: Path, reference: Path) -> None:
    """Kill ``rank`` of the torchrun ``cmd`` once 6 shard files exist, then run ``cmd`` again:
    the dataset must hold the 300 examples of ``reference``, each once, with its targets."""
    killed, code = run_rank_killed(cmd, rank, after_shards(out, 6, 0.0))
    assert killed and code != 0
    assert not (out / "manifest.json").exists()  # nobody finalized the broken run
    run_to_end(cmd)  # the same command again
    c = compare_capture(out, reference)
    assert c["examples"] == 300 and c["duplicates"] == 0 and c["missing"] == [], c
    assert c["mismatched"] == [] and c["max_logprob_diff"] <= 1e-4, c
    assert c["verify_ok"] and c["warnings"] == [] and c["leftover_tmp"] == [], c


def test_one_killed_rank_of_a_tp_group_then_rerun_holds_every_example_once(
    tmp_path: Path, tiny_teacher_dir
) -> None:
    prompts = write_prompts(tmp_path / "prompts.jsonl", 300)
    reference = tmp_path / "reference"
    run_to_end(build_command(tiny_teacher_dir, prompts, reference))  # one process, whole teacher
    for rank in (1, 0):  # the rank that only computes, then the one that writes
        out = tmp_path / f"tp-rank{rank}-killed"
        cmd = [*torchrun_build_command(tiny_teacher_dir, prompts, out), "--tp", "2"]
        kill_rank_then_rerun(cmd, rank, out, reference)


def test_killed_training_resumes_to_the_same_losses(
    tmp_path: Path, tiny_teacher_dir, tiny_student_dir
) -> None:
    from tests.train.helpers import capture_dataset

    data = capture_dataset(tiny_teacher_dir, tmp_path / "data", count=64)
    steps, every = 16, 4
    run_to_end(train_command(data, tiny_student_dir, tmp_path / "straight", steps, every))
    reference = train_losses(tmp_path / "straight")
    assert [r["step"] for r in reference] == list(range(1, steps + 1))

    out = tmp_path / "killed"
    cmd = train_command(data, tiny_student_dir, out, steps, every)
    killed, _ = run_killed(cmd, lambda: logged_steps(out) >= 10)  # past the step-8 checkpoint
    assert killed and logged_steps(out) < steps
    run_to_end([*cmd, "--resume"])
    assert train_losses(out) == reference  # bit for bit, steps 9-10 redone from the checkpoint
    assert (out / "final" / "model.safetensors").exists()
