"""Capture throughput ÷ bare teacher forward, measured side by side on the same batches.

    python -m logitcache.tools.bench.capture [--prompts 24] [--k 64] [--repeats 3] [--full-pass]

Teacher: SmolLM2-135M-Instruct (tools/teachers.py, ensure_smollm2) when its package is installed,
else a tiny random Llama. Workload: the demo's context distillation, score mode: the teacher
sees the few-shot block + prompt, the response is ~60 tokens. Three variants run interleaved,
``repeats`` times each, on identical padded batches:

- bare: ``model(input_ids, attention_mask)``, full logits, nothing else;
- bare-keep: the same forward with the LM head limited to the positions capture keeps
  (``logits_to_keep``: exactly the target positions with transformers ≥ 5);
- capture: everything capture does per batch: that forward, fp32 log-softmax, top-k + tail,
  host copies, cutting into examples, and the writer's encoding + compression (inline here;
  on a CPU the background thread competes for the same cores anyway).

The variants run back to back on each batch, ``--repeats`` times. Two estimates of each ratio:
the sums over batches of each batch's best run, and the median over repeats of the per-repeat
ratio (paired runs, so slow drifts of load from other processes cancel). ``--threads 1``
makes process CPU time a second, contention-proof measure. ``--full-pass`` also times one
real capture loop end to end (background writer included).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np


def _teacher_dir(tmp: Path, force_tiny: bool) -> tuple[str, str]:
    if not force_tiny:
        try:
            from ..teachers import ensure_smollm2

            return str(ensure_smollm2()), "SmolLM2-135M-Instruct (fp32)"
        except (ModuleNotFoundError, FileNotFoundError) as e:
            print(f"SmolLM2 not available ({e}); using the tiny random teacher")
    from ..tiny import make_tiny_model, make_tiny_tokenizer

    make_tiny_tokenizer(tmp / "tok")
    make_tiny_model(tmp / "tiny", tmp / "tok", layers=4, hidden=256, heads=4, kv_heads=2)
    return str(tmp / "tiny"), "tiny random Llama (4 layers, hidden 256, vocab 384)"


def _records(n: int) -> list[dict[str, Any]]:
    from ..demo.behaviour import load_demo_context, load_demo_prompts

    prompts = load_demo_prompts()
    answers = [m["content"] for m in load_demo_context() if m["role"] == "assistant"]
    return [
        {
            "id": p["id"],
            "prompt": p["prompt"],
            "response": answers[i % len(answers)] + " " + answers[(i + 1) % len(answers)],
        }
        for i, p in enumerate(prompts[:n])
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m logitcache.tools.bench.capture", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--prompts", type=int, default=24, help="examples per pass")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--codec", default="u8")
    ap.add_argument("--max-batch-tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--full-pass", action="store_true", help="also time one real capture loop")
    ap.add_argument("--tiny", action="store_true", help="use the tiny random teacher")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (default: torch's choice); 1 makes CPU time a contention-proof measure",
    )
    args = ap.parse_args(argv)
    logging.getLogger("transformers").setLevel(logging.ERROR)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_capture-"))
    try:
        folder, name = _teacher_dir(tmp, args.tiny)
        measure(
            folder,
            name,
            prompts=args.prompts,
            k=args.k,
            codec=args.codec,
            max_batch_tokens=args.max_batch_tokens,
            repeats=args.repeats,
            full_pass=args.full_pass,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def measure(
    folder: str,
    name: str,
    *,
    prompts: int = 24,
    k: int = 64,
    codec: str = "u8",
    max_batch_tokens: int = 2048,
    repeats: int = 3,
    full_pass: bool = False,
    device: str = "cpu",
    dtype: str = "auto",
) -> dict[str, float]:
    """Run the three variants on the teacher in ``folder`` and print the table; returns the
    figures: tokens/s of each variant (best-of) and the capture ÷ bare ratios (best-of and
    paired medians). ``device``/``dtype`` as ``--device``/``--dtype`` (auto: bf16 on CUDA)."""
    import torch

    from logitcache.cache.capture import run_batches
    from logitcache.cache.capture_config import (
        DEFAULT_TARGETS,
        CaptureConfig,
        InputConfig,
        RunConfig,
        TargetConfig,
        TeacherConfig,
    )
    from logitcache.cache.capture_info import dataset_info
    from logitcache.cache.engine import plan_batches, score_batch
    from logitcache.cache.prompts import parse_record
    from logitcache.cache.ranks import Ranks
    from logitcache.cache.targets import example_keys
    from logitcache.cache.teacher import load_teacher
    from logitcache.cache.views import Context, ViewRenderer
    from logitcache.cache.writer import DatasetWriter, encode_shard

    from ..demo.behaviour import DEMO_CONTEXT

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    tmp = Path(tempfile.mkdtemp(prefix="bench_capture-"))
    try:
        ctx_file = str(DEMO_CONTEXT)
        cfg = CaptureConfig(
            input=InputConfig(prompts=("bench",), context=ctx_file),
            teacher=TeacherConfig(path=folder, dtype=dtype, device=device),  # type: ignore[arg-type]
            run=RunConfig(out=str(tmp / "ds"), max_batch_tokens=max_batch_tokens, progress=False),
            targets=TargetConfig(spec=replace(DEFAULT_TARGETS, k=k, codec=codec)),
        )
        teacher = load_teacher(cfg.teacher, dev)
        renderer = ViewRenderer(teacher.tokenizer, "chat", Context.load(ctx_file), folder)
        recs = [
            parse_record(r, ("bench", i + 1, None), r["id"], require_response=True)
            for i, r in enumerate(_records(prompts))
        ]
        examples, bad = renderer.render_all(recs)
        assert not bad, bad
        info = dataset_info(cfg, teacher, renderer, None)
        lengths = np.array([len(e.teacher_ids) + len(e.response_ids) for e in examples])
        batches = plan_batches(lengths, max_batch_tokens)
        ordered = [examples[i] for b in batches for i in b]
        tokens = int(lengths.sum())
        positions = sum(len(e.response_ids) for e in examples)

        def padded(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, Any]:
            """Inputs of one batch and the logits_to_keep that capture passes for it."""
            exs = [examples[i] for i in idx]
            seqs = [np.concatenate([e.teacher_ids, e.response_ids]) for e in exs]
            T = max(len(s) for s in seqs)
            ids = torch.full((len(exs), T), teacher.pad_id)
            mask = torch.zeros((len(exs), T), dtype=torch.long)
            for b, s in enumerate(seqs):
                ids[b, : len(s)] = torch.from_numpy(s)
                mask[b, : len(s)] = 1
            if teacher.keep == "mask":
                keep = torch.zeros((len(exs), T), dtype=torch.bool)
                for b, e in enumerate(exs):
                    t = len(e.teacher_ids)
                    keep[b, t - 1 : t - 1 + len(e.response_ids)] = True
                return ids.to(dev), mask.to(dev), keep.to(dev)
            return ids.to(dev), mask.to(dev), T - min(len(e.teacher_ids) for e in exs) + 1

        inputs = [padded(b) for b in batches]

        @torch.inference_mode()
        def bare(b: int, keep: bool) -> None:
            ids, mask, to_keep = inputs[b]
            kw = {"logits_to_keep": to_keep} if keep and teacher.keep != "none" else {}
            teacher.model(input_ids=ids, attention_mask=mask, use_cache=False, **kw).logits.sum()

        def capture_step(b: int) -> None:
            # All the work capture does per batch, the writer's included (run inline here:
            # on a CPU the background thread competes for the same cores anyway).
            result = score_batch(teacher, [examples[i] for i in batches[b]], cfg.targets, keys[b])
            rows = result.to_examples()
            encode_shard(info, rows, 1024)

        def timed(fn: Any, *a: Any) -> tuple[float, float]:
            if cuda:  # kernels run asynchronously: time from an idle device to an idle device
                torch.cuda.synchronize(dev)
            w, c = time.perf_counter(), time.process_time()
            fn(*a)
            if cuda:
                torch.cuda.synchronize(dev)
            return time.perf_counter() - w, time.process_time() - c

        def run_full_pass() -> float:
            out = tmp / "ds"
            t0 = time.perf_counter()
            writer = DatasetWriter(out, info, writer_id="r00000", background=True)
            # The real loop; examples are pre-ordered so it forms the same batches.
            run_batches(cfg, teacher, ordered, writer, Ranks(), None)
            writer.close()
            seconds = time.perf_counter() - t0
            shutil.rmtree(out)
            return seconds

        keys = [example_keys([examples[i].id for i in b], 0) for b in batches]
        kept = {
            "mask": "target positions only",
            "window": "from the shortest prompt on",
            "none": "all positions",
        }[teacher.keep]
        where = (
            torch.cuda.get_device_name(dev)
            if cuda
            else f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
        )
        print(
            f"teacher: {name}, {info.capture['dtype']}; torch threads: {torch.get_num_threads()}; "
            f"{where}"
        )
        print(
            f"workload: {len(examples)} examples, {len(batches)} batches "
            f"(≤ {max_batch_tokens} padded tokens), {tokens:,} tokens, "
            f"{positions:,} target positions (top-{k} {codec}); LM head kept: {kept}"
        )
        variants = {
            "bare": lambda b: bare(b, False),
            "bare-keep": lambda b: bare(b, True),
            "capture": capture_step,
        }
        variants["bare-keep"](0)  # warm-up
        wall = {v: np.full((repeats, len(batches)), np.inf) for v in variants}
        cpu = {v: np.full((repeats, len(batches)), np.inf) for v in variants}
        for rep in range(repeats):
            for b in range(len(batches)):  # interleaved per batch: load drifts hit all alike
                for v, fn in variants.items():
                    wall[v][rep, b], cpu[v][rep, b] = timed(fn, b)
            print(
                f"  repeat {rep + 1}: "
                + ", ".join(f"{v} {wall[v][rep].sum():.1f} s" for v in variants)
            )
        best = {v: t.min(0).sum() for v, t in wall.items()}  # each batch's least disturbed run
        best_cpu = {v: t.min(0).sum() for v, t in cpu.items()}
        figures: dict[str, float] = {}
        for v in variants:
            figures[f"{v} tokens/s"] = tokens / best[v]
            print(
                f"{v:>10}: {tokens / best[v]:8.1f} tokens/s  (wall {best[v]:.2f} s, "
                f"CPU {best_cpu[v]:.2f} s; sum over batches of the best of {repeats})"
            )

        def paired(base: str, times: dict[str, np.ndarray]) -> tuple[str, float]:
            # One ratio per repeat, from runs made back to back: slow load drift cancels.
            r = times[base].sum(1) / times["capture"].sum(1)
            return f"median {np.median(r):.3f} (range {r.min():.3f}-{r.max():.3f})", float(
                np.median(r)
            )

        for base, label in (("bare", "full logits"), ("bare-keep", "same kept logits")):
            shown, median = paired(base, wall)
            figures[f"capture ÷ {base} (best-of)"] = best[base] / best["capture"]
            figures[f"capture ÷ {base} (paired median)"] = median
            print(
                f"capture ÷ bare forward ({label}): best-of {best[base] / best['capture']:.3f}; "
                f"paired wall {shown}; paired CPU {paired(base, cpu)[0]}"
            )
        if full_pass:
            seconds = run_full_pass()
            figures["capture loop tokens/s"] = tokens / seconds
            print(f"end-to-end capture loop (background writer): {tokens / seconds:.1f} tokens/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return figures


if __name__ == "__main__":
    raise SystemExit(main())
