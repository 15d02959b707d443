"""`logitcache build`: capture teacher targets over full-context prompts into a logit dataset.

The flags are generated from :class:`logitcache.cache.capture_config.CaptureConfig`: one per
field, its docstring as help. Examples:

    logitcache build --teacher TEACHER_DIR --prompts prompts.jsonl --context fewshot.json \\
        --mode generate --k 64 --out ds/
    torchrun --nproc-per-node 8 -m logitcache.tools.cli build ... --out ds/   # one writer per rank
    torchrun --nproc-per-node 8 -m logitcache.tools.cli build ... --tp 4   # 2 teachers of 4 GPUs
    logitcache build ... --num-shards 16 --shard-index $TASK_ID --out ds/     # job array, then:
    logitcache finalize ds/
    logitcache build --config ds/capture_config.json        # the saved settings, run again

Rerunning the same command after a crash skips what is committed and captures the rest.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from logitcache.cache.capture_config import CaptureConfig, load_capture_config
from logitcache.cache.errors import InputError
from logitcache.cache.settings import ConfigFile, add_flags, flag_sources

HELP = "capture teacher targets over full-context prompts into a logit dataset"


def add_arguments(p: argparse.ArgumentParser) -> None:
    required = add_flags(p, CaptureConfig, dotted=False)
    p.add_argument(
        "--config",
        metavar="FILE",
        action=ConfigFile,
        relaxes=tuple(required),
        help="start from these settings: a dataset's capture_config.json (or YAML of the same "
        "groups); the flags given override them. Reruns (resumes) a capture as it was run",
    )


def config_from_args(args: argparse.Namespace) -> CaptureConfig:
    """The settings of the file (``--config``), then the flags given; one error lists every
    problem, flags that do not apply to the targets asked for among them."""
    cfg = load_capture_config(args.config, flag_sources(args, CaptureConfig))
    problems = []
    wrong = [f for f, v in (("--k", args.k), ("--codec", args.codec)) if v is not None]
    if cfg.targets.spec.kind == "sampled" and wrong:
        problems.append(
            f"{' and '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not apply to sampled "
            f"targets (N draws from the whole distribution); drop "
            f"{'it' if len(wrong) == 1 else 'them'}, or use top-k targets (--targets topk, "
            f"the default), where --n counts draws from the tail"
        )
    problems += cfg.validate()
    if problems:  # as capture() words them
        raise InputError("invalid settings:\n  " + "\n  ".join(problems))
    return cfg


def run(args: argparse.Namespace) -> int:
    from logitcache.cache.capture import capture

    cfg = config_from_args(args)
    summary = capture(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        for line in summary.lines():
            print(line)
        if not summary.finalized:
            print(
                f"part {cfg.run.shard_index} of {cfg.run.num_shards} done; once every part is "
                f"done run: logitcache finalize {shlex.quote(cfg.run.out)}",
                file=sys.stderr,
            )
    return 0
