"""The teacher at work: batch examples by length and turn each batch into targets.

Score mode pads on the right (positions stay 0..T-1, so no position ids are needed) and runs
one forward pass in which only the target positions go through the LM head (a boolean
``logits_to_keep``; with older transformers, the window from the shortest prompt on, gathered
down to the target rows). Generate mode pads on the left and calls ``model.generate``; a
logits processor computes each step's targets from the raw logits of that very step, so
response and targets come from one pass and no (steps × vocab) logits are kept. Results are
copied to pinned host memory without blocking, so the next batch is queued before this one is
unpacked. Loading the teacher is :mod:`logitcache.cache.teacher`'s work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .capture_config import GenerateConfig, TargetConfig
from .format import Example
from .targets import (
    STREAM_GENERATE,
    BatchTargets,
    RowTargets,
    assemble_targets,
    log_probs,
    row_keys,
    row_targets,
    sample_ids,
    stack_steps,
    uniforms,
)
from .teacher import Teacher
from .views import Rendered

# --------------------------------------------------------------------------- batching


def plan_batches(lengths: np.ndarray, max_batch_tokens: int) -> list[np.ndarray]:
    """Group example indices by length so that batch size × longest ≤ ``max_batch_tokens``.

    Longest first, so an out-of-memory batch shows up at once rather than hours in. An example
    longer than the budget gets a batch of its own.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = int(lengths[order[start]])
        size = max(1, max_batch_tokens // max(longest, 1))
        batches.append(order[start : start + size])
        start += size
    return batches


# --------------------------------------------------------------------------- results


@dataclass
class BatchResult:
    """One batch's targets on the host (possibly still arriving) and the ids they belong to."""

    examples: list[Rendered]
    response_ids: list[np.ndarray]
    targets: BatchTargets
    """Flat over the batch's positions, example-major."""
    event: Any = None
    """CUDA event recorded after the host copies (None: already on the host)."""
    tokens: int = 0
    """Teacher tokens in the batch (unpadded prompt + response)."""
    finished: int = 0
    """Generate mode: responses that ended with an end-of-sequence token."""

    def to_examples(self) -> list[Example]:
        """Wait for the host copies, then cut the flat targets into one Example per row."""
        if self.event is not None:
            self.event.synchronize()
        lengths = np.array([len(r) for r in self.response_ids], dtype=np.int64)
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        per_example = self.targets.split(bounds)
        return [
            Example(ex.id, ex.student_ids, response, targets)
            for ex, response, targets in zip(
                self.examples, self.response_ids, per_example, strict=True
            )
        ]


def _to_host(targets: BatchTargets, device: torch.device) -> tuple[BatchTargets, Any]:
    if device.type != "cuda":
        return targets.map(torch.Tensor.contiguous), None

    def pinned(v: torch.Tensor) -> torch.Tensor:
        return torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)

    host = targets.map(pinned)
    event = torch.cuda.Event()
    event.record()
    return host, event


# --------------------------------------------------------------------------- score mode


@torch.inference_mode()
def score_batch(
    teacher: Teacher, examples: list[Rendered], targets: TargetConfig, ex_keys: np.ndarray
) -> BatchResult:
    """Teacher-force each example's response after its full view; targets at response positions."""
    B = len(examples)
    t_len = np.array([len(e.teacher_ids) for e in examples])
    r_len = np.array([len(e.response_ids) for e in examples])  # type: ignore[arg-type]
    T = int((t_len + r_len).max())
    ids = np.full((B, T), teacher.pad_id, dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.int64)
    for b, e in enumerate(examples):  # one copy per example, right-padded
        n = t_len[b] + r_len[b]
        ids[b, :n] = np.concatenate([e.teacher_ids, e.response_ids])  # type: ignore[list-item]
        mask[b, :n] = 1
    dev = teacher.device
    # Logits at position p predict token p + 1: target j of row b sits at t_len[b] - 1 + j.
    positions_np = np.concatenate([np.arange(r) for r in r_len])
    P = len(positions_np)
    kwargs: dict[str, Any] = {}
    if teacher.keep == "mask":  # the LM head runs on exactly the P target positions
        keep = np.zeros((B, T), dtype=bool)
        for b in range(B):
            keep[b, t_len[b] - 1 : t_len[b] - 1 + r_len[b]] = True
        kwargs["logits_to_keep"] = torch.from_numpy(keep).to(dev, non_blocking=True)
    start = int(t_len.min()) - 1  # window mode: from the shortest prompt's last position on
    if teacher.keep == "window":
        kwargs["logits_to_keep"] = T - start
    logits = teacher.model(
        input_ids=torch.from_numpy(ids).to(dev, non_blocking=True),
        attention_mask=torch.from_numpy(mask).to(dev, non_blocking=True),
        use_cache=False,
        **kwargs,
    ).logits
    if teacher.keep == "mask":
        if tuple(logits.shape[:-1]) != (P,):
            raise RuntimeError(f"the teacher returned logits of shape {tuple(logits.shape)}")
        selected = logits  # (P, V), row-major over the mask: example-major, positions ascending
    else:
        logits = logits[:, -(T - start) :]  # (B, T - start, V)
        rows = np.repeat(np.arange(B), r_len)
        cols = np.repeat(t_len - 1 - start, r_len) + positions_np
        # Indices known on the host: no device sync (a boolean mask would need one).
        selected = logits[
            torch.from_numpy(rows).to(dev, non_blocking=True),
            torch.from_numpy(cols).to(dev, non_blocking=True),
        ]  # (P, V), example-major, positions ascending
    keys = torch.from_numpy(np.repeat(ex_keys, r_len)).to(dev, non_blocking=True)
    positions = torch.from_numpy(positions_np).to(dev, non_blocking=True)
    host, event = _to_host(assemble_targets(selected, targets, keys, positions), dev)
    return BatchResult(
        examples,
        [e.response_ids for e in examples],  # type: ignore[misc]
        host,
        event,
        tokens=int((t_len + r_len).sum()),
    )


# --------------------------------------------------------------------------- generate mode


class _StepTargets:
    """Logits processor that stores each step's targets from the raw fp32 logits, unchanged."""

    def __init__(self, targets: TargetConfig, keys: torch.Tensor):
        self.targets, self.keys = targets, keys
        self.steps: list[RowTargets] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        pos = torch.full_like(self.keys, len(self.steps))
        self.steps.append(row_targets(scores, self.targets, self.keys, pos))
        return scores


class TokenSampler:
    """Logits processor that draws the next token itself, from counter-based uniforms.

    It returns 0 at the drawn id and -inf elsewhere, so generate's greedy argmax picks it:
    sampling then depends on (seed, example id, step) only, never on the batch it ran in.
    """

    def __init__(self, gen: GenerateConfig, keys: torch.Tensor):
        self.gen, self.keys, self.step = gen, keys, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = log_probs(scores, self.gen.temperature)  # (B, V)
        pos = torch.full_like(self.keys, self.step)
        u = uniforms(row_keys(self.keys, pos, STREAM_GENERATE), 1)  # (B, 1)
        self.step += 1
        if self.gen.top_p < 1.0:
            sorted_lp, order = logp.sort(dim=-1, descending=True)
            p = sorted_lp.exp()
            outside = (p.cumsum(-1) - p) >= self.gen.top_p  # mass before it already ≥ top-p
            token = order.gather(1, sample_ids(sorted_lp.masked_fill(outside, float("-inf")), u))
        else:
            token = sample_ids(logp, u)  # (B, 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


@torch.inference_mode()
def generate_batch(
    teacher: Teacher,
    examples: list[Rendered],
    targets: TargetConfig,
    gen: GenerateConfig,
    ex_keys: np.ndarray,
) -> BatchResult:
    """The teacher writes each response from its full view; targets come from the same steps."""
    from transformers import GenerationConfig, LogitsProcessorList

    B = len(examples)
    t_len = np.array([len(e.teacher_ids) for e in examples])
    T = int(t_len.max())
    ids = np.full((B, T), teacher.pad_id, dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.int64)
    for b, e in enumerate(examples):  # left-padded: every prompt ends at column T - 1
        ids[b, T - t_len[b] :] = e.teacher_ids
        mask[b, T - t_len[b] :] = 1
    dev = teacher.device
    keys = torch.from_numpy(ex_keys).to(dev)
    record = _StepTargets(targets, keys)
    processors: list[Any] = [record]
    if gen.temperature > 0:
        processors.append(TokenSampler(gen, keys))
    config = GenerationConfig(
        max_new_tokens=gen.max_new_tokens,
        do_sample=False,
        eos_token_id=teacher.eos_ids or None,
        pad_token_id=teacher.pad_id,
    )
    seqs = teacher.model.generate(
        input_ids=torch.from_numpy(ids).to(dev),
        attention_mask=torch.from_numpy(mask).to(dev),
        generation_config=config,
        logits_processor=LogitsProcessorList(processors),
    )
    new = seqs[:, T:]  # (B, S)
    S = new.shape[1]
    if teacher.eos_ids:
        is_eos = torch.isin(new, torch.tensor(teacher.eos_ids, device=new.device))
        ended = is_eos.any(-1)
        lengths = torch.where(ended, is_eos.int().argmax(-1) + 1, S)  # response keeps its eos
    else:
        ended = torch.zeros(B, dtype=torch.bool, device=new.device)
        lengths = torch.full((B,), S, device=new.device)
    steps = record.steps[:S]  # generate may run a step past the end and undo it
    valid = torch.arange(S, device=new.device)[None, :] < lengths[:, None]  # (B, S)
    host, event = _to_host(stack_steps(steps, valid), dev)
    new_np, len_np = new.cpu().numpy(), lengths.cpu().numpy()
    responses = [new_np[b, : len_np[b]].astype(np.int64) for b in range(B)]
    return BatchResult(
        examples,
        responses,
        host,
        event,
        tokens=int(t_len.sum() + len_np.sum()),
        finished=int(ended.sum()),
    )
