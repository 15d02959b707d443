"""`torchrun --nproc-per-node 2 logitcache build` on CPU (gloo) stores what one process stores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

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
from logitcache.tools.tiny import tiny_corpus


def test_two_ranks_equal_one(tmp_path: Path, tiny_teacher_dir: Path) -> None:
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
        "--no-progress",
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
    # Each rank wrote its own shards and journal; the manifest lists both.
    assert sorted(p.name for p in (tmp_path / "two" / "_parts").iterdir()) == [
        "r00000.json",
        "r00001.json",
    ]
    assert {s.file.split("-")[1] for s in two.shards} == {"r00000", "r00001"}
    a = {e.id: e for e in two.iter_examples()}
    b = {e.id: e for e in one.iter_examples()}
    assert sorted(a) == sorted(b) == [r["id"] for r in recs]
    for i in b:
        assert np.array_equal(a[i].prompt_ids, b[i].prompt_ids)
        assert np.array_equal(a[i].response_ids, b[i].response_ids)
        assert np.array_equal(a[i].targets.ids, b[i].targets.ids)
        np.testing.assert_allclose(a[i].targets.logprobs, b[i].targets.logprobs, atol=0.02)
