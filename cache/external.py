"""Teachers that run outside this process's PyTorch: vLLM in process, or a served teacher.

Such an engine hands back, per response position, the teacher's top-k ``{token id: log-prob}``
(vLLM's raw log-probs: ``log_softmax`` of the logits before any processing) and nothing more.
This module turns those lists into the same :class:`~logitcache.cache.targets.TopKTensors` the
Hugging Face engine computes, so records, views, ids, alignment and the exactly-once writer are
the capture's own; only the targets' source differs, and the manifest says so
(:meth:`ExternalTeacher.describe`).

What the targets are: the k most likely ids and their log-probs as the engine computed them
(fp32 log-softmax, in the teacher's dtype for the logits), and the tail mass as
``log(1 − Σ exp(top-k))`` (the engine never sees the rest). Tail draws cannot come from the
same pass, so these engines store top-k without draws (``--n 0``); docs/CAPTURE.md gives the
fidelity cost.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .capture_config import CaptureConfig, GenerateConfig, TargetConfig
from .engine import BatchResult
from .errors import InputError
from .targets import TopKTensors
from .views import Rendered

TARGETS_FROM = (
    "{engine} raw log-probs (logprobs_mode raw_logprobs: log_softmax of the logits before any "
    "processing), the top k as the engine ranked them; tail mass log(1 - sum exp(top-k)); no "
    "tail draws"
)

TopRow = Mapping[int, float]
"""One position's top log-probs from an engine: token id → log-prob (k entries or more)."""


def topk_rows(rows: Sequence[TopRow], k: int, where: str = "the engine") -> TopKTensors:
    """(P,) rows of ``{id: log-prob}`` → top-k targets: ids (P, k) int32 most likely first,
    log-probs (P, k) float32, tail (P,) float32 = log(1 − Σ exp(top-k)).

    A row may hold more than k entries (vLLM adds the sampled or prompt token when it is not
    among the top k): the k most likely are kept, ties broken by the smaller id. Raises
    RuntimeError naming ``where`` when a row holds fewer than k (the engine was asked for
    fewer)."""
    P = len(rows)
    widths = [len(row) for row in rows]
    for w in widths:
        if w < k:
            raise RuntimeError(
                f"{where} returned {w} log-probs at a position where {k} were asked for"
            )
    W = max(widths, default=k)
    # Vectorised: rows padded to the widest (id = max int64, log-prob = -inf sort last), then
    # one lexsort per row by (-log-prob, id) — the most likely first, ties by the smaller id.
    all_ids = np.full((P, W), np.iinfo(np.int64).max, dtype=np.int64)
    all_lps = np.full((P, W), -np.inf, dtype=np.float64)
    for p, (row, w) in enumerate(zip(rows, widths, strict=True)):
        all_ids[p, :w] = np.fromiter(row.keys(), np.int64, w)
        all_lps[p, :w] = np.fromiter(row.values(), np.float64, w)
    order = np.lexsort((all_ids, -all_lps), axis=-1)[:, :k]
    ids = np.take_along_axis(all_ids, order, -1).astype(np.int32)
    top = np.take_along_axis(all_lps, order, -1)
    lps = top.astype(np.float32)
    # The tail from the exact (fsum) top-k mass: near 1 its log needs every digit.
    mass = [math.fsum(r) for r in np.exp(top).tolist()]
    tail = np.array([math.log1p(-m) if m < 1.0 else -math.inf for m in mass], dtype=np.float32)
    return TopKTensors(torch.from_numpy(ids), torch.from_numpy(lps), torch.from_numpy(tail))


def join_topk(parts: list[TopKTensors]) -> TopKTensors:
    """One example-major set of top-k targets from per-example ones."""
    if not parts:
        return TopKTensors(
            torch.zeros((0, 0), dtype=torch.int32),
            torch.zeros((0, 0), dtype=torch.float32),
            torch.zeros(0, dtype=torch.float32),
        )
    return TopKTensors(
        torch.cat([p.ids for p in parts]),
        torch.cat([p.logprobs for p in parts]),
        torch.cat([p.tail for p in parts]),
    )


def check_targets(targets: TargetConfig, engine: str) -> list[str]:
    """What an external engine cannot store, each problem naming the flag and the fix."""
    p = []
    spec = targets.spec
    if spec.kind != "topk":
        p.append(
            f"--targets {spec.kind}: {engine} gives only top-k log-probs; use --targets topk "
            "--n 0, or the Hugging Face engine (--engine hf) for sampled targets"
        )
    elif spec.n:
        p.append(
            f"--n {spec.n}: {engine} gives top-k log-probs only, no draws from the tail; pass "
            "--n 0 (top-k + tail mass; docs/CAPTURE.md gives the fidelity cost), or use "
            "--engine hf for tail draws"
        )
    if spec.k_mass is not None or spec.n_rate is not None:
        p.append(
            f"--k-mass/--n-rate: adaptive targets are computed from the whole distribution, "
            f"which {engine} does not return; drop them (fixed --k), or use --engine hf"
        )
    if targets.temperature != 1.0:
        p.append(
            f"--temperature {targets.temperature}: {engine}'s raw log-probs are at temperature 1 "
            "and top-k alone cannot be renormalised at another; pass --temperature 1 (students "
            "can still be trained at any temperature)"
        )
    return p


@dataclass
class ExternalTeacher:
    """A teacher whose logits stay inside another engine: what capture needs to know of it.

    Subclasses implement :meth:`prompt_rows` and :meth:`generations`; :meth:`score_batch` and
    :meth:`generate_batch` have the Hugging Face engine's signatures (cache/engine.py) and
    return the same :class:`BatchResult`."""

    tokenizer: Any
    vocab_size: int
    """Width of the teacher's logits (its config.json's vocab_size)."""
    identity: dict[str, Any]
    pad_id: int
    eos_ids: list[int]
    context_size: int | None
    dtype: str
    """The dtype the engine runs the model in, as the manifest records it."""
    engine: dict[str, Any] = field(default_factory=dict)
    """The engine as the manifest records it: name, version, parallelism."""
    where: str = "the engine"
    """How errors name the engine (its flag)."""

    def describe(self) -> dict[str, Any]:
        """The manifest's ``capture`` entries that differ from the Hugging Face engine's."""
        return {
            "engine": self.engine,
            "targets_from": TARGETS_FROM.format(engine=self.engine.get("name", "engine")),
            "dtype": self.dtype,
        }

    # What an engine implements: token ids in, {id: log-prob} rows out.

    def prompt_rows(self, prompts: list[list[int]], k: int) -> list[Sequence[TopRow]]:
        """Per prompt, the top-k rows of every prompt position p ≥ 1 at index p (the
        distribution of token p given the ones before it); index 0 may hold anything."""
        raise NotImplementedError

    def generations(
        self, prompts: list[list[int]], k: int, gen: GenerateConfig, ex_keys: np.ndarray
    ) -> list[tuple[list[int], Sequence[TopRow]]]:
        """Per prompt, the generated ids and the top-k row of each generation step; the
        sampler seeded per request by ``ex_keys``."""
        raise NotImplementedError

    # The capture's side: the HF engine's signatures and results (cache/engine.py).

    def score_batch(
        self, examples: list[Rendered], targets: TargetConfig, ex_keys: np.ndarray
    ) -> BatchResult:
        """Teacher-force each response after its full view: response position j is prompt row
        len(teacher view) + j."""
        k = targets.spec.k
        prompts = [
            [int(i) for i in np.concatenate([e.teacher_ids, e.response_ids])]  # type: ignore[list-item]
            for e in examples
        ]
        per_example = []
        for e, rows in zip(examples, self.prompt_rows(prompts, k), strict=True):
            t, n = len(e.teacher_ids), len(e.response_ids)  # type: ignore[arg-type]
            if len(rows) < t + n:
                raise RuntimeError(
                    f"{self.where}: example {e.id}: log-probs for {len(rows)} prompt positions "
                    f"of {t + n}"
                )
            per_example.append(topk_rows(rows[t : t + n], k, self.where))
        return result(examples, [e.response_ids for e in examples], per_example)  # type: ignore[misc]

    def generate_batch(
        self,
        examples: list[Rendered],
        targets: TargetConfig,
        gen: GenerateConfig,
        ex_keys: np.ndarray,
    ) -> BatchResult:
        """The teacher writes each response; a response ends after its first end id (kept)."""
        k = targets.spec.k
        prompts = [[int(i) for i in e.teacher_ids] for e in examples]
        responses, per_example, finished = [], [], 0
        for ids, rows in self.generations(prompts, k, gen, ex_keys):
            if len(rows) < len(ids):
                raise RuntimeError(
                    f"{self.where}: {len(ids)} tokens generated but log-probs for {len(rows)}"
                )
            n, ended = response_length(ids, self.eos_ids)
            finished += ended
            responses.append(np.asarray(ids[:n], dtype=np.int64))
            per_example.append(topk_rows(rows[:n], k, self.where))
        return result(examples, responses, per_example, finished)

    def close(self) -> None:
        """Release the engine (processes, connections)."""


def response_length(tokens: Sequence[int], eos_ids: Sequence[int]) -> tuple[int, bool]:
    """Length of a generated response cut after its first end-of-sequence id (kept), and
    whether it ended there: the Hugging Face engine's rule."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return i + 1, True
    return len(tokens), False


def folder_config(folder: str) -> dict[str, Any]:
    """config.json of a teacher folder (the served teacher needs no weights here)."""
    import json

    path = Path(folder) / "config.json"
    if not path.is_file():
        raise InputError(
            f"--teacher {folder}: no config.json; with --engine vllm or --teacher-url, --teacher "
            "is still the local folder of the teacher's config.json and tokenizer"
        )
    cfg = json.loads(path.read_text())
    return cfg.get("text_config", cfg) if "vocab_size" not in cfg else cfg


def folder_vocab_context(folder: str) -> tuple[int, int | None]:
    """(vocab_size, max_position_embeddings or None) of a teacher folder's config.json."""
    cfg = folder_config(folder)
    if "vocab_size" not in cfg:
        raise InputError(f"--teacher {folder}: config.json has no vocab_size")
    ctx = cfg.get("max_position_embeddings")
    return int(cfg["vocab_size"]), (int(ctx) if ctx else None)


def pad_id(tokenizer: Any, eos_ids: list[int]) -> int:
    """The pad id the Hugging Face engine would use (unused by these engines but recorded)."""
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else (eos_ids[0] if eos_ids else 0))


def result(
    examples: list[Rendered],
    responses: list[np.ndarray],
    per_example: list[TopKTensors],
    finished: int = 0,
) -> BatchResult:
    """A batch's :class:`BatchResult` from per-example targets (host tensors)."""
    tokens = sum(len(e.teacher_ids) + len(r) for e, r in zip(examples, responses, strict=True))
    return BatchResult(examples, responses, join_topk(per_example), None, tokens, finished)


def load_external(
    cfg: CaptureConfig, tokenizer: Any, eos_ids: list[int], world: int = 1
) -> ExternalTeacher:
    """The teacher of ``--teacher-url`` (:mod:`.served`) or ``--engine vllm`` (:mod:`.vllm_engine`).

    ``world``: processes of this capture (torchrun); vLLM runs its own workers, so it refuses
    to be started once per torchrun rank."""
    if cfg.teacher.url is not None:
        from .served import ServedTeacher

        return ServedTeacher(cfg, tokenizer, eos_ids)
    if world > 1:
        raise InputError(
            f"--engine vllm under torchrun ({world} processes): vLLM starts its own workers; "
            "run `logitcache build --engine vllm --tp N` once per node, without torchrun (split "
            "the prompts across nodes with --num-shards/--shard-index)"
        )
    from .vllm_engine import VLLMTeacher

    return VLLMTeacher(cfg, tokenizer, eos_ids)
