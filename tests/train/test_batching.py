"""Collation: which logit predicts which target, padding, truncation, sampled weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from logitcache.cache.format import Example, TopK
from logitcache.train.batching import collate, fit_length
from logitcache.train.config import load_config
from logitcache.train.loss_plan import plan_loss
from logitcache.train.losses import SampledTargets, TopKTargets, distill_loss
from logitcache.train.student import DistillStudent
from tests.cache.synth import make_examples, make_info


def topk_example(name: str, prompt: list[int], response: list[int], k: int = 4) -> Example:
    P = len(response)
    ids = np.stack([np.arange(k) + 10 * j for j in range(P)]) if P else np.zeros((0, k), int)
    lp = np.log(np.full((P, k), 0.2, dtype=np.float32))
    return Example(
        name,
        np.array(prompt),
        np.array(response),
        TopK(ids, lp, np.log(np.full(P, 0.2, np.float32))),
    )


def test_target_j_is_compared_with_the_logit_before_response_token_j() -> None:
    info = make_info(k=4, vocab=100)
    exs = [topk_example("a", [5, 6, 7], [8, 9]), topk_example("b", [1], [2, 3, 4, 5])]
    b = collate(exs, info, max_seq_len=64, pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 5]]
    T = 5
    # a: logits at indices 2, 3 (len(prompt) + j - 1); b: indices 0..3.
    assert b.positions.tolist() == [2, 3, T + 0, T + 1, T + 2, T + 3]
    # The token right after each loss position is the label, i.e. what that logit predicts.
    assert (
        b.input_ids.flatten()[b.positions + 1].tolist() == b.labels.tolist() == [8, 9, 2, 3, 4, 5]
    )
    # Target rows follow the same order: row j of example a, then rows of b.
    assert b.targets.ids[:, 0].tolist() == [0, 10, 0, 10, 20, 30]  # type: ignore[union-attr]


def test_padding_mask_and_empty_prompt() -> None:
    info = make_info(k=4, vocab=100)
    exs = [topk_example("a", [], [8, 9, 10]), topk_example("b", [1, 2, 3, 4, 5], [6])]
    b = collate(exs, info, max_seq_len=64, pad_id=99)
    assert b.input_ids.tolist() == [[8, 9, 10, 99, 99, 99], [1, 2, 3, 4, 5, 6]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    # Empty prompt: nothing predicts response token 0, so targets 1 and 2 only.
    assert b.dropped_targets == 1
    assert b.labels.tolist() == [9, 10, 6]
    assert b.positions.tolist() == [0, 1, 6 + 4]
    assert b.targets.ids[:, 0].tolist() == [10, 20, 0]  # type: ignore[union-attr]


def test_truncation_keeps_the_prompt_end_and_the_response_start() -> None:
    assert fit_length(3, 10, 8) == (3, 5)
    assert fit_length(10, 3, 8) == (7, 1)  # the prompt is cut from the left
    info = make_info(k=4, vocab=100)
    b = collate([topk_example("a", [1, 2, 3, 4, 5, 6], [7, 8, 9])], info, max_seq_len=4)
    assert b.input_ids.tolist() == [[4, 5, 6, 7]]
    assert b.labels.tolist() == [7] and b.truncated == 1


def test_sampled_targets_become_padded_weights() -> None:
    info = make_info("sampled", n=16, vocab=50)
    exs = make_examples(info, 6, seed=2, max_len=6)
    b = collate(exs, info, max_seq_len=64)
    w = b.targets.weights  # type: ignore[union-attr]
    assert w.shape[0] == b.num_positions == sum(len(e.response_ids) for e in exs)
    assert torch.allclose(w.sum(-1), torch.ones(len(w)))
    first = exs[next(i for i, e in enumerate(exs) if len(e.response_ids))]
    n0 = int(first.targets.nunique[0])  # type: ignore[union-attr]
    assert b.targets.ids[0, :n0].tolist() == first.targets.ids[:n0].tolist()  # type: ignore[union-attr]


def test_topk_with_tail_draws_becomes_one_sparse_distribution() -> None:
    info = make_info("topk", k=3, tail_draws=8, codec="f32", vocab=60)
    exs = make_examples(info, 6, seed=4, max_len=6)
    plain = collate(exs, info, max_seq_len=64)
    b = collate(exs, info, max_seq_len=64, tail_draws=True)
    assert isinstance(plain.targets, TopKTargets) and isinstance(b.targets, SampledTargets)
    t, top = b.targets, plain.targets
    # The head: the top-k ids at their exact probabilities, in front.
    assert torch.equal(t.ids[:, :3], top.ids)
    assert torch.allclose(t.weights[:, :3], top.logprobs.exp())
    # The tail: every draw weighs tail mass · count / n, so each position sums to one.
    assert torch.allclose(t.weights.sum(-1), torch.ones(len(t.weights)), atol=1e-5)
    first = next(e for e in exs if len(e.response_ids))
    d = first.targets.tail_draws  # type: ignore[union-attr]
    u = int(d.nunique[0])
    assert t.ids[0, 3 : 3 + u].tolist() == d.ids[:u].tolist()
    want = np.exp(first.targets.tail_logmass[0]) * d.counts[:u] / 8  # type: ignore[union-attr]
    np.testing.assert_allclose(t.weights[0, 3 : 3 + u].numpy(), want, rtol=1e-6)
    assert not t.weights[0, 3 + u :].any()  # padding
    with pytest.raises(ValueError, match=r"tail_draws=True, but the dataset stores top-3 u8"):
        collate(exs, make_info("topk", k=3, vocab=60), max_seq_len=64, tail_draws=True)


def test_chunked_student_loss_equals_the_dense_loss_on_full_logits(tiny_student_dir: Path) -> None:
    """The trainer's hidden-states path gives the same loss as model(...).logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir, dtype=torch.float32)
    V = model.config.vocab_size
    info = make_info(k=8, vocab=V)
    b = collate(make_examples(info, 5, seed=3, max_len=10), info, max_seq_len=64)
    cfg = load_config(
        None,
        [
            ("loss.alpha", "0.7", ""),
            ("loss.chunk_size", "3", ""),
            ("data.train", "x", ""),
            ("train.output", "o", ""),
            ("model.path", "m", ""),
        ],
    )
    module = DistillStudent(model, plan_loss(cfg.loss, info.targets))
    t = b.targets
    assert isinstance(t, TopKTargets)
    total, kd, ce = module(b.input_ids, b.attention_mask, b.positions, b.labels, t)
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits  # (B, T, V)
    dense = distill_loss(
        logits.flatten(0, 1)[b.positions],
        t,
        b.labels,
        torch.ones_like(b.labels, dtype=torch.bool),
        alpha=0.7,
    )
    assert torch.allclose(total, dense.total, atol=1e-5)
    assert torch.allclose(kd, dense.kd, atol=1e-5) and torch.allclose(ce, dense.ce, atol=1e-5)


@pytest.mark.parametrize("P", [0, 1])
def test_examples_without_loss_positions_still_collate(P: int) -> None:
    info = make_info(k=4, vocab=100)
    b = collate([topk_example("a", [], [5] * P)], info, max_seq_len=8)
    assert b.num_positions == 0 and b.targets.ids.shape == (0, 4)  # type: ignore[union-attr]
