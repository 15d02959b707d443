"""Teacher targets as the losses take them, and the checks every loss runs on its inputs.

Each check returns a list of problems rather than raising, so a call reports every problem
at once; :func:`raise_if` turns the list into one ``ValueError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd")
TAIL_MODES: tuple[str, ...] = ("bucket", "renorm")


@dataclass(frozen=True)
class TopKTargets:
    """Teacher top-k log-probs for N loss positions.

    Valid ids in a row must be distinct. Padding entries (rows with fewer than K ids) have
    ``logprobs == -inf`` and may repeat any id; they contribute nothing.
    """

    ids: torch.Tensor
    """(N, K) int64 teacher top-k token ids."""
    logprobs: torch.Tensor
    """(N, K) float log-probs under the teacher's full-vocabulary softmax; -inf for padding."""
    tail_logmass: torch.Tensor
    """(N,) float log(1 - sum(exp(logprobs))); -inf when the top-k holds all the mass.

    Write it as a logsumexp of the teacher's log-probs outside the top-k: log1p(-sum) cancels
    catastrophically when the top-k holds nearly all the mass (the bucket losses see it)."""

    def __post_init__(self) -> None:
        problems = check_pair("TopKTargets", "ids", self.ids, "logprobs", self.logprobs)
        if self.tail_logmass.shape != self.ids.shape[:1]:
            problems.append(
                f"TopKTargets.tail_logmass has shape {tuple(self.tail_logmass.shape)}, "
                f"expected ({self.ids.shape[0]},): one value per row of ids"
            )
        raise_if(problems)


@dataclass(frozen=True)
class SampledTargets:
    """RS-KD targets: unique ids drawn from the teacher, weighted by their draw frequency.

    A row's weights are ``count / n_draws`` and sum to 1; padding entries have weight 0.
    """

    ids: torch.Tensor
    """(N, S) int64 sampled token ids, padded."""
    weights: torch.Tensor
    """(N, S) float count / n_draws; 0 for padding."""

    def __post_init__(self) -> None:
        raise_if(check_pair("SampledTargets", "ids", self.ids, "weights", self.weights))


Targets = TopKTargets | SampledTargets


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
    if isinstance(targets, TopKTargets | SampledTargets):
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
    if not isinstance(targets, TopKTargets | SampledTargets):
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
