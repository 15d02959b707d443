"""`logitcache build`: capture teacher targets over full-context prompts into a logit dataset.

Flags mirror :class:`logitcache.cache.capture_config.CaptureConfig` one for one. Examples:

    logitcache build --teacher TEACHER_DIR --prompts prompts.jsonl --context fewshot.json \\
        --mode generate --k 64 --out ds/
    torchrun --nproc-per-node 8 -m logitcache.tools.cli build ... --out ds/   # one writer per rank
    logitcache build ... --num-shards 16 --shard-index $TASK_ID --out ds/     # job array, then:
    logitcache finalize ds/

Rerunning the same command after a crash skips what is committed and captures the rest.
"""

from __future__ import annotations

import argparse
import os
import sys

from logitcache.cache.capture_config import (
    CaptureConfig,
    GenerateConfig,
    InputConfig,
    RunConfig,
    TargetConfig,
    TeacherConfig,
)
from logitcache.cache.codecs import CODECS
from logitcache.cache.errors import InputError
from logitcache.cache.format import SAMPLINGS

HELP = "capture teacher targets over full-context prompts into a logit dataset"


def add_arguments(p: argparse.ArgumentParser) -> None:
    d_in, d_t, d_tg = InputConfig(prompts=()), TeacherConfig(path=""), TargetConfig()
    d_g, d_r = GenerateConfig(), RunConfig(out="")

    g = p.add_argument_group("input and views")
    g.add_argument(
        "--prompts",
        nargs="+",
        required=True,
        metavar="SRC",
        help="prompt records: *.jsonl, *.jsonl.zst, *.parquet, a datasets "
        "save_to_disk folder, a folder of such files, a glob, or an fsspec URL",
    )
    g.add_argument(
        "--context",
        metavar="FILE",
        help="shared context shown to the teacher only: plain text (a system prompt), "
        "or a JSON list of chat messages (a few-shot block)",
    )
    g.add_argument(
        "--render",
        choices=["chat", "plain"],
        default=d_in.render,
        help="text prompts through the chat template (default) or as plain text; "
        "'messages' records always use the chat template",
    )
    g.add_argument(
        "--on-error",
        choices=["raise", "skip"],
        default=d_in.on_error,
        help="on a malformed record: stop (default), or skip it and list it in the "
        "manifest's extra.skipped",
    )
    g.add_argument(
        "--max-length",
        type=int,
        default=d_in.max_length,
        metavar="N",
        help="tokens per view, prompt + response (default: the teacher's context size)",
    )
    g.add_argument(
        "--truncation",
        choices=["error", "left", "drop"],
        default=d_in.truncation,
        help="over-long examples: raise (default), cut the teacher context from the "
        "left, or drop them (counted in the manifest)",
    )

    g = p.add_argument_group("teacher")
    g.add_argument(
        "--teacher",
        required=True,
        metavar="DIR",
        help="local folder of a causal LM: config.json + *.safetensors",
    )
    g.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: --teacher)")
    g.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default=d_t.dtype,
        help="auto: bfloat16 on GPU, float32 on CPU",
    )
    g.add_argument(
        "--device",
        default=d_t.device,
        help="auto: cuda:LOCAL_RANK when CUDA is available, else cpu",
    )
    g.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the model folder's own code (off by default)",
    )

    g = p.add_argument_group("targets")
    g.add_argument(
        "--mode",
        choices=["score", "generate"],
        default=d_tg.mode,
        help="score: teacher-force each record's response; generate: the teacher writes it",
    )
    g.add_argument(
        "--targets",
        dest="kind",
        choices=["topk", "sampled"],
        default=None,
        help=f"topk: the k most likely ids with log-probs, the tail mass and N draws from the "
        f"tail; sampled: N draws from the whole distribution ({d_tg.kind})",
    )
    g.add_argument("--k", type=int, default=None, help=f"top-k ids per position ({d_tg.k})")
    g.add_argument(
        "--n",
        type=int,
        default=None,
        help=f"draws per position, ≤ 255: from the tail for top-k (0: none), from the whole "
        f"distribution for sampled ({d_tg.n})",
    )
    g.add_argument(
        "--sampling",
        choices=list(SAMPLINGS),
        default=None,
        help=f"how the N draws are made: systematic (lower variance) or multinomial "
        f"({d_tg.sampling})",
    )
    g.add_argument(
        "--codec",
        choices=list(CODECS),
        default=None,
        help=f"storage of top-k log-probs, docs/FORMAT.md ({d_tg.codec})",
    )
    g.add_argument(
        "--temperature",
        type=float,
        default=d_tg.temperature,
        help="targets are log_softmax(logits / temperature)",
    )

    g = p.add_argument_group("generation (--mode generate)")
    g.add_argument("--max-new-tokens", type=int, default=d_g.max_new_tokens)
    g.add_argument(
        "--gen-temperature",
        type=float,
        default=d_g.temperature,
        help="0: greedy (default); > 0: sample at this temperature",
    )
    g.add_argument("--top-p", type=float, default=d_g.top_p, help="nucleus mass when sampling")
    g.add_argument(
        "--seed",
        type=int,
        default=d_g.seed,
        help="seeds generation sampling and sampled targets, per example id",
    )
    g.add_argument(
        "--eos-token-ids",
        nargs="+",
        type=int,
        metavar="ID",
        help="ids that end a response (default: the teacher's generation_config.json, else "
        "its config.json, else the tokenizer's eos token)",
    )

    g = p.add_argument_group("output and scale")
    g.add_argument("--out", required=True, metavar="DIR", help="dataset folder or fsspec URL")
    g.add_argument(
        "--max-batch-tokens",
        type=int,
        default=d_r.max_batch_tokens,
        help="padded tokens per batch (generate: prompt + max new tokens)",
    )
    g.add_argument(
        "--shard-positions",
        type=int,
        default=d_r.shard_positions,
        help="response positions per shard",
    )
    g.add_argument(
        "--num-shards",
        type=int,
        default=d_r.num_shards,
        help="split the prompts into this many job-array parts (without torchrun)",
    )
    g.add_argument(
        "--shard-index",
        type=int,
        default=d_r.shard_index,
        help="this job's part; run `logitcache finalize OUT` after the last one",
    )
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def target_kind(args: argparse.Namespace) -> str:
    """--targets, else the default kind; an error names flags that do not apply to it."""
    kind = args.kind or TargetConfig().kind
    wrong = [f for f, v in (("--k", args.k), ("--codec", args.codec)) if v is not None]
    if kind == "sampled" and wrong:
        raise InputError(
            f"{' and '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not apply to sampled "
            f"targets (N draws from the whole distribution); drop "
            f"{'it' if len(wrong) == 1 else 'them'}, or use top-k targets (--targets topk, "
            f"the default), where --n counts draws from the tail"
        )
    return kind


def config_from_args(args: argparse.Namespace) -> CaptureConfig:
    d = TargetConfig()
    return CaptureConfig(
        input=InputConfig(
            prompts=tuple(args.prompts),
            context=args.context,
            render=args.render,
            on_error=args.on_error,
            max_length=args.max_length,
            truncation=args.truncation,
        ),
        teacher=TeacherConfig(
            path=args.teacher,
            tokenizer=args.tokenizer,
            dtype=args.dtype,
            device=args.device,
            trust_remote_code=args.trust_remote_code,
        ),
        targets=TargetConfig(
            mode=args.mode,
            kind=target_kind(args),
            k=d.k if args.k is None else args.k,
            n=d.n if args.n is None else args.n,
            sampling=args.sampling or d.sampling,
            codec=args.codec or d.codec,
            temperature=args.temperature,
        ),
        generate=GenerateConfig(
            max_new_tokens=args.max_new_tokens,
            temperature=args.gen_temperature,
            top_p=args.top_p,
            seed=args.seed,
            eos_token_ids=None if args.eos_token_ids is None else tuple(args.eos_token_ids),
        ),
        run=RunConfig(
            out=args.out,
            max_batch_tokens=args.max_batch_tokens,
            shard_positions=args.shard_positions,
            num_shards=args.num_shards,
            shard_index=args.shard_index,
            progress=args.progress,
        ),
    )


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
                f"done run: logitcache finalize {cfg.run.out}",
                file=sys.stderr,
            )
    return 0
