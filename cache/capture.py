"""Capture: prompts in, a logit dataset out. Resumable, exactly once, on one or many ranks.

The loop is: read and validate every record; keep this rank's part (records are numbered and
part ``p`` of ``P`` owns numbers ``i % P == p``, P = ranks × ``--num-shards``); render and
tokenize its views; apply the length policy; drop ids already committed (a rerun after a
crash resumes there); batch by length; run the teacher; hand examples to a background writer.
Each part writes its own shards and journal (writer id ``r<part>``); when every rank is done,
rank 0 finalizes the manifest. Job arrays (``--num-shards``) finalize with
``logitcache finalize``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from .capture_config import CONFIG_NAME, CaptureConfig
from .engine import (
    BatchResult,
    Teacher,
    check_teacher_folder,
    describe_generation,
    generate_batch,
    load_teacher,
    load_tokenizer,
    plan_batches,
    resolve_device,
    score_batch,
)
from .eos import check_turn_end, generation_eos_ids
from .errors import IncompatibleError, InputError
from .format import DatasetInfo, TargetSpec
from .manifest import committed_manifests, finalize
from .prompts import Skipped, read_prompts
from .reader import committed_ids
from .storage import Location
from .targets import example_keys
from .tokenizer import tokenizer_fingerprint
from .views import Context, Rendered, ViewRenderer, apply_length_policy
from .writer import DatasetWriter

log = logging.getLogger(__name__)
_BARRIER_TIMEOUT = timedelta(days=1)  # ranks finish at different times; a crash ends torchrun
_LISTED_DROPS = 100


@dataclass
class CaptureSummary:
    """What one capture did (all ranks), and the dataset it left."""

    examples: int = 0
    positions: int = 0
    tokens: int = 0
    seconds: float = 0.0
    already_committed: int = 0
    skipped: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    finished_responses: int = 0
    """Generate mode: responses that ended with an end-of-sequence id."""
    mode: str = "score"
    dataset_examples: int | None = None
    dataset_positions: int | None = None
    dataset_bytes: int | None = None
    finalized: bool = False

    def lines(self) -> list[str]:
        rate = self.seconds or float("nan")
        out = [
            f"captured {self.examples:,} examples, {self.positions:,} positions in "
            f"{self.seconds:.1f} s: {self.examples / rate:,.2f} examples/s, "
            f"{self.tokens / rate:,.0f} tokens/s"
        ]
        notes = []
        if self.mode == "generate" and self.examples:
            notes.append(
                f"{self.finished_responses:,} of {self.examples:,} responses ended with an "
                "end-of-sequence id (the rest reached --max-new-tokens)"
            )
        if self.already_committed:
            notes.append(f"{self.already_committed:,} already committed (resumed)")
        if self.skipped:
            notes.append(f"{self.skipped:,} malformed records skipped")
        if self.dropped_too_long or self.truncated:
            notes.append(
                f"{self.truncated:,} truncated, {self.dropped_too_long:,} dropped as too long"
            )
        if notes:
            out.append("; ".join(notes))
        if self.dataset_examples is not None and self.dataset_positions:
            assert self.dataset_bytes is not None
            out.append(
                f"dataset: {self.dataset_examples:,} examples, {self.dataset_positions:,} "
                f"positions, {self.dataset_bytes:,} bytes, "
                f"{self.dataset_bytes / self.dataset_positions:.1f} bytes/position"
            )
        return out


# --------------------------------------------------------------------------- ranks


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int
    world: int
    local_rank: int

    @classmethod
    def from_env(cls) -> Ranks:
        env = os.environ
        try:
            return cls(
                int(env.get("RANK", "0")),
                int(env.get("WORLD_SIZE", "1")),
                int(env.get("LOCAL_RANK", "0")),
            )
        except ValueError as e:
            raise InputError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({e})") from None

    def init(self, device: torch.device) -> bool:
        """Join the process group (gloo on CPU, nccl on GPU); True when this call created it."""
        import torch.distributed as dist

        if self.world == 1 or dist.is_initialized():
            return False
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=_BARRIER_TIMEOUT)
        return True

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over ranks (nccl reduces GPU tensors only, gloo CPU ones)."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        on = device if dist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=on)
        dist.all_reduce(t)
        return t.cpu().tolist()


# --------------------------------------------------------------------------- info


def dataset_info(
    cfg: CaptureConfig, teacher: Teacher, renderer: ViewRenderer, max_length: int | None
) -> DatasetInfo:
    """The dataset's description: identical on every rank and every resumed run."""
    t = cfg.targets
    spec = TargetSpec(
        kind=t.kind,
        k=t.k if t.kind == "topk" else 0,
        n=t.n,  # sampled: draws; top-k: draws from the tail (0: none)
        codec=t.codec,
        sampling=t.sampling,
    )
    capture = {
        "temperature": t.temperature,
        "mode": t.mode,
        "templates": renderer.describe(),
        "generation": describe_generation(cfg.generate, teacher) if t.mode == "generate" else None,
        "max_length": max_length,
        "truncation": cfg.input.truncation,
        "targets_from": "log_softmax(logits / temperature) in fp32, on the teacher's device",
        "dtype": str(teacher.model.dtype).removeprefix("torch."),
        "seed": cfg.generate.seed if (t.n or t.mode == "generate") else None,
    }
    # JSON-normalized so that it compares equal to what journals and shards carry.
    return DatasetInfo(
        vocab_size=teacher.vocab_size,
        tokenizer_fingerprint=tokenizer_fingerprint(teacher.tokenizer),
        targets=spec,
        teacher=json.loads(json.dumps(teacher.identity)),
        capture=json.loads(json.dumps(capture)),
    )


def check_resume(loc: Location, info: DatasetInfo) -> None:
    """Refuse to add to a folder captured with other settings, naming each difference."""
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
            raise IncompatibleError(
                f"{where}: the folder {loc} holds a capture with other settings:\n  "
                + "\n  ".join(diffs)
                + f"\nrerun with the original flags to resume (see {CONFIG_NAME} in the folder), "
                "or write to a new --out"
            )


# --------------------------------------------------------------------------- capture


def capture(
    cfg: CaptureConfig,
    *,
    storage_options: dict[str, Any] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> CaptureSummary:
    """Run one capture as configured; returns its summary (dataset totals on rank 0).

    ``on_batch(n)`` is called after the n-th batch has been handed to the writer (progress
    hooks, tests that simulate a crash).
    """
    problems = cfg.validate()
    if problems:
        raise InputError("invalid settings:\n  " + "\n  ".join(problems))
    ranks = Ranks.from_env()
    device = resolve_device(cfg.teacher.device)
    created = ranks.init(device)
    try:
        return _capture(cfg, ranks, device, storage_options, on_batch)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _capture(
    cfg: CaptureConfig,
    ranks: Ranks,
    device: torch.device,
    storage_options: dict[str, Any] | None,
    on_batch: Callable[[int], None] | None,
) -> CaptureSummary:
    inp, tgt, run = cfg.input, cfg.targets, cfg.run
    check_teacher_folder(cfg.teacher.path)  # before the slow work
    prompts = read_prompts(
        inp.prompts,
        require_response=tgt.mode == "score",
        on_error=inp.on_error,
        storage_options=storage_options,
    )
    context = Context.load(inp.context, storage_options) if inp.context else None
    tokenizer = load_tokenizer(cfg.teacher)
    renderer = ViewRenderer(
        tokenizer, inp.render, context, cfg.teacher.tokenizer or cfg.teacher.path
    )

    # Render every record this part owns before the teacher loads: a record the tokenizer
    # cannot split into prompt and response is reported in seconds, not after the model load.
    parts = run.num_shards * ranks.world
    part = run.shard_index * ranks.world + ranks.rank
    mine = prompts.part(part, parts)
    rendered, bad = renderer.render_all([r for _, r in mine.records])
    if bad and inp.on_error == "raise":
        listed = "\n".join(f"  {r.where}: {reason}" for r, reason in bad[:10])
        more = f"\n  … and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise InputError(
            f"{len(bad)} record(s) cannot be rendered:\n{listed}{more}\n"
            "fix them, or pass --on-error skip to leave them out (they are listed in the "
            "manifest's extra.skipped)"
        )
    eos_ids = None
    if tgt.mode == "generate":
        # A chat turn must end at an id that stops generation: checked before the model load.
        eos_ids, eos_from = generation_eos_ids(cfg, tokenizer)
        if inp.render == "chat" or any(not isinstance(r.student, str) for _, r in mine.records):
            check_turn_end(cfg, tokenizer, eos_ids, eos_from)

    teacher = load_teacher(cfg.teacher, device, tokenizer, eos_ids)
    max_length = inp.max_length or _context_size(teacher)
    info = dataset_info(cfg, teacher, renderer, max_length)
    if tgt.kind == "topk" and tgt.k > teacher.vocab_size:
        raise InputError(
            f"--k is {tgt.k} but the teacher's vocabulary has {teacher.vocab_size} ids; lower --k"
        )
    skipped: list[Skipped] = [s for _, s in mine.skipped] + [r.skipped(why) for r, why in bad]
    reserve = cfg.generate.max_new_tokens if tgt.mode == "generate" else 0
    bos = teacher.tokenizer.bos_token_id
    kept, too_long = apply_length_policy(
        rendered, max_length=max_length, policy=inp.truncation, reserve=reserve, bos_token_id=bos
    )

    loc = Location(run.out, storage_options)
    check_resume(loc, info)
    if part == 0:
        loc.write_atomic(cfg.dumps(), CONFIG_NAME, tmp_prefix=".tmp.config-", sole_writer=True)
    done = committed_ids(run.out, storage_options) if loc.exists() else set()
    pending = [e for e in kept if e.id not in done]

    writer = DatasetWriter(
        run.out,
        info,
        writer_id=f"r{part:05d}",
        shard_positions=run.shard_positions,
        background=True,
        storage_options=storage_options,
    )
    # Bookkeeping over this part's whole record set: recomputed identically on every rerun,
    # so replacing (not adding to) the journal's values keeps it exactly once.
    writer.extra["skipped"] = [s.to_json() for s in skipped]
    writer.extra["skipped_count"] = len(skipped)
    writer.extra["too_long"] = too_long.to_json()
    writer.extra["dropped_too_long_examples"] = (too_long.dropped_examples or [])[:_LISTED_DROPS]

    t0 = time.perf_counter()
    try:
        stats = run_batches(cfg, teacher, pending, writer, ranks, on_batch)
    except BaseException:
        writer.__exit__(*sys.exc_info())  # keep what is committed; never finalize a failed run
        raise
    writer.close(finalize_dataset=False)
    seconds = time.perf_counter() - t0

    totals = ranks.sum(
        device=device,
        values=[
            *stats,
            len(kept) - len(pending),
            len(skipped),
            too_long.dropped,
            too_long.truncated_teacher + too_long.truncated_student,
        ],
    )
    summary = CaptureSummary(
        examples=int(totals[0]),
        positions=int(totals[1]),
        tokens=int(totals[2]),
        finished_responses=int(totals[3]),
        seconds=seconds,
        already_committed=int(totals[4]),
        skipped=int(totals[5]),
        dropped_too_long=int(totals[6]),
        truncated=int(totals[7]),
        mode=tgt.mode,
    )
    ranks.barrier()  # every rank's journal is written
    if ranks.rank == 0 and run.num_shards == 1:
        m = finalize(loc)
        summary.finalized = True
        summary.dataset_examples, summary.dataset_positions = m.num_examples, m.num_positions
        summary.dataset_bytes = m.num_bytes
    ranks.barrier()  # nobody leaves before the manifest exists
    return summary


def _context_size(teacher: Teacher) -> int | None:
    size = getattr(teacher.model.config, "max_position_embeddings", None)
    return int(size) if size else None


def run_batches(
    cfg: CaptureConfig,
    teacher: Teacher,
    pending: list[Rendered],
    writer: DatasetWriter,
    ranks: Ranks,
    on_batch: Callable[[int], None] | None,
) -> np.ndarray:
    from tqdm.auto import tqdm

    tgt, gen = cfg.targets, cfg.generate
    if tgt.mode == "score":
        lengths = np.array([len(e.teacher_ids) + len(e.response_ids) for e in pending])
    else:
        lengths = np.array([len(e.teacher_ids) + gen.max_new_tokens for e in pending])
    batches = plan_batches(lengths, cfg.run.max_batch_tokens) if pending else []
    keys = example_keys([e.id for e in pending], gen.seed)
    stats = np.zeros(4)
    bar = tqdm(
        total=len(pending),
        unit="ex",
        desc=f"capture ({tgt.mode})",
        disable=not (cfg.run.progress and ranks.rank == 0),
        dynamic_ncols=True,
    )
    t0 = time.perf_counter()

    def emit(result: BatchResult) -> None:
        for ex in result.to_examples(tgt.kind):
            writer.add(ex)
        positions = sum(len(r) for r in result.response_ids)
        stats[:] += (len(result.examples), positions, result.tokens, result.finished)
        bar.update(len(result.examples))
        bar.set_postfix(tokens_s=f"{stats[2] / (time.perf_counter() - t0):,.0f}", refresh=False)

    queued: BatchResult | None = None
    with bar:
        for n, idx in enumerate(batches, start=1):
            exs = [pending[i] for i in idx]
            if tgt.mode == "score":
                result = score_batch(teacher, exs, tgt, keys[idx])
            else:
                result = generate_batch(teacher, exs, tgt, gen, keys[idx])
            # The device already holds the next batch's work while we unpack the last one.
            if queued is not None:
                emit(queued)
            queued = result
            if on_batch is not None:
                on_batch(n)
        if queued is not None:
            emit(queued)
    return stats
