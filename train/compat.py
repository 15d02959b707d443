"""Does the run agree with its datasets? Checked before the student is built, all at once.

A dataset's manifest records what its targets mean: the tokenizer they index (fingerprint), the
kind of targets, and the temperature they were captured at (``log_softmax(logits / T)``). A run
whose settings mean something else does not fail; it trains on the wrong thing. So every such
disagreement, with the training and the held-out set alike, is collected here and refused in one
error, with what the loss cannot do with the training set (:func:`loss_problems`). (That the
student's lm_head covers each dataset's vocabulary needs the built student:
:func:`logitcache.train.student.load_student` checks it.)
"""

from __future__ import annotations

import math
from typing import Any

from logitcache.cache.errors import IncompatibleError, InputError
from logitcache.cache.format import DatasetInfo
from logitcache.cache.tokenizer import tokenizer_fingerprint

from .config import Config
from .loss_plan import LossPlan, plan_loss


def check_datasets(cfg: Config, infos: dict[str, DatasetInfo], tokenizer: Any) -> LossPlan:
    """The run's loss resolved for the training set, or one error listing every problem.

    ``infos`` maps each config key (``data.train``, ``data.eval``) to its dataset's info. A
    tokenizer mismatch raises IncompatibleError (another student or dataset is needed); the
    rest are settings to change, and raise InputError.
    """
    tok_path = cfg.model.tokenizer or cfg.model.path or ""
    found = tokenizer_fingerprint(tokenizer)
    incompatible = [
        f"tokenizer mismatch: the dataset {_url(cfg, key)} ({key}) was captured with tokenizer "
        f"{info.tokenizer_fingerprint}, but the student's tokenizer ({tok_path}) is {found}. "
        "Token ids would mean different things; train a student that shares the teacher's "
        "tokenizer (or point model.tokenizer at it)"
        for key, info in infos.items()
        if info.tokenizer_fingerprint != found
    ]
    plan = plan_loss(cfg.loss, infos["data.train"].targets)
    problems = incompatible + temperature_problems(cfg, infos) + loss_problems(plan, cfg.data.train)
    if len(problems) > 1:
        listed = "\n  - ".join(problems)
        problems = [
            f"the run disagrees with its datasets ({len(problems)} problems):\n  - {listed}"
        ]
    if problems:
        raise (IncompatibleError if incompatible else InputError)(problems[0])
    return plan


def loss_problems(plan: LossPlan, url: str) -> list[str]:
    """What the loss cannot do with the training set at ``url``: train on tail draws it does
    not store, or estimate anything but forward KL from sampled targets."""
    problems = []
    if plan.tail_draws and not plan.stored_draws:
        problems.append(
            f"loss.tail=draws, but {url} holds {plan.targets.label} targets without tail draws; "
            "capture with `logitcache build --k K --n N` for tail draws, or set loss.tail=auto"
        )
    divergence = plan.loss.divergence
    if plan.sampled and divergence != "forward_kl":
        other = "loss.tail=bucket" if plan.tail_draws else "a top-k dataset"
        problems.append(
            f"loss.divergence={divergence} cannot be estimated from sampled targets ({url}); "
            f"use loss.divergence=forward_kl or {other}"
        )
    return problems


def capture_temperature(info: DatasetInfo) -> float | None:
    """The temperature the dataset's targets were captured at; None when it does not say."""
    value = info.capture.get("temperature")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def temperature_problems(cfg: Config, infos: dict[str, DatasetInfo]) -> list[str]:
    """The KD term divides the student's logits by loss.temperature and compares them with
    targets the teacher made at its capture temperature: the two must be the same number, and
    the held-out set (scored at loss.temperature) must have been captured at it too."""
    lo = cfg.loss
    if lo.allow_temperature_mismatch:
        return []
    allow = "--loss.allow_temperature_mismatch true"
    problems = []
    train_t = capture_temperature(infos["data.train"])
    if train_t is not None and not math.isclose(train_t, lo.temperature, rel_tol=1e-6):
        problems.append(
            f"loss.temperature={lo.temperature!r} but data.train={cfg.data.train!r} was captured "
            f"at temperature {train_t!r} (capture.temperature in its manifest.json): the KD term "
            f"would compare the teacher softened by {train_t!r} with the student softened by "
            f"{lo.temperature!r}. Pass --loss.temperature {train_t!r}, or {allow} if the "
            "mismatch is deliberate"
        )
    want = lo.temperature if train_t is None else train_t
    eval_t = capture_temperature(infos["data.eval"]) if "data.eval" in infos else None
    if eval_t is not None and not math.isclose(eval_t, want, rel_tol=1e-6):
        trains = f"data.train's {want!r}" if train_t is not None else f"loss.temperature={want!r}"
        problems.append(
            f"data.eval={cfg.data.eval!r} was captured at temperature {eval_t!r} "
            f"(capture.temperature in its manifest.json) but training runs at {trains}: its "
            f"held-out KL would compare the teacher at {eval_t!r} with the student at {want!r}. "
            f"Hold out a set captured with `logitcache build` at --temperature {want!r}, or "
            f"pass {allow} to score it anyway"
        )
    return problems


def _url(cfg: Config, key: str) -> str:
    return str(getattr(cfg.data, key.removeprefix("data.")))
