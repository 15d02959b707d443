"""One run of the fidelity study: a variant trained, offline through the project trainer or
online with the teacher in the loop, and a student measured against the teacher's full
distribution on held-out text."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .variants import Settings, Variant

if TYPE_CHECKING:
    import torch

    from logitcache.train.config import Config


def _config(v: Variant, data: Path, student: Path, out: Path, s: Settings) -> Config:
    """The trainer's config of one variant's run (the online loop reads it too)."""
    from logitcache.train.config import (
        Config,
        DataConfig,
        LogConfig,
        LossConfig,
        ModelConfig,
        OptimConfig,
        TrainConfig,
    )

    cfg = Config(
        data=DataConfig(train=str(data), batch_size=s.batch_size, max_seq_len=4096),
        model=ModelConfig(path=str(student)),
        loss=LossConfig(alpha=0.0 if v.kind == "hard" else 1.0, tail=v.tail),
        optim=OptimConfig(lr=s.lr, warmup_steps=s.warmup_steps),
        train=TrainConfig(output=str(out), steps=s.steps, seed=v.seed, device="cpu"),
        log=LogConfig(progress=False),
    )
    problems = cfg.validate()
    if problems:
        raise ValueError("; ".join(problems))
    return cfg


def train_offline(
    v: Variant, data: Path, student: Path, out: Path, s: Settings
) -> tuple[Any, float]:
    """The project trainer on a stored dataset: (trained model, median step seconds)."""
    import torch
    from transformers import AutoModelForCausalLM

    from logitcache.train.metrics import read_metrics
    from logitcache.train.trainer import FINAL_NAME, train

    train(_config(v, data, student, out, s))
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    model = AutoModelForCausalLM.from_pretrained(out / FINAL_NAME, dtype=torch.float32)
    return model, _median_step([r["tokens"] / r["tokens_per_s"] for r in steps])


def train_online(
    v: Variant,
    data: Path,
    student: Path,
    teacher: Any,
    out: Path,
    s: Settings,
    context_ids: np.ndarray | None = None,
) -> tuple[Any, float]:
    """Full-vocabulary forward KL with ``teacher`` in the loop, with the trainer's student,
    optimizer, schedule, clipping (train.optim) and data order (read from ``data``; its targets
    are ignored). ``context_ids`` (S, C): what the teacher reads before sequence s (example
    ``r0-s{s}``), never the student. Returns (trained model, median step seconds)."""
    import torch

    from logitcache.cache.reader import open_dataset
    from logitcache.train.optim import clipped_step, lr_at, make_optimizer, set_lr
    from logitcache.train.student import Dist, final_hidden, load_student, load_tokenizer
    from logitcache.train.trainer import make_loader

    cfg = _config(v, data, student, out, s)
    info = open_dataset(data).info
    dist = Dist(0, 1, torch.device("cpu"))
    model = load_student(cfg, info)
    head = model.get_output_embeddings()
    optimizer = make_optimizer(model, cfg.optim, dist.device)
    pad_id = load_tokenizer(cfg).pad_token_id or 0  # as the trainer pads
    batches = iter(make_loader(cfg, str(data), info, dist, train=True, pad_id=pad_id))
    model.train()
    times = []
    for step in range(s.steps):
        t0 = time.perf_counter()
        b = next(batches)
        set_lr(optimizer, lr_at(step, cfg, s.steps))
        ids, mask, pos = b.input_ids, b.attention_mask, b.positions
        if context_ids is not None:  # the teacher's view: its context, then the same tokens
            ctx = torch.from_numpy(context_ids[[int(i.rsplit("-s", 1)[1]) for i in b.ids]])
            T, C = ids.shape[1], ctx.shape[1]
            ids, mask = torch.cat([ctx, ids], 1), torch.cat([torch.ones_like(ctx), mask], 1)
            pos = pos // T * (C + T) + C + pos % T
        with torch.inference_mode():
            t_logits = teacher(input_ids=ids, attention_mask=mask).logits
            log_p = t_logits.flatten(0, 1).index_select(0, pos).float().log_softmax(-1)
        log_p = log_p.clone()  # (N, V), out of inference mode so autograd may read it
        log_q = head(final_hidden(model, b.input_ids, b.attention_mask, b.positions))
        log_q = log_q.float().log_softmax(-1)
        kl = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none")
        kl.sum(-1).mean().backward()  # mean over positions of KL(p ‖ q), as the trainer's KD
        clipped_step(model, optimizer, cfg.optim)
        times.append(time.perf_counter() - t0)
    return model, _median_step(times)


def _median_step(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


def evaluate_student(
    model: Any, tokens: np.ndarray, teacher_lp: torch.Tensor, batch: int = 8
) -> dict[str, float]:
    """Mean per position of KL(teacher ‖ student) over the full vocabulary, CE of the true next
    token and top-1 agreement with the teacher, on held-out ``tokens`` (S, L)."""
    import torch

    sums = np.zeros(3)
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(tokens), batch):
            x = torch.from_numpy(tokens[i : i + batch])
            log_q = model(x).logits[:, :-1].float().log_softmax(-1)  # (B, L-1, V)
            log_p = teacher_lp[i : i + batch]
            kl = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none")
            sums[0] += float(kl.sum(-1).double().sum())
            sums[1] -= float(log_q.gather(-1, x[:, 1:, None]).double().sum())
            sums[2] += float((log_q.argmax(-1) == log_p.argmax(-1)).sum())
    n = tokens.shape[0] * (tokens.shape[1] - 1)
    return {"kl": float(sums[0] / n), "ce": float(sums[1] / n), "top1": float(sums[2] / n)}
