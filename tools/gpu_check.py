"""Every GPU figure the project claims, measured in one command on one CUDA device.

    python -m logitcache.tools.gpu_check [--out gpu_check.json]     # or: make gpu-check

For one H100/H200-class card with the project installed (budget: under 8 minutes). Each figure
is printed with the card's name (``torch.cuda.get_device_name``) and written to a JSON file.
The sections reuse the benchmarks (tools/bench/*), at GPU sizes:

1. capture ÷ bare forward in bf16 (``bench.capture.measure``) on a random Llama of
   Llama-3.2-1B's shape (hidden 2048, 16 layers, vocabulary 128,256; weights random, which
   changes no timing), over the demo's context-distillation prompts;
2. generated tokens/s: Hugging Face ``generate`` bare and with capture's targets
   (``cache.engine.generate_batch``), then vLLM's ``LLM.generate`` bare and with ``logprobs=k``
   (in a subprocess) when vllm imports, else a printed reason;
3. KD ÷ CE training step, bf16 autocast as the trainer (``bench.train.bench_steps``);
4. the chunked loss's peak memory on CUDA, ``max_memory_allocated`` (``bench.loss.compare``);
5. tail draws from bf16 logits on CUDA (``cache.targets.assemble_targets``): positions/s, and
   agreement with the CPU's computation on the same logits;
6. ``pytest -m gpu`` (the gpu-marked tests).

Without CUDA it refuses at once. ``--smoke`` (hidden; tests) runs every section on the CPU at
toy sizes: it checks the script, not the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from logitcache.cache.paths import make_parents, output_problem

from .gpu_generate import generate_section, rates_of, vllm_worker

REFUSAL = "no CUDA device; this script is for a GPU box"


@dataclass(frozen=True)
class Sizes:
    """Workload sizes: the GPU defaults, or toy ones for ``--smoke`` on a CPU."""

    hidden: int = 2048
    layers: int = 16
    heads: int = 32
    kv_heads: int = 8
    vocab: int = 128_256
    capture_prompts: int = 64
    capture_batch_tokens: int = 16_384
    repeats: int = 3
    k: int = 32
    gen_prompts: int = 32
    gen_tokens: int = 128
    student_hidden: int = 1024
    student_layers: int = 8
    train_batch: int = 8
    train_prompt: int = 128
    train_response: int = 384
    loss_vocabs: tuple[int, ...] = (32_000, 128_256)
    loss_positions: int = 8192
    loss_hidden: int = 2048
    loss_chunks: tuple[int, ...] = (0, 1024)
    draw_rows: int = 4096
    draw_rows_cpu: int = 256


SMOKE = Sizes(
    hidden=64, layers=2, heads=4, kv_heads=2, vocab=512, capture_prompts=4,
    capture_batch_tokens=2048, repeats=1, k=8, gen_prompts=2, gen_tokens=4,
    student_hidden=32, student_layers=1, train_batch=2, train_prompt=16, train_response=16,
    loss_vocabs=(1024,), loss_chunks=(256,), loss_positions=128, loss_hidden=32, draw_rows=64, draw_rows_cpu=32,
)  # fmt: skip


@dataclass
class Report:
    """The figures of one run, each with the card it ran on."""

    card: str
    figures: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def add(self, section: str, name: str, value: float, unit: str = "") -> None:
        self.figures.append(
            {"card": self.card, "section": section, "name": name, "value": value, "unit": unit}
        )
        print(f"[{self.card}] {section}: {name} = {value:,.4g}{' ' + unit if unit else ''}")

    def skip(self, section: str, reason: str) -> None:
        self.skipped.append({"section": section, "reason": reason})
        print(f"[{self.card}] {section}: skipped: {reason}")


# --------------------------------------------------------------------------- sections


def random_teacher(folder: Path, sizes: Sizes, device: str) -> Path:
    """A random Llama of ``sizes`` (weights in bf16 on CUDA) with the tiny tokenizer: timing
    depends on the shapes only. Built on ``device``, so a 1B-shaped model takes seconds."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from .tiny import make_tiny_tokenizer

    tok = make_tiny_tokenizer(folder)
    config = LlamaConfig(
        vocab_size=sizes.vocab,
        hidden_size=sizes.hidden,
        intermediate_size=4 * sizes.hidden,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    del model
    return folder


def capture_section(report: Report, teacher: Path, sizes: Sizes, device: str) -> None:
    """capture ÷ bare forward (bf16 on CUDA), through bench/capture.py."""
    from .bench.capture import measure

    figures = measure(
        str(teacher),
        f"random Llama, hidden {sizes.hidden}, {sizes.layers} layers, vocab {sizes.vocab}",
        prompts=sizes.capture_prompts,
        k=sizes.k,
        max_batch_tokens=sizes.capture_batch_tokens,
        repeats=sizes.repeats,
        device=device,
    )
    for name, value in figures.items():
        unit = "tokens/s" if "tokens/s" in name else ""
        report.add(f"capture (score, {'bf16' if device == 'cuda' else 'fp32'})", name, value, unit)


def train_section(report: Report, sizes: Sizes, device: str) -> None:
    """KD ÷ CE step through bench/train.py (bf16 autocast on CUDA, as the trainer)."""
    from .bench.train import bench_steps

    args = argparse.Namespace(
        vocab=sizes.vocab, hidden=sizes.student_hidden, layers=sizes.student_layers,
        teacher_hidden=sizes.hidden, teacher_layers=sizes.layers, batch=sizes.train_batch,
        prompt=sizes.train_prompt, response=sizes.train_response, k=sizes.k, tail_draws=sizes.k,
        chunk=0, reps=max(sizes.repeats, 3), device=device,
    )  # fmt: skip
    t = bench_steps(args)
    positions = t.pop("positions")
    for name, seconds in t.items():
        report.add("training step", f"{name} s/step", seconds, "s")
    report.add("training step", "KD (offline) ÷ CE (HF)", t["KD (offline)"] / t["CE (HF)"])
    report.add("training step", "KD positions/s", positions / t["KD (offline)"], "positions/s")


def loss_memory_section(report: Report, sizes: Sizes, device: str) -> None:
    """Chunked vs dense loss: peak memory (max_memory_allocated on CUDA), through bench/loss.py."""
    from .bench.loss import compare, parse_args

    argv = ["--device", device, "--positions", str(sizes.loss_positions)]
    argv += ["--hidden", str(sizes.loss_hidden), "--repeats", "2"]
    argv += ["--vocab", *map(str, sizes.loss_vocabs)]
    argv += ["--chunk-size", *map(str, sizes.loss_chunks)]
    for row in compare(parse_args(argv)):
        name = f"V={row['vocab']} {row['variant']}"
        report.add("chunked loss", f"{name} peak", row["peak_mib"], "MiB")
        report.add("chunked loss", f"{name} peak ÷ dense", row["peak_share"])
        report.add("chunked loss", f"{name} time ÷ dense", row["time_ratio"])


def draws_section(report: Report, sizes: Sizes, device: str) -> None:
    """Default targets (top-k + systematic tail draws) from bf16 logits on ``device``: speed,
    and agreement with the same logits' targets computed on the CPU."""
    import torch

    from logitcache.cache.capture_config import DEFAULT_TARGETS, TargetConfig
    from logitcache.cache.targets import assemble_targets, row_targets

    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    logits = (3.0 * torch.randn(sizes.draw_rows, sizes.vocab, generator=g)).to(torch.bfloat16)
    cfg = TargetConfig(spec=DEFAULT_TARGETS)
    keys = torch.arange(sizes.draw_rows, dtype=torch.int64)
    positions = torch.zeros(sizes.draw_rows, dtype=torch.int64)
    on_dev = logits.to(dev)

    def run() -> int:
        assemble_targets(on_dev.clone(), cfg, keys.to(dev), positions.to(dev))
        return sizes.draw_rows

    rate = rates_of({"targets": run}, max(sizes.repeats, 3), dev)["targets"]
    report.add("tail draws (bf16 logits)", f"targets positions/s on {device}", rate, "positions/s")
    n = sizes.draw_rows_cpu
    got = row_targets(on_dev[:n], cfg, keys[:n].to(dev), positions[:n].to(dev))
    ref = row_targets(logits[:n], cfg, keys[:n], positions[:n])
    for name, value in target_agreement(got, ref, logits[:n]).items():
        report.add(f"tail draws ({device} vs cpu, {n} rows)", name, value)


def target_agreement(got: Any, ref: Any, logits: Any) -> dict[str, float]:
    """How two computations of the same rows' top-k targets (:class:`TopKTensors` before
    reduction, with tail draws) agree: fractions of rows with the same top-k ids, the same up
    to tied logits (bf16 ties many), with the same tail draws (of those with the same ids), and
    the largest |Δ log p| there."""
    import numpy as np

    got_ids, ref_ids = got.ids.cpu().numpy(), ref.ids.cpu().numpy()
    same = np.array([set(a) == set(b) for a, b in zip(got_ids, ref_ids, strict=True)])
    lf = logits.float().cpu().numpy()
    kth = np.sort(lf, axis=1)[:, -got_ids.shape[1]]  # (P,) the k-th largest logit
    ties_only = [
        same[r] or all(lf[r, i] == kth[r] for i in set(got_ids[r]) ^ set(ref_ids[r]))
        for r in range(len(same))
    ]
    lp_got = np.take_along_axis(got.logprobs.cpu().numpy(), np.argsort(got_ids, axis=1), 1)
    lp_ref = np.take_along_axis(ref.logprobs.cpu().numpy(), np.argsort(ref_ids, axis=1), 1)
    draws = (got.tail_draws.cpu().numpy() == ref.tail_draws.cpu().numpy()).all(axis=1)
    tail = np.abs(got.tail.cpu().numpy() - ref.tail.cpu().numpy())
    return {
        "rows with the same top-k ids": float(same.mean()),
        "rows the same up to tied logits": float(np.mean(ties_only)),
        "rows with the same tail draws": float(draws[same].mean()) if same.any() else 0.0,
        "max |Δ log p| (rows with the same ids)": float(
            np.abs(lp_got - lp_ref)[same].max(initial=0)
        ),
        "max |Δ tail log-mass| (rows with the same ids)": float(tail[same].max(initial=0)),
    }


def pytest_section(report: Report) -> None:
    """``pytest -m gpu`` over the checkout's tests (an editable install has them)."""
    tests = Path(__file__).resolve().parents[1] / "tests"
    if not tests.is_dir():
        report.skip("pytest -m gpu", f"no tests folder at {tests} (run from a checkout)")
        return
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(tests)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tests.parent,
    )
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
    print(tail)
    for name, n in pytest_counts(tail).items():
        report.add("pytest -m gpu", name, n, "tests")
    if done.returncode not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"pytest -m gpu failed:\n{done.stdout[-3000:]}")


def pytest_counts(summary: str) -> dict[str, int]:
    """Outcome counts of pytest's last line ("2 failed, 3 passed, 1 skipped in 4.2s")."""
    counts = dict.fromkeys(("passed", "failed", "skipped", "errors"), 0)
    for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", summary):
        counts["errors" if word.startswith("error") else word] = int(n)
    return counts


# --------------------------------------------------------------------------- runner


def run(out: Path, smoke: bool = False) -> Report:
    """Every section in turn; a failing section is recorded and the rest still run."""
    import torch

    device = "cpu" if smoke else "cuda"
    sizes = SMOKE if smoke else Sizes()
    card = "cpu (smoke)" if smoke else torch.cuda.get_device_name(0)
    report = Report(card)
    report.versions = _versions()
    print(f"card: {card}; " + ", ".join(f"{k} {v}" for k, v in report.versions.items()))
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    try:
        teacher = random_teacher(tmp / "teacher", sizes, device)
        sections: dict[str, Callable[[], None]] = {
            "capture": lambda: capture_section(report, teacher, sizes, device),
            "generate": lambda: generate_section(report, teacher, sizes, device),
            "training step": lambda: train_section(report, sizes, device),
            "chunked loss": lambda: loss_memory_section(report, sizes, device),
            "tail draws": lambda: draws_section(report, sizes, device),
            "pytest -m gpu": lambda: pytest_section(report),
        }
        if smoke:  # the gpu tests skip without CUDA; running them proves nothing here
            sections.pop("pytest -m gpu")
            report.skip("pytest -m gpu", "--smoke runs on the CPU")
        for name, section in sections.items():
            print(f"\n== {name}")
            t0 = time.perf_counter()
            try:
                section()
            except Exception as e:  # one broken section must not hide the others
                report.failed.append({"section": name, "error": f"{e}"[-2000:]})
                traceback.print_exc()
            report.seconds[name] = time.perf_counter() - t0
            if device == "cuda":
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    make_parents(out).write_text(json.dumps(asdict(report), indent=1) + "\n")
    total = sum(report.seconds.values())
    print(
        f"\n{len(report.figures)} figures on {card} in {total:.0f} s, written to {out}; "
        f"{len(report.skipped)} skipped, {len(report.failed)} sections failed"
        + "".join(f"\n  FAILED {f['section']}: {f['error'][:300]}" for f in report.failed)
    )
    return report


def _versions() -> dict[str, str]:
    import torch
    import transformers

    out = {
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "transformers": transformers.__version__,
    }
    try:
        import vllm

        out["vllm"] = vllm.__version__
    except ImportError:
        pass
    out["python"] = platform.python_version()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m logitcache.tools.gpu_check", description=__doc__.splitlines()[0]
    )
    p.add_argument("--out", default="gpu_check.json", help="JSON file of the figures")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--vllm-worker", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.vllm_worker:
        vllm_worker(Path(args.vllm_worker))
        return 0
    problem = output_problem(args.out, f"--out {args.out}", folder=False)
    if problem is not None:  # before any section runs
        print(f"gpu_check: {problem}", file=sys.stderr)
        return 2
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print(f"gpu_check: {REFUSAL}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    report = run(Path(args.out), smoke=args.smoke)
    return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
