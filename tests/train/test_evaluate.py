"""Held-out metrics: scored at the loss temperature, and never 0 when there is nothing to score."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from logitcache.cache.format import DatasetInfo, Example, TopK
from logitcache.cache.tokenizer import tokenizer_fingerprint
from logitcache.cache.writer import DatasetWriter
from logitcache.train.batching import Batch, collate
from logitcache.train.config import load_config
from logitcache.train.evaluate import evaluate
from logitcache.train.losses import kd_loss
from logitcache.train.metrics import read_metrics
from logitcache.train.trainer import train
from tests.cache.synth import make_examples, make_info


def one_token_after_empty_prompt(info: DatasetInfo, count: int) -> list[Example]:
    """Examples whose only target is dropped: nothing predicts response token 0."""
    k = info.targets.k
    lp = np.log(np.full((1, k), 0.2, np.float32))
    return [
        Example(
            f"d{i}",
            np.zeros(0, np.int64),
            np.array([7 + i]),
            TopK(np.arange(k)[None, :] + i, lp, np.log(np.full(1, 0.2, np.float32))),
        )
        for i in range(count)
    ]


def fixed_hidden(batch: Batch, hidden: int = 16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch.num_positions, hidden, generator=gen)  # (N, H)


def test_heldout_kl_is_scored_at_the_loss_temperature() -> None:
    info = make_info(k=8, vocab=60)
    batch = collate(make_examples(info, 5, seed=3, max_len=10), info, max_seq_len=64)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 60, bias=False)
    plain = evaluate([batch], fixed_hidden, head, device=torch.device("cpu"))
    hot = evaluate([batch], fixed_hidden, head, device=torch.device("cpu"), temperature=2.0)
    logits = head(fixed_hidden(batch)).detach()  # (N, V)
    mask = torch.ones(batch.num_positions, dtype=torch.bool)
    # The KD term's KL at T = 2 (kd_loss scales it by T², the metric does not).
    want = float(kd_loss(logits, batch.targets, mask, temperature=2.0)) / 4.0
    assert hot["kl"] == pytest.approx(want, rel=1e-5)
    assert hot["kl"] != pytest.approx(plain["kl"], rel=1e-3)
    # CE is the student's own prediction and top-1 does not depend on the temperature.
    assert (hot["ce"], hot["top1"]) == (plain["ce"], plain["top1"])


def test_nothing_to_score_is_none_not_zero() -> None:
    info = make_info(k=4, vocab=100)
    batch = collate(one_token_after_empty_prompt(info, 3), info, max_seq_len=8)
    head = torch.nn.Linear(16, 100)
    result = evaluate([batch], fixed_hidden, head, device=torch.device("cpu"))
    assert result == {
        "kl": None,
        "ce": None,
        "top1": None,
        "positions": 0,
        "examples": 3,
        "dropped_targets": 3,
    }
    empty = evaluate([], fixed_hidden, head, device=torch.device("cpu"))
    assert empty["kl"] is None and empty["examples"] == 0


def test_the_trainer_says_there_was_nothing_to_score(
    tiny_student_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_student_dir)
    info = replace(make_info(k=4, vocab=len(tok)), tokenizer_fingerprint=tokenizer_fingerprint(tok))
    ds = tmp_path / "dropped"
    with DatasetWriter(ds, info) as w:
        for ex in one_token_after_empty_prompt(info, 4):
            w.add(ex)
    out = tmp_path / "run"
    sets = {
        "data.train": ds,
        "data.eval": ds,
        "model.path": tiny_student_dir,
        "train.output": out,
        "train.steps": 2,
        "log.progress": False,
        "log.plot": tmp_path / "loss.png",
    }
    assert train(load_config(None, [(k, str(v), f"--{k}") for k, v in sets.items()]))["finished"]
    captured = capsys.readouterr()
    assert "eval KL" not in captured.out
    assert (
        captured.err.count(
            f"eval: nothing to score: the 4 examples of data.eval={str(ds)!r} have no target left "
            "to score (4 dropped: a response token right after an empty prompt has no logit to "
            "predict it); hold out examples with a prompt, or with responses of two tokens or more. "
            "metrics.jsonl records eval/kl, eval/ce and eval/top1 as null"
        )
        == 2
    )  # at the start and at the end
    rows = read_metrics(out / "metrics.jsonl")
    evals = [r for r in rows if "eval/kl" in r]
    assert [(r["eval/kl"], r["eval/ce"], r["eval/top1"], r["eval/positions"]) for r in evals] == [
        (None, None, None, 0)
    ] * 2
    # Training steps over zero positions have no loss either.
    steps = [r for r in rows if "loss" in r]
    assert [(r["loss"], r["kd"], r["ce"], r["positions"]) for r in steps] == [
        (None,) * 3 + (0,)
    ] * 2
    assert (tmp_path / "loss.png").exists()
