"""Capture: prompts in, a logit dataset out. Resumable, exactly once, on one or many ranks.

The loop is: read and validate every record; keep this rank's part (records are numbered and
part ``p`` of ``P`` owns numbers ``i % P == p``, P = ranks ÷ ``--tp`` × ``--num-shards``: with
``--tp`` the ranks of a group share a sharded teacher and a part, :mod:`.tensor_parallel`); render and
tokenize its views; apply the length policy; drop ids already committed (a rerun after a
crash resumes there); batch by length; run the teacher; hand examples to a background writer.
Each part writes its own shards and journal (writer id ``r<part>``); when every rank is done,
rank 0 finalizes the manifest. Job arrays (``--num-shards``) finalize with
``logitcache finalize``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np

from .capture_config import CONFIG_NAME, CaptureConfig
from .capture_info import check_resume, dataset_info, resume_command
from .engine import BatchResult, generate_batch, plan_batches, score_batch
from .eos import check_turn_end, folder_eos_ids, generation_eos_ids
from .errors import InputError
from .external import ExternalTeacher, load_external
from .manifest import close_journals, finalize
from .paths import output_problem
from .prompts import Skipped, read_prompts, renamed_default_ids
from .ranks import Ranks
from .reader import committed_ids
from .storage import Location
from .targets import example_keys
from .teacher import Teacher, check_teacher_folder, load_teacher, load_tokenizer, resolve_device
from .tensor_parallel import tp_groups
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
    ranks = Ranks.from_env().start(resolve_device(cfg.teacher.device), timeout=_BARRIER_TIMEOUT)
    try:
        return _capture(cfg, ranks, storage_options, on_batch)
    finally:
        ranks.close()


def _capture(
    cfg: CaptureConfig,
    ranks: Ranks,
    storage_options: dict[str, Any] | None,
    on_batch: Callable[[int], None] | None,
) -> CaptureSummary:
    inp, tgt, run = cfg.input, cfg.targets, cfg.run
    problem = output_problem(run.out, f"--out {run.out}", folder=True)  # before the slow work
    if problem is not None:
        raise InputError(problem)
    if cfg.teacher.url is None:  # a served teacher's folder holds no weights
        check_teacher_folder(cfg.teacher.path)
    groups = tp_groups(cfg.teacher, ranks)  # --tp: ranks in groups, one part per group
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
    parts = run.num_shards * groups.count
    part = run.shard_index * groups.count + groups.index
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

    teacher: Teacher | ExternalTeacher
    if cfg.teacher.engine == "hf" and cfg.teacher.url is None:
        teacher = load_teacher(cfg.teacher, ranks.device, tokenizer, eos_ids)
    else:  # vLLM in process, or a served teacher
        eos = eos_ids if eos_ids is not None else folder_eos_ids(cfg.teacher, tokenizer)[0]
        teacher = load_external(cfg, tokenizer, eos, ranks.world)
    max_length = inp.max_length or teacher.context_size
    info = dataset_info(cfg, teacher, renderer, max_length)
    if info.targets.k > teacher.vocab_size:  # k is 0 for sampled targets
        raise InputError(
            f"--k is {info.targets.k} but the teacher's vocabulary has {teacher.vocab_size} ids; "
            "lower --k"
        )
    skipped: list[Skipped] = [s for _, s in mine.skipped] + [r.skipped(why) for r, why in bad]
    reserve = cfg.generate.max_new_tokens if tgt.mode == "generate" else 0
    bos = teacher.tokenizer.bos_token_id
    kept, too_long = apply_length_policy(
        rendered, max_length=max_length, policy=inp.truncation, reserve=reserve, bos_token_id=bos
    )

    loc = Location(run.out, storage_options)
    check_resume(loc, info, run.shard_index)
    done = committed_ids(run.out, storage_options) if loc.exists() else set()
    renamed = renamed_default_ids((r for _, r in mine.records), done)
    if renamed:
        new, old = renamed[0]
        raise InputError(
            f"--out {run.out} already holds {old!r}, the default id a record had when the "
            f"build read another set of --prompts files; now it is {new!r} ({len(renamed)} "
            "such record(s)): default ids name as much of the path as tells the files apart, "
            "so they would be captured twice. Rerun with the original --prompts (as: "
            f"{resume_command(loc, run.shard_index)}), or give the records ids of their own and "
            "write to a new --out"
        )
    if part == 0 and groups.writes:
        loc.write_atomic(cfg.dumps(), CONFIG_NAME, tmp_prefix=".tmp.config-", sole_writer=True)
    pending = [e for e in kept if e.id not in done]
    if groups.tp > 1:  # a group's ranks batch the same ids: all read `done` before any writes
        ranks.barrier()

    writer = None
    if groups.writes:
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
        layout = {"count": parts, "ranks": groups.count}  # finalize checks all parts wrote
        writer.extra["parts"] = layout | ({"tp": groups.tp} if groups.tp > 1 else {})
        writer.extra["skipped"] = [s.to_json() for s in skipped]
        writer.extra["skipped_count"] = len(skipped)
        writer.extra["too_long"] = too_long.to_json()
        dropped = too_long.dropped_examples or []
        writer.extra["dropped_too_long_examples"] = dropped[:_LISTED_DROPS]

    t0 = time.perf_counter()
    try:
        stats = run_batches(cfg, teacher, pending, writer, ranks, on_batch)
    except BaseException:
        if writer is not None:  # keep what is committed; never finalize a failed run
            writer.__exit__(*sys.exc_info())
        raise
    finally:
        if isinstance(teacher, ExternalTeacher):
            teacher.close()  # its processes or connections
    if writer is not None:
        writer.close(finalize_dataset=False)
    seconds = time.perf_counter() - t0

    mine_counts = [
        *stats,
        len(kept) - len(pending),
        len(skipped),
        too_long.dropped,
        too_long.truncated_teacher + too_long.truncated_student,
    ]
    # Counted once per group: its writer's.
    totals = ranks.sum_values([float(v) * groups.writes for v in mine_counts])
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
        # Every part of this run has finished, so every prompt is committed, including those of
        # a journal that an earlier, killed run with another number of ranks left unfinished:
        # that journal is finished now too.
        close_journals(loc)
        m = finalize(loc)
        summary.finalized = True
        summary.dataset_examples, summary.dataset_positions = m.num_examples, m.num_positions
        summary.dataset_bytes = m.num_bytes
    ranks.barrier()  # nobody leaves before the manifest exists
    return summary


def run_batches(
    cfg: CaptureConfig,
    teacher: Teacher | ExternalTeacher,
    pending: list[Rendered],
    writer: DatasetWriter | None,
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
        if writer is not None:  # None: a tensor-parallel rank that computes but does not write
            for ex in result.to_examples():
                writer.add(ex)
        positions = sum(len(r) for r in result.response_ids)
        stats[:] += (len(result.examples), positions, result.tokens, result.finished)
        bar.update(len(result.examples))
        bar.set_postfix(tokens_s=f"{stats[2] / (time.perf_counter() - t0):,.0f}", refresh=False)

    queued: BatchResult | None = None
    with bar:
        for n, idx in enumerate(batches, start=1):
            exs = [pending[i] for i in idx]
            if isinstance(teacher, ExternalTeacher):  # vLLM or a server: same batches, results
                result = (
                    teacher.score_batch(exs, tgt, keys[idx])
                    if tgt.mode == "score"
                    else teacher.generate_batch(exs, tgt, gen, keys[idx])
                )
            elif tgt.mode == "score":
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
