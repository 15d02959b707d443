"""Logit datasets for trainer tests, from a tiny teacher's forward pass (no capture module).

Context distillation in miniature: the teacher reads a fixed context, then the prompt and the
response; the student's dataset row holds only the prompt and the response, with the teacher's
targets at every response token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from logitcache.cache.format import DatasetInfo, Example, Sampled, TargetSpec, TopK
from logitcache.cache.tokenizer import tokenizer_fingerprint
from logitcache.cache.writer import DatasetWriter
from logitcache.tools.tiny import tiny_corpus
from logitcache.train.config import Config, load_config
from tests.cache.synth import draw

CONTEXT = "Ahoy! Answer like a pirate, matey. "


def config_from(overrides: dict[str, object], **sets: object) -> Config:
    """A training config from ``section.key`` overrides, then ``section__key`` keyword ones, as
    the command line's ``--set`` would give them."""
    merged = {**overrides, **{k.replace("__", "."): v for k, v in sets.items()}}
    return load_config(None, [(k, str(v), f"--set {k}") for k, v in merged.items()])


def capture_dataset(
    teacher_dir: str | Path,
    out: str | Path,
    *,
    count: int = 32,
    seed: int = 0,
    kind: str = "topk",
    k: int = 16,
    draws: int = 32,
    codec: str = "f16",
    shard_positions: int = 400,
    batch_rows: int = 8,
    prefix: str = "ex",
    empty_prompts: bool = False,
    teacher_name: str | None = None,
    tail_draws: int = 0,
    temperature: float = 1.0,
) -> Path:
    """Write ``count`` examples with the teacher's top-k (or sampled) targets at
    ``temperature`` to ``out``; top-k with ``tail_draws`` draws from the rest of the
    distribution when that is > 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(seed)
    lines = tiny_corpus()
    info = DatasetInfo(
        vocab_size=len(tok),
        tokenizer_fingerprint=tokenizer_fingerprint(tok),
        targets=TargetSpec(
            kind,  # type: ignore[arg-type]
            k=k if kind == "topk" else 0,
            n=draws if kind == "sampled" else tail_draws,
            codec=codec,  # type: ignore[arg-type]
        ),
        teacher={
            "name_or_path": teacher_name or str(teacher_dir),
            "revision": None,
            "config_hash": "test",
        },
        capture={"temperature": temperature, "mode": "score", "context": CONTEXT},
    )
    context_ids = tok.encode(CONTEXT, add_special_tokens=False)
    rows = []
    for _ in range(count):
        words = lines[int(rng.integers(len(lines)))].split()
        cut = int(rng.integers(1, len(words)))
        prompt = (
            [] if empty_prompts else tok.encode(" ".join(words[:cut]), add_special_tokens=False)
        )
        response = tok.encode(" " + " ".join(words[cut:]), add_special_tokens=False)
        rows.append((prompt, response))
    # One right-padded forward: padding after the real tokens cannot change their logits.
    seqs = [[tok.bos_token_id, *context_ids, *p, *r] for p, r in rows]
    T = max(len(x) for x in seqs)
    full = torch.tensor([x + [0] * (T - len(x)) for x in seqs])
    with torch.no_grad():
        all_logprobs = (teacher(full).logits / temperature).log_softmax(-1)  # (count, T, V)
    with DatasetWriter(out, info, shard_positions=shard_positions, batch_rows=batch_rows) as w:
        for i, (prompt, response) in enumerate(rows):
            # Logit at index t predicts token t+1: the response starts after bos+context+prompt.
            start = 1 + len(context_ids) + len(prompt)
            logprobs = all_logprobs[i, start - 1 : start - 1 + len(response)]  # (P, V)
            targets: TopK | Sampled
            if kind == "topk":
                top, ids = logprobs.topk(k, dim=-1)  # (P, K)
                rest = logprobs.scatter(1, ids, float("-inf"))  # (P, V)
                tail = torch.logsumexp(rest, dim=-1)  # (P,)
                extra = draw(rng, rest.exp().double().numpy(), tail_draws) if tail_draws else None
                targets = TopK(ids.numpy(), top.numpy(), tail.numpy(), extra)
            else:
                targets = draw(rng, logprobs.exp().double().numpy(), draws)
            ex = Example(
                f"{prefix}{i}", np.array(prompt, np.int64), np.array(response, np.int64), targets
            )
            w.add(ex)
    return Path(out)
