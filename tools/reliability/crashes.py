"""SIGKILL trials: `logitcache build` rerun, `logitcache train --resume`."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from logitcache.cache.reader import open_dataset
from logitcache.cache.verify import verify_dataset

# --------------------------------------------------------------------------- crash trials


def tiny_models(root: Path) -> tuple[Path, Path]:
    """(teacher, student) folders: random Llamas sharing tools/tiny.py's tokenizer."""
    from ..tiny import make_tiny_model, make_tiny_tokenizer

    make_tiny_tokenizer(root / "tokenizer")
    teacher = make_tiny_model(root / "teacher", root / "tokenizer", layers=2, hidden=64, seed=0)
    student = make_tiny_model(root / "student", root / "tokenizer", layers=2, hidden=32, seed=1)
    return teacher, student


def write_prompts(path: Path, count: int) -> Path:
    """Score-mode records (prompt + response) from the tiny corpus, ids ``q0000``…"""
    from ..tiny import tiny_corpus

    lines = tiny_corpus()
    with path.open("w") as f:
        for i in range(count):
            response = " ".join(lines[(3 * i + j) % len(lines)] for j in range(1 + i % 3))
            rec = {"id": f"q{i:04d}", "prompt": lines[(7 * i) % len(lines)], "response": response}
            f.write(json.dumps(rec) + "\n")
    return path


def build_command(teacher: Path, prompts: Path, out: Path) -> list[str]:
    """`logitcache build` in score mode, many small shards so that kills land mid-commit."""
    return [
        sys.executable,
        "-m",
        "logitcache.tools.cli",
        "build",
        "--teacher",
        str(teacher),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--mode",
        "score",
        "--k",
        "8",
        "--codec",
        "f32",
        "--max-batch-tokens",
        "512",
        "--shard-positions",
        "64",
        "--device",
        "cpu",
        "--no-progress",
    ]


def _env() -> dict[str, str]:
    # One thread: runs compared step by step must do the same float arithmetic.
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_killed(
    cmd: list[str], kill_when: Callable[[], bool], timeout: float = 300
) -> tuple[bool, float]:
    """Start ``cmd``; SIGKILL it as soon as ``kill_when()`` holds. (killed?, seconds)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = False
    while p.poll() is None and time.perf_counter() - t0 < timeout:
        if kill_when():
            p.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.005)
    _, err = p.communicate(timeout=timeout)
    if not killed and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{err.decode()[-3000:]}")
    return killed, time.perf_counter() - t0


def run_to_end(cmd: list[str]) -> float:
    return run_killed(cmd, lambda: False)[1]


def compare_capture(out: Path, reference: Path) -> dict[str, Any]:
    """How a crashed-then-resumed capture differs from an uninterrupted one (should not)."""
    report = verify_dataset(out)
    got = [e.by_id() for e in open_dataset(out, verify=True).iter_examples()]
    ref = {e.id: e.by_id() for e in open_dataset(reference).iter_examples()}
    ids = [e.id for e in got]
    diff = 0.0
    mismatched = []
    for e in got:
        r = ref.get(e.id)
        if r is None or not (
            np.array_equal(e.prompt_ids, r.prompt_ids)
            and np.array_equal(e.response_ids, r.response_ids)
            and np.array_equal(e.targets.ids, r.targets.ids)
        ):
            mismatched.append(e.id)
            continue
        if len(e.response_ids):
            diff = max(diff, float(np.abs(e.targets.logprobs - r.targets.logprobs).max()))
    leftovers = [str(p.relative_to(out)) for p in out.rglob(".tmp-*")]
    return {
        "verify_ok": report.ok,
        "warnings": report.warnings,
        "examples": len(ids),
        "duplicates": len(ids) - len(set(ids)),
        "missing": sorted(set(ref) - set(ids)),
        "mismatched": mismatched,
        "max_logprob_diff": diff,
        "leftover_tmp": leftovers,
    }


def capture_state(out: Path) -> str:
    """What a killed capture left: journaled shards, stray shard files, temp files, manifest."""
    journal = out / "_parts" / "r00000.json"
    journaled = len(json.loads(journal.read_text())["shards"]) if journal.exists() else 0
    files = len(list(out.glob("shard-*.arrow")))
    tmp = len(list(out.rglob(".tmp-*")))
    return (
        f"{journaled} journaled, {files - journaled} unjournaled shard files, {tmp} temp, "
        f"manifest {'yes' if (out / 'manifest.json').exists() else 'no'}"
    )


def after_shards(out: Path, count: int, delay: float) -> Callable[[], bool]:
    """A kill trigger: ``delay`` seconds after the ``count``-th shard file appears in ``out``
    (count 0: after ``delay`` seconds), so kills land inside the capture whatever the load."""
    hit: list[float] = []

    def due() -> bool:
        if not hit and (count == 0 or len(list(out.glob("shard-*.arrow"))) >= count):
            hit.append(time.perf_counter())
        return bool(hit) and time.perf_counter() - hit[0] >= delay

    return due


def report_rerun(trial: int, state: str, out: Path, ref: Path, examples: int) -> bool:
    """Compare a rerun capture with the uninterrupted one, print the trial's line; True if it
    holds every example exactly once with the reference's targets."""
    c = compare_capture(out, ref)
    ok = (
        c["verify_ok"]
        and not c["warnings"]
        and not c["duplicates"]
        and not c["missing"]
        and not c["mismatched"]
        and c["max_logprob_diff"] <= 1e-4
        and c["examples"] == examples
    )
    print(
        f"  trial {trial:2d}: {state} -> rerun: {c['examples']} examples, "
        f"{c['duplicates']} duplicated, {len(c['missing'])} missing, "
        f"{len(c['mismatched'])} with other ids/tokens, max |Δ log p| "
        f"{c['max_logprob_diff']:.1e}, verify {'ok' if c['verify_ok'] else 'FAILED'}, "
        f"{len(c['warnings'])} warnings, {len(c['leftover_tmp'])} temp files left"
        f"{'' if ok else '  <-- FAILED ' + json.dumps(c)[:500]}"
    )
    return ok


def cmd_capture_crash(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed)
    root = Path(tempfile.mkdtemp(prefix="lc-capcrash-"))
    try:
        teacher, _ = tiny_models(root)
        prompts = write_prompts(root / "prompts.jsonl", args.prompts)
        ref = root / "reference"
        total = run_to_end(build_command(teacher, prompts, ref))
        m = json.loads((ref / "manifest.json").read_text())
        shards = len(m["shards"])
        print(
            f"reference: {m['num_examples']} examples, {shards} shards, {total:.1f} s. Each trial "
            f"SIGKILLs the run 1-{args.max_kills} times, each time 0-50 ms after a random number "
            f"(0-{shards}) of shard files exist, then reruns the same command to the end"
        )
        bad = 0
        for trial in range(args.trials):
            out = root / f"trial{trial}"
            states = []
            for _ in range(int(rng.integers(1, args.max_kills + 1))):
                count, delay = int(rng.integers(0, shards + 1)), float(rng.uniform(0, 0.05))
                killed, _ = run_killed(
                    build_command(teacher, prompts, out), after_shards(out, count, delay)
                )
                states.append(
                    f"kill after shard {count}: {capture_state(out)}" if killed else "not killed"
                )
            run_to_end(build_command(teacher, prompts, out))
            bad += not report_rerun(trial, "; ".join(states), out, ref, m["num_examples"])
            shutil.rmtree(out)
        print(f"{args.trials - bad} of {args.trials} trials match the uninterrupted run")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def torchrun_build_command(teacher: Path, prompts: Path, out: Path, ranks: int = 2) -> list[str]:
    """The same capture under ``torchrun --nproc-per-node ranks`` (gloo on CPU)."""
    cmd = build_command(teacher, prompts, out)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, "--nproc-per-node", str(ranks), *cmd[1:]]


def worker_pids(agent: int) -> dict[int, int]:
    """{rank: pid} of the workers a torchrun agent started (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = {}, list(children.get(agent, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
        if (
            rank is not None
            and b"logitcache.tools.cli" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ):
            found[rank] = pid
    return found


def run_rank_killed(
    cmd: list[str], rank: int, kill_when: Callable[[], bool], timeout: float = 300
) -> tuple[bool, int]:
    """Start a torchrun ``cmd``; SIGKILL only the worker of ``rank`` once ``kill_when()``
    holds, then let torchrun notice and stop the others. (killed?, torchrun's exit code)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    killed = False
    try:
        while p.poll() is None and time.perf_counter() - t0 < timeout:
            if not killed and kill_when():
                pid = worker_pids(p.pid).get(rank)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    killed = True
            time.sleep(0.005)
        _, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    if not killed and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{err.decode()[-3000:]}")
    return killed, p.returncode


def cmd_torchrun_crash(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed)
    root = Path(tempfile.mkdtemp(prefix="lc-trcrash-"))
    try:
        teacher, _ = tiny_models(root)
        prompts = write_prompts(root / "prompts.jsonl", args.prompts)
        ref = root / "reference"
        total = run_to_end(build_command(teacher, prompts, ref))  # one process
        m = json.loads((ref / "manifest.json").read_text())
        shards = len(m["shards"])
        print(
            f"reference (one process): {m['num_examples']} examples, {shards} shards, "
            f"{total:.1f} s. Each trial runs the capture on 2 torchrun ranks, SIGKILLs one "
            f"rank's worker 0-50 ms after a random number (0-{shards * 9 // 10 - 1}) of shard "
            "files (both ranks') exist, then reruns the same torchrun command to the end"
        )
        bad = 0
        for trial in range(args.trials):
            out = root / f"trial{trial}"
            rank = int(rng.integers(0, 2))
            count, delay = int(rng.integers(0, shards * 9 // 10)), float(rng.uniform(0, 0.05))
            cmd = torchrun_build_command(teacher, prompts, out)
            killed, code = run_rank_killed(cmd, rank, after_shards(out, count, delay))
            files = len(list(out.glob("shard-*.arrow")))
            state = (
                f"rank {rank} killed after shard {count} (torchrun exit {code}, {files} shard "
                f"files)"
                if killed
                else "finished before the kill"
            )
            run_to_end(cmd)
            bad += not report_rerun(trial, state, out, ref, m["num_examples"])
            shutil.rmtree(out)
        print(f"{args.trials - bad} of {args.trials} trials match the uninterrupted run")
    finally:
        shutil.rmtree(root, ignore_errors=True)


TRAIN_KEYS = ("step", "loss", "kd", "ce", "grad_norm", "lr", "positions", "tokens", "epoch")


def train_command(data: Path, student: Path, out: Path, steps: int, every: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "logitcache.tools.cli",
        "train",
        "--data.train",
        str(data),
        "--model.path",
        str(student),
        "--train.output",
        str(out),
        "--train.steps",
        str(steps),
        "--data.batch_size",
        "4",
        "--data.shuffle_buffer",
        "16",
        "--optim.lr",
        "3e-3",
        "--optim.warmup_steps",
        "2",
        "--log.checkpoint_every",
        str(every),
        "--log.progress",
        "false",
        "--train.device",
        "cpu",
    ]


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    try:
        return sum(1 for line in path.read_text().splitlines() if '"loss"' in line)
    except FileNotFoundError:
        return 0


def train_losses(out: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return [{k: r[k] for k in TRAIN_KEYS if k in r} for r in rows if "loss" in r]


def cmd_train_crash(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed)
    root = Path(tempfile.mkdtemp(prefix="lc-traincrash-"))
    try:
        teacher, student = tiny_models(root)
        data = root / "data"
        run_to_end(build_command(teacher, write_prompts(root / "p.jsonl", 96), data))
        steps, every = args.steps, args.checkpoint_every
        seconds = run_to_end(train_command(data, student, root / "straight", steps, every))
        reference = train_losses(root / "straight")
        print(f"uninterrupted: {steps} steps in {seconds:.1f} s, checkpoint every {every}")
        same = 0
        for trial in range(args.trials):
            out = root / f"trial{trial}"
            cmd = train_command(data, student, out, steps, every)
            # A checkpoint is written right after the metrics of every `every`-th step: kill at
            # a random moment up to 0.1 s (a step or two) after step `at` is logged.
            at, delay = int(rng.integers(every, steps - 2)), float(rng.uniform(0, 0.1))
            seen: list[float] = []

            def due(at: int = at, delay: float = delay, out: Path = out, seen=seen) -> bool:
                if not seen and logged_steps(out) >= at:
                    seen.append(time.perf_counter())
                return bool(seen) and time.perf_counter() - seen[0] >= delay

            killed, _ = run_killed(cmd, due)
            logged = logged_steps(out)
            partial = len(list((out / "checkpoints").glob(".tmp-step-*")))
            ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
            run_to_end([*cmd, "--resume"])
            got = train_losses(out)
            same += got == reference
            killed_at = (
                f"SIGKILL {delay:.2f} s after step {at} was logged"
                if killed
                else ("finished before the kill")
            )
            print(
                f"  trial {trial}: {killed_at} ({logged} "
                f"logged, checkpoints {ckpts[-1] if ckpts else None}, {partial} half-written) -> "
                f"--resume: {len(got)} steps, "
                f"{sum(a == b for a, b in zip(got, reference, strict=False))} of {steps} "
                f"identical: {'bit for bit' if got == reference else 'DIFFERENT'}"
            )
        print(f"{same} of {args.trials} resumed runs reproduce the uninterrupted losses exactly")
        # Killed while its second checkpoint is being assembled (a temporary folder exists).
        out = root / "mid-checkpoint"
        cmd = train_command(data, student, out, steps, every)
        ckpt_dir = out / "checkpoints"
        killed, _ = run_killed(
            cmd, lambda: any(ckpt_dir.glob(".tmp-step-*")) and any(ckpt_dir.glob("step-*"))
        )
        partial = sorted(p.name for p in ckpt_dir.glob(".tmp-step-*"))
        ckpts = sorted(p.name for p in ckpt_dir.glob("step-*"))
        run_to_end([*cmd, "--resume"])
        print(
            f"  killed while writing a checkpoint ({killed=}; half-written {partial}, complete "
            f"{ckpts}) -> --resume: "
            f"{'bit for bit' if train_losses(out) == reference else 'DIFFERENT'}; afterwards "
            f"still there: {sorted(p.name for p in ckpt_dir.glob('.tmp-step-*'))}"
        )
        # Killed before its first checkpoint: what does the user see?
        out = root / "early"
        cmd = train_command(data, student, out, steps, every)
        run_killed(cmd, lambda: logged_steps(out) >= 1)
        for extra in (["--resume"], []):
            p = subprocess.run(cmd + extra, env=_env(), capture_output=True, text=True)
            print(
                f"  killed before the first checkpoint, rerun {' '.join(extra) or 'as is'}: "
                f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1][:300]}"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
