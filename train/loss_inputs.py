"""The loss inputs: teacher targets as the losses take them, and the checks every loss runs.

A batch's targets are N flat rows, one per loss position, of one of two small types:
:class:`TopKTargets` and :class:`SampledTargets`. Both take rows, move and pin themselves
(:class:`TargetRows`), so the batches, the loader and the student pass them along without
looking at the kind. What differs between the kinds lives here: how the cache's examples are
stacked into them (:func:`stack_targets`), which options a loss accepts for them
(:func:`check_options`), and, in :mod:`logitcache.train.row_losses`, the one place a loss
tells them apart.

Each check returns a list of problems rather than raising, so a call reports every problem
at once; :func:`raise_if` turns the list into one ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import ClassVar, TypeVar

import numpy as np
import torch

from logitcache.cache.format import Example, Sampled, TargetSpec, TopK

DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd")
TAIL_MODES: tuple[str, ...] = ("bucket", "renorm")

_Rows = TypeVar("_Rows", bound="TargetRows")


class TargetRows:
    """What both kinds of targets share: N rows of tensors that move and index together.

    ``scores`` ranks a row's entries (higher is likelier); entries at ``NO_MASS`` are padding.
    """

    NO_MASS: ClassVar[float]
    ids: torch.Tensor

    @property
    def scores(self) -> torch.Tensor:
        raise NotImplementedError

    def map(self: _Rows, fn: Callable[[torch.Tensor], torch.Tensor]) -> _Rows:
        """The same kind of targets with ``fn`` applied to each of its tensors."""
        return type(self)(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})  # type: ignore[arg-type]

    def __getitem__(self: _Rows, rows: torch.Tensor | slice) -> _Rows:
        """The rows ``rows``: an index tensor (N',) or a slice."""
        return self.map(lambda t: t[rows])

    def to(self: _Rows, device: torch.device | str, non_blocking: bool = False) -> _Rows:
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self: _Rows) -> _Rows:
        return self.map(torch.Tensor.pin_memory)

    def counted(self) -> torch.Tensor:
        """(N, J) bool: the entries that carry teacher mass (False on padding)."""
        return self.scores > self.NO_MASS

    def top1(self) -> torch.Tensor:
        """(N,) the teacher's most likely id per row."""
        best = self.scores.argmax(dim=-1, keepdim=True)  # (N, 1)
        return self.ids.gather(1, best).squeeze(1)


@dataclass(frozen=True)
class TopKTargets(TargetRows):
    """Teacher top-k log-probs for N loss positions.

    Valid ids in a row must be distinct. Padding entries (rows with fewer than K ids) have
    ``logprobs == -inf`` and may repeat any id; they contribute nothing.
    """

    NO_MASS: ClassVar[float] = float("-inf")

    ids: torch.Tensor
    """(N, K) int64 teacher top-k token ids."""
    logprobs: torch.Tensor
    """(N, K) float log-probs under the teacher's full-vocabulary softmax; -inf for padding."""
    tail_logmass: torch.Tensor
    """(N,) float log(1 - sum(exp(logprobs))); -inf when the top-k holds all the mass.

    Write it as a logsumexp of the teacher's log-probs outside the top-k: log1p(-sum) cancels
    catastrophically when the top-k holds nearly all the mass (the bucket losses see it)."""

    @property
    def scores(self) -> torch.Tensor:
        return self.logprobs

    def __post_init__(self) -> None:
        problems = check_pair("TopKTargets", "ids", self.ids, "logprobs", self.logprobs)
        if self.tail_logmass.shape != self.ids.shape[:1]:
            problems.append(
                f"TopKTargets.tail_logmass has shape {tuple(self.tail_logmass.shape)}, "
                f"expected ({self.ids.shape[0]},): one value per row of ids"
            )
        raise_if(problems)


@dataclass(frozen=True)
class SampledTargets(TargetRows):
    """RS-KD targets: unique ids drawn from the teacher, weighted by their draw frequency.

    A row's weights are ``count / n_draws`` and sum to 1; padding entries have weight 0.
    """

    NO_MASS: ClassVar[float] = 0.0

    ids: torch.Tensor
    """(N, S) int64 sampled token ids, padded."""
    weights: torch.Tensor
    """(N, S) float count / n_draws; 0 for padding."""

    @property
    def scores(self) -> torch.Tensor:
        return self.weights

    def __post_init__(self) -> None:
        raise_if(check_pair("SampledTargets", "ids", self.ids, "weights", self.weights))


Targets = TopKTargets | SampledTargets


# --------------------------------------------------------------------------- from the cache


def stack_targets(
    rows: list[tuple[Example, int, int]], spec: TargetSpec, tail_draws: bool = False
) -> Targets:
    """Each row's targets ``[a, z)`` (``rows``: example, first, last + 1) stacked into N flat
    rows of a dataset whose targets are ``spec``.

    ``tail_draws``: a top-k dataset's tail draws are used, so the targets are
    :class:`SampledTargets` holding the top-k ids at their probabilities and each drawn tail id
    at ``exp(tail_logmass) · count / n_j`` (n_j: the position's own draws, the sum of its
    counts); otherwise top-k datasets give :class:`TopKTargets`.
    """
    if spec.kind == "sampled":
        draws = [(ex.targets, a, z) for ex, a, z in rows]
        ids, weights = _padded_draws(draws)  # type: ignore[arg-type]
        return SampledTargets(torch.from_numpy(ids), torch.from_numpy(weights))  # (N, S) each
    if tail_draws:
        if not spec.n:
            raise ValueError(f"tail_draws=True, but the dataset stores {spec.label} (no draws)")
        return _head_and_tail(rows, spec.k)
    top_ids, lps, tail = _stacked_topk(rows, spec.k)
    return TopKTargets(
        torch.from_numpy(top_ids.astype(np.int64)),  # (N, K)
        torch.from_numpy(lps.astype(np.float32)),  # (N, K)
        torch.from_numpy(tail.astype(np.float32)),  # (N,)
    )


def _padded_draws(rows: list[tuple[Sampled, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(N, S) ids and count / n_p weights of positions ``[a, z)`` of each row's draws, padded
    with id 0 at weight 0 to the most distinct ids S of a position. n_p is the position's
    number of draws, the sum of its counts: the dataset's n, or fewer where draws were
    allocated by tail mass (targets.n_rate)."""
    # Position p's unique ids are a run of nunique[p] entries; pad runs to S.
    ids_l, counts_l, nun_l = [], [], []
    for t, a, z in rows:
        off = np.concatenate([[0], np.cumsum(t.nunique)])
        ids_l.append(t.ids[off[a] : off[z]])
        counts_l.append(t.counts[off[a] : off[z]])
        nun_l.append(t.nunique[a:z])
    nunique = _cat(nun_l, (0,)).astype(np.int64)
    N, S = len(nunique), max(int(nunique.max(initial=0)), 1)
    flat_ids, flat_counts = _cat(ids_l, (0,)), _cat(counts_l, (0,))
    row = np.repeat(np.arange(N), nunique)
    col = np.arange(len(flat_ids)) - np.repeat(np.cumsum(nunique) - nunique, nunique)
    ids = np.zeros((N, S), dtype=np.int64)
    weights = np.zeros((N, S), dtype=np.float32)
    ids[row, col] = flat_ids
    n_p = np.bincount(row, weights=flat_counts, minlength=N).astype(np.float32)  # (N,) draws
    weights[row, col] = flat_counts.astype(np.float32) / n_p[row]
    return ids, weights


def _stacked_topk(
    rows: list[tuple[Example, int, int]], k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's top-k positions ``[a, z)`` stacked: (N, K) ids and log-probs, (N,) tails.

    K is k, or with adaptive top-k (``TopK.counts``) the most ids kept at one of the N
    positions: the kept ids come first in each row, so the columns past K are all padding."""
    tops: list[TopK] = [ex.targets for ex, _, _ in rows]  # type: ignore[misc]
    spans = [(a, z) for _, a, z in rows]
    ids = _cat([t.ids[a:z] for t, (a, z) in zip(tops, spans, strict=True)], (0, k))
    lps = _cat([t.logprobs[a:z] for t, (a, z) in zip(tops, spans, strict=True)], (0, k))
    tail = _cat([t.tail_logmass[a:z] for t, (a, z) in zip(tops, spans, strict=True)], (0,))
    if tops and tops[0].counts is not None:
        counts = [t.counts[a:z] for t, (a, z) in zip(tops, spans, strict=True)]  # type: ignore[index]
        width = max((int(c.max(initial=1)) for c in counts), default=1)
        ids, lps = ids[:, :width], lps[:, :width]
    return ids, lps, tail


def _head_and_tail(rows: list[tuple[Example, int, int]], k: int) -> SampledTargets:
    """Top-k with tail draws as one sparse distribution: (N, K + S) ids and weights. A
    position without draws (no tail mass, or none allocated to it) has only its head."""
    head_ids, head_lp, tail = _stacked_topk(rows, k)
    draws = [(ex.targets.tail_draws, a, z) for ex, a, z in rows]  # type: ignore[union-attr]
    tail_ids, tail_w = _padded_draws(draws)  # type: ignore[arg-type]
    ids = np.concatenate([head_ids.astype(np.int64), tail_ids], axis=1)
    weights = np.concatenate(
        [np.exp(head_lp, dtype=np.float32), tail_w * np.exp(tail, dtype=np.float32)[:, None]],
        axis=1,
    )
    return SampledTargets(torch.from_numpy(ids), torch.from_numpy(weights))


def _cat(parts: list[np.ndarray], empty_shape: tuple[int, ...]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(empty_shape)


# --------------------------------------------------------------------------- checks


def raise_if(problems: list[str]) -> None:
    if len(problems) == 1:
        raise ValueError(problems[0])
    if problems:
        raise ValueError(f"{len(problems)} problems:\n  - " + "\n  - ".join(problems))


def check_pair(
    owner: str, ids_name: str, ids: torch.Tensor, values_name: str, values: torch.Tensor
) -> list[str]:
    problems = []
    if ids.dim() != 2:
        problems.append(f"{owner}.{ids_name} must be 2-D (N, K), got shape {tuple(ids.shape)}")
    if ids.dtype != torch.int64:
        problems.append(f"{owner}.{ids_name} must be int64, got {ids.dtype}; use .long()")
    if values.shape != ids.shape:
        problems.append(
            f"{owner}.{values_name} has shape {tuple(values.shape)} but {ids_name} has "
            f"{tuple(ids.shape)}; they must match entry for entry"
        )
    if not values.is_floating_point():
        problems.append(f"{owner}.{values_name} must be a float tensor, got {values.dtype}")
    return problems


def check_student(
    logits: torch.Tensor, targets: Targets | None, labels: torch.Tensor | None, mask: torch.Tensor
) -> list[str]:
    """Every problem with dense-loss inputs: the logits, then the per-row tensors."""
    problems = check_logits(logits)
    n = logits.shape[0] if logits.dim() == 2 else None
    return problems + check_rows(n, logits.device, targets, labels, mask)


def check_logits(logits: torch.Tensor) -> list[str]:
    problems = []
    if logits.dim() != 2:
        problems.append(
            f"student_logits must be 2-D (N, V) with the loss positions flattened, "
            f"got shape {tuple(logits.shape)}; use logits.flatten(0, -2)"
        )
    if not logits.is_floating_point():
        problems.append(f"student_logits must be a float tensor, got {logits.dtype}")
    return problems


def check_rows(
    n: int | None,
    device: torch.device,
    targets: Targets | None,
    labels: torch.Tensor | None,
    mask: torch.Tensor,
) -> list[str]:
    """Per-row inputs against N logit rows on ``device``; ``n=None`` skips the row counts."""
    problems = []
    if n is not None and mask.shape != (n,):
        problems.append(f"mask has shape {tuple(mask.shape)}, expected ({n},): one per row")
    if mask.dtype != torch.bool:
        problems.append(f"mask must be torch.bool, got {mask.dtype}; pass mask.bool()")
    if labels is not None:
        if n is not None and labels.shape != (n,):
            problems.append(f"labels has shape {tuple(labels.shape)}, expected ({n},)")
        if labels.dtype != torch.int64:
            problems.append(f"labels must be int64, got {labels.dtype}; use .long()")
    tensors = {"mask": mask, "labels": labels}
    if isinstance(targets, TargetRows):
        kind = type(targets).__name__
        if n is not None and targets.ids.shape[0] != n:
            problems.append(
                f"{kind} has {targets.ids.shape[0]} rows but the student has {n} (N); "
                f"select the targets at the same positions as the logits"
            )
        tensors[f"{kind}.ids"] = targets.ids
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != device:
            problems.append(
                f"{name} is on {tensor.device} but the student is on {device}; move it "
                f"with .to({str(device)!r})"
            )
    return problems


def check_options(
    targets: Targets,
    divergence: str,
    beta: float,
    temperature: float,
    tail: str,
    *,
    alpha: float | None = None,
) -> list[str]:
    if not isinstance(targets, TargetRows):
        raise TypeError(
            f"targets must be TopKTargets or SampledTargets, got {type(targets).__name__}"
        )
    problems = []
    if divergence not in DIVERGENCES:
        problems.append(f"divergence={divergence!r} is not one of {', '.join(DIVERGENCES)}")
    if tail not in TAIL_MODES:
        problems.append(f"tail={tail!r} is not one of {', '.join(TAIL_MODES)}")
    if not 0.0 <= beta <= 1.0:
        problems.append(f"beta={beta} is outside [0, 1]; it is the JSD mixing weight")
    if not (math.isfinite(temperature) and temperature > 0):
        problems.append(f"temperature={temperature} must be a positive finite number")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        problems.append(f"alpha={alpha} is outside [0, 1]; total = alpha*kd + (1-alpha)*ce")
    if isinstance(targets, SampledTargets) and divergence in ("reverse_kl", "jsd"):
        problems.append(
            f"divergence={divergence!r} cannot be estimated from SampledTargets: teacher "
            f"samples only give an unbiased forward-KL (cross-entropy) estimate; use "
            f"divergence='forward_kl', or cache TopKTargets for reverse_kl/jsd"
        )
    if isinstance(targets, TopKTargets) and tail == "renorm" and divergence != "forward_kl":
        problems.append(
            f"tail='renorm' is defined for forward_kl only, got divergence={divergence!r}; "
            f"use tail='bucket'"
        )
    return problems


def check_lm_head(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunk_size: int
) -> list[str]:
    problems = []
    if hidden.dim() != 2:
        problems.append(
            f"hidden must be 2-D (N, H), got shape {tuple(hidden.shape)}; use hidden.flatten(0, -2)"
        )
    if weight.dim() != 2:
        problems.append(f"lm_head_weight must be 2-D (V, H), got shape {tuple(weight.shape)}")
    elif hidden.dim() == 2 and weight.shape[1] != hidden.shape[1]:
        problems.append(
            f"lm_head_weight has shape {tuple(weight.shape)} but hidden has H="
            f"{hidden.shape[1]}; pass the (V, H) weight, e.g. model.lm_head.weight"
        )
    if bias is not None and weight.dim() == 2 and bias.shape != weight.shape[:1]:
        problems.append(
            f"lm_head_bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)"
        )
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        problems.append(f"chunk_size={chunk_size!r} must be a positive int, or 0 for auto")
    return problems
