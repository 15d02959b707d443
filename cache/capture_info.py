"""What a capture records about itself, and the check that a resumed capture matches it.

:func:`dataset_info` is the dataset's description (targets, teacher, views, generation) that
every shard, journal and the manifest carry; it is the same on every rank and every rerun, so
:func:`check_resume` can refuse a rerun whose settings would store something else.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from .capture_config import CONFIG_NAME, CaptureConfig, GenerateConfig
from .errors import IncompatibleError
from .external import ExternalTeacher
from .format import DatasetInfo
from .manifest import committed_manifests
from .storage import Location
from .teacher import Teacher
from .tokenizer import tokenizer_fingerprint
from .views import ViewRenderer


def describe_generation(gen: GenerateConfig, teacher: Teacher | ExternalTeacher) -> dict[str, Any]:
    """Generation settings as recorded in the manifest."""
    if isinstance(teacher, ExternalTeacher):
        sampler = f"{teacher.engine.get('name')}'s sampler, seeded per request by the example's key"
    else:
        sampler = "inverse CDF on counter-based uniforms of (seed, example id, step)"
    return {
        "max_new_tokens": gen.max_new_tokens,
        "strategy": "greedy" if gen.temperature == 0 else "sample",
        "temperature": gen.temperature,
        "top_p": gen.top_p,
        "seed": gen.seed,
        "eos_token_ids": teacher.eos_ids,
        "sampler": sampler,
    }


def dataset_info(
    cfg: CaptureConfig,
    teacher: Teacher | ExternalTeacher,
    renderer: ViewRenderer,
    max_length: int | None,
) -> DatasetInfo:
    """The dataset's description: identical on every rank and every resumed run."""
    t = cfg.targets
    capture = {
        "temperature": t.temperature,
        "mode": t.mode,
        "templates": renderer.describe(),
        "generation": describe_generation(cfg.generate, teacher) if t.mode == "generate" else None,
        "max_length": max_length,
        "truncation": cfg.input.truncation,
        "targets_from": "log_softmax(logits / temperature) in fp32, on the teacher's device",
        "dtype": None,
        "seed": cfg.generate.seed if (t.spec.n or t.mode == "generate") else None,
    }
    if isinstance(teacher, ExternalTeacher):  # the engine, and what its targets are
        capture.update(teacher.describe())
    else:
        capture["dtype"] = str(teacher.model.dtype).removeprefix("torch.")
    # JSON-normalized so that it compares equal to what journals and shards carry.
    return DatasetInfo(
        vocab_size=teacher.vocab_size,
        tokenizer_fingerprint=tokenizer_fingerprint(teacher.tokenizer),
        targets=t.stored(),
        teacher=json.loads(json.dumps(teacher.identity)),
        capture=json.loads(json.dumps(capture)),
    )


def check_resume(loc: Location, info: DatasetInfo, shard_index: int = 0) -> None:
    """Refuse to add to a folder captured with other settings, naming each difference and the
    command that resumes part ``shard_index`` (--shard-index) with the folder's own."""
    new = info.to_json()
    for where, committed in committed_manifests(loc):
        old = committed.info.to_json()
        diffs = [
            f"{group}.{key}: was {json.dumps(old[group].get(key))[:120]}, now {json.dumps(new[group].get(key))[:120]}"
            for group in ("tokenizer", "targets", "teacher", "capture")
            for key in sorted(set(old[group]) | set(new[group]))
            if old[group].get(key) != new[group].get(key)
        ]
        if diffs:
            # The config is saved by part 0 before it commits; a job array's other parts may
            # have committed without it.
            fix = "rerun with the original flags to resume"
            if loc.exists(CONFIG_NAME):
                fix += f", as: {resume_command(loc, shard_index)}"
            raise IncompatibleError(
                f"{where}: the folder {loc} holds a capture with other settings:\n  "
                + "\n  ".join(diffs)
                + f"\n{fix}; or write to a new --out"
            )


def resume_command(loc: Location, shard_index: int = 0) -> str:
    """The command that reruns the capture saved in ``loc`` into ``loc`` itself: ``--out`` is
    given, so a folder moved since (or a relative --out run from elsewhere) resumes in place.
    The saved config is part 0's: another part of a job array adds its ``--shard-index``."""
    config, out = loc.url_of(CONFIG_NAME), loc.url_of()
    part = f" --shard-index {shard_index}" if shard_index else ""
    return f"logitcache build --config {shlex.quote(config)} --out {shlex.quote(out)}{part}"
