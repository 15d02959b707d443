"""`torchrun logitcache build` on CPU (gloo) stores what one process stores: two ranks each
with a whole teacher (data parallel), one teacher split over two ranks (`--tp 2`), and two
groups of two (`--nproc-per-node 4 --tp 2`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from logitcache.cache.capture import capture
from logitcache.cache.capture_config import (
    DEFAULT_TARGETS,
    CaptureConfig,
    GenerateConfig,
    InputConfig,
    RunConfig,
    TargetConfig,
    TeacherConfig,
)
from logitcache.cache.reader import open_dataset
from logitcache.tools.reliability.crashes import (
    build_command,
    compare_capture,
    run_rank_killed,
    run_to_end,
    torchrun_build_command,
    write_prompts,
)
from logitcache.tools.tiny import tiny_corpus


def never() -> bool:
    return False


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_two_ranks_equal_one(tmp_path: Path, tiny_teacher_dir: Path, tp: int) -> None:
    corpus = tiny_corpus()
    recs = [{"id": f"q{i:02d}", "prompt": corpus[(5 * i) % len(corpus)]} for i in range(12)]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "ctx.txt").write_text("Answer like a pirate, matey.")
    flags = dict(mode="generate", k=8, max_new_tokens=8, max_batch_tokens=160)

    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "logitcache.tools.cli",
        "build", "--teacher", str(tiny_teacher_dir), "--prompts", str(prompts),
        "--context", str(tmp_path / "ctx.txt"), "--out", str(tmp_path / "two"),
        "--mode", "generate", "--k", "8", "--max-new-tokens", "8", "--max-batch-tokens", "160",
        "--no-progress", "--tp", str(tp),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Own process group, so a hang is cleaned up with every worker torchrun started.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    assert "captured 12 examples" in stdout

    capture(
        CaptureConfig(
            input=InputConfig(prompts=(str(prompts),), context=str(tmp_path / "ctx.txt")),
            teacher=TeacherConfig(path=str(tiny_teacher_dir)),
            run=RunConfig(
                out=str(tmp_path / "one"),
                max_batch_tokens=flags["max_batch_tokens"],
                progress=False,
            ),
            targets=TargetConfig(mode="generate", spec=replace(DEFAULT_TARGETS, kind="topk", k=8)),
            generate=GenerateConfig(max_new_tokens=8),
        )
    )
    two = open_dataset(tmp_path / "two", verify=True)
    one = open_dataset(tmp_path / "one", verify=True)
    # Each group (a rank, or --tp ranks) wrote its own shards and journal; the manifest lists
    # them all.
    writers = ["r00000", "r00001"][: 2 // tp]
    assert sorted(p.name for p in (tmp_path / "two" / "_parts").iterdir()) == [
        f"{w}.json" for w in writers
    ]
    assert {s.file.split("-")[1] for s in two.shards} == set(writers)
    parts = {"count": 2 // tp, "ranks": 2 // tp} | ({"tp": tp} if tp > 1 else {})
    assert two.manifest.extra["parts"] == parts
    a = {e.id: e.by_id() for e in two.iter_examples()}  # each shard stores ids by its ranks
    b = {e.id: e.by_id() for e in one.iter_examples()}
    assert sorted(a) == sorted(b) == [r["id"] for r in recs]
    for i in b:
        assert np.array_equal(a[i].prompt_ids, b[i].prompt_ids)
        assert np.array_equal(a[i].response_ids, b[i].response_ids)
        t, u = a[i].targets, b[i].targets
        # Ids exact: a near-tie (two logits within float rounding of the reduction order) could
        # swap one in or out of the top-k, but none does here (docs/CAPTURE.md).
        assert np.array_equal(t.ids, u.ids)
        for field in ("ids", "counts", "nunique"):  # the tail draws
            assert np.array_equal(getattr(t.tail_draws, field), getattr(u.tail_draws, field))
        # u8 log-probs within one code step of sqrt(p) (each side's code is within 1/510).
        assert np.abs(np.exp(t.logprobs / 2) - np.exp(u.logprobs / 2)).max() <= 1 / 255 + 1e-6


@pytest.mark.slow
def test_two_groups_of_two_ranks_equal_one_process(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    """`--nproc-per-node 4 --tp 2`: two groups, each a teacher split over two ranks, each
    writing its own half of the prompts."""
    prompts = write_prompts(tmp_path / "prompts.jsonl", 120)
    run_to_end(build_command(tiny_teacher_dir, prompts, tmp_path / "one"))
    out = tmp_path / "four"
    run_rank_killed(
        [*torchrun_build_command(tiny_teacher_dir, prompts, out, 4), "--tp", "2"], 0, never
    )
    c = compare_capture(out, tmp_path / "one")
    assert c["examples"] == 120 and c["duplicates"] == 0 and c["missing"] == [], c
    # f32 log-probs: the split teacher's own rounding only.
    assert c["mismatched"] == [] and c["max_logprob_diff"] <= 1e-4, c
    assert c["verify_ok"] and c["warnings"] == [], c
    assert sorted(p.name for p in (out / "_parts").iterdir()) == ["r00000.json", "r00001.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extra"]["parts"] == {"count": 2, "ranks": 2, "tp": 2}
