"""The fidelity study end to end: one teacher pass, every variant trained on its targets, and
each measured against the teacher on held-out text."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from logitcache.cache.format import DatasetInfo, TargetSpec

from ...corpus import sequence_examples
from .runs import evaluate_student, train_offline, train_online
from .target_sets import build_datasets, teacher_log_probs, token_bytes
from .variants import Row, Settings, Variant


def run_study(
    teacher_dir: str | Path,
    student_dir: str | Path,
    train_tokens: np.ndarray,
    eval_tokens: np.ndarray,
    variants: list[Variant],
    settings: Settings,
    workdir: str | Path,
    log: Callable[[str], None] = print,
) -> tuple[list[Row], dict[str, float]]:
    """Train every variant and measure it; returns (rows, the untrained student's metrics)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from logitcache.cache.reader import open_dataset
    from logitcache.cache.tokenizer import tokenizer_fingerprint

    work = Path(workdir)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    info = DatasetInfo(
        vocab_size=teacher.config.vocab_size,
        tokenizer_fingerprint=tokenizer_fingerprint(tok),
        targets=TargetSpec("sampled", n=1),
        teacher={"name_or_path": str(teacher_dir)},
        capture={"temperature": 1.0, "mode": "score"},
    )
    t0 = time.perf_counter()
    specs = list(dict.fromkeys(v.dataset for v in variants))
    C = settings.context
    data = build_datasets(teacher, train_tokens, specs, info, work / "data", context=C)
    eval_lp = teacher_log_probs(teacher, eval_tokens)[:, C:]  # the teacher sees the context
    context_ids, train_tokens, eval_tokens = (
        train_tokens[:, :C],
        train_tokens[:, C:],
        eval_tokens[:, C:],
    )
    log(
        f"teacher pass over {len(train_tokens)} + {len(eval_tokens)} sequences: {time.perf_counter() - t0:.0f} s"
    )
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    initial = evaluate_student(student, eval_tokens, eval_lp)
    del student
    log(
        f"untrained student: KL {initial['kl']:.4f}  CE {initial['ce']:.4f}  top-1 {initial['top1']:.3f}"
    )
    hard_bytes = token_bytes(sequence_examples(train_tokens, lambda sl: None), info)
    rows = []
    for v in variants:
        t0 = time.perf_counter()
        ds = data[v.dataset]
        out = work / "runs" / v.name.replace(" ", "_").replace("(", "").replace(")", "")
        if v.kind == "online":
            model, step_s = train_online(
                v, ds, Path(student_dir), teacher, out, settings, context_ids if C else None
            )
        else:
            model, step_s = train_offline(v, ds, Path(student_dir), out, settings)
        m = evaluate_student(model, eval_tokens, eval_lp)
        del model
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        shutil.rmtree(out / "final", ignore_errors=True)
        manifest = open_dataset(ds).manifest
        nbytes: float | None = manifest.num_bytes / manifest.num_positions
        if v.kind == "online":
            nbytes = None
        elif v.kind == "hard":
            nbytes = hard_bytes / manifest.num_positions
        unique = mean_k = None
        batches = list(open_dataset(ds).iter_batches()) if v.kind != "online" else []
        positions = sum(b.num_positions for b in batches)
        if v.has_draws:
            unique = sum(len(b.sample_ids) for b in batches) / positions  # type: ignore[arg-type]
        if v.k_mass is not None:
            mean_k = sum(int(b.topk_counts.sum()) for b in batches) / positions  # type: ignore[union-attr]
        rows.append(Row(v, nbytes, m["kl"], m["ce"], m["top1"], step_s, unique, mean_k))
        log(
            f"{v.name:<28} KL {m['kl']:.4f}  CE {m['ce']:.4f}  top-1 {m['top1']:.3f}  "
            f"step {step_s:.2f} s  ({time.perf_counter() - t0:.0f} s)"
        )
    return rows, initial
