"""Import top-k targets published in the plain layout: one row per example, per position a list
of token ids and a list of log-probs (or raw logits), in Parquet or JSONL.

Every row is checked before anything is written, and all problems are reported at once, each
with its file and line (JSONL) or row (Parquet); ``on_error="skip"`` leaves bad rows out and
lists them in the manifest's ``extra.skipped``, as `logitcache build` does. The tail mass is
1 − Σ p of the given log-probs, clamped at 0. Raw logits over the top k alone cannot give it:
their log-probs are then the log_softmax over the k, and the tail is stored as zero mass
(``capture.imported.tail`` says so). The manifest's ``capture.imported`` records the source
files and the settings (column mapping included).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .codecs import Codec
from .errors import InputError
from .export import check_out_empty
from .format import DatasetInfo, Example, TargetSpec, TopK
from .manifest import Manifest, load_manifest
from .prompts import Skipped
from .settings import build, flag, format_problems, to_dict
from .sources import BadRecord, default_id_names, expand_sources, iter_raw
from .storage import Location
from .tokenizer import load_local_tokenizer
from .writer import DEFAULT_SHARD_POSITIONS, DatasetWriter

ValuesKind = Literal["logprobs", "logits"]
OnError = Literal["raise", "skip"]
SUM_TOLERANCE = 1e-2
"""How far above one a position's given probabilities may sum (rounding of a lossy source);
beyond it the values are not log-probs of one distribution."""
_MAX_LISTED = 10
TAIL_UNKNOWN = (
    "unknown: the source gives raw logits over the top k only; the log-probs are their "
    "log_softmax over the k and the tail is stored as zero mass"
)
TAIL_COMPUTED = "1 − Σ exp(log-prob) over the top k, clamped at 0"


@dataclass(frozen=True)
class ColumnsConfig:
    """Which source column holds what (JSONL: keys of each record)."""

    id_column: str = field(default="id", metadata=flag(metavar="NAME"))
    """Example ids; a row without it is named <file>:<line> or <file>:row<N>."""
    prompt_column: str = field(default="prompt_ids", metadata=flag(metavar="NAME"))
    """Prompt token ids (with --response-column)."""
    response_column: str = field(default="response_ids", metadata=flag(metavar="NAME"))
    """Response token ids: one per target position."""
    input_ids_column: str | None = field(default=None, metadata=flag(metavar="NAME"))
    """Instead of a prompt/response split: the whole sequence's ids; the last P ids, P the
    number of target positions, are the response (target j is for token T − P + j)."""
    ids_column: str = field(default="topk_ids", metadata=flag(metavar="NAME"))
    """Per position, the k token ids."""
    values_column: str = field(default="topk_logprobs", metadata=flag(metavar="NAME"))
    """Per position, the k values: log-probs or raw logits (--values)."""
    tail_column: str | None = field(default=None, metadata=flag(metavar="NAME"))
    """Per position, the log of the mass outside the top k (a logitcache export's
    tail_logmass); default: computed from the log-probs."""


@dataclass(frozen=True)
class ValuesConfig:
    """What the values are and how they are stored."""

    values: ValuesKind = "logprobs"
    """logprobs: log-probs under the teacher's full softmax (the tail is 1 − Σ p); logits: raw
    logits of the top k only (the tail is unknown and stored as zero mass)."""
    codec: Codec = "u8"
    """Storage of the log-probs: f32, f16, u8 or u16 (docs/FORMAT.md)."""
    temperature: float = field(default=1.0, metadata=flag(metavar="T"))
    """The temperature the source's targets were made at (recorded, not applied)."""
    teacher_name: str | None = field(default=None, metadata=flag(metavar="NAME"))
    """The teacher's name for the manifest and the card; default: unknown."""


@dataclass(frozen=True)
class ImportRunConfig:
    """The tokenizer, bad rows and shard size."""

    tokenizer: str = field(metadata=flag(metavar="DIR"))
    """Folder of the tokenizer the ids belong to (its fingerprint goes in the manifest)."""
    vocab_size: int | None = field(default=None, metadata=flag(metavar="N"))
    """Width of the teacher's logits; default: the tokenizer's length."""
    on_error: OnError = "raise"
    """On a bad row: stop, or skip it and list it in the manifest's extra.skipped."""
    shard_positions: int = field(default=DEFAULT_SHARD_POSITIONS, metadata=flag(metavar="N"))
    """Response positions per shard."""


@dataclass(frozen=True)
class ImportConfig:
    """The settings of one `logitcache import`."""

    run: ImportRunConfig
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    values: ValuesConfig = field(default_factory=ValuesConfig)


def load_import_config(sources: list[Any]) -> ImportConfig:
    cfg, problems = build(ImportConfig, sources, command="import", example="values.codec")
    if problems:
        raise InputError(format_problems(problems))
    return cfg


def _int_list(value: Any, name: str, vocab: int) -> list[int]:
    if not isinstance(value, list | tuple | np.ndarray):
        raise BadRecord(f"{name} must be a list of token ids, found {type(value).__name__}")
    out = list(value)
    bad = [v for v in out if isinstance(v, bool) or not isinstance(v, int | np.integer)]
    if bad:
        raise BadRecord(f"{name} holds {bad[0]!r}, not a token id")
    wrong = [v for v in out if not 0 <= v < vocab]
    if wrong:
        raise BadRecord(f"{name} holds id {wrong[0]}, outside [0, {vocab})")
    return out


def _matrix(value: Any, name: str, P: int, k: int | None) -> list[list[Any]]:
    if not isinstance(value, list | tuple) or len(value) != P:
        n = len(value) if isinstance(value, list | tuple) else type(value).__name__
        raise BadRecord(f"{name} must be a list of {P} positions (one per target), found {n}")
    for j, row in enumerate(value):
        width = k if k is not None else (len(row) if isinstance(row, list | tuple) else None)
        if not isinstance(row, list | tuple) or len(row) != width or width == 0:
            raise BadRecord(
                f"{name}[{j}] must be a list of {width or 'k ≥ 1'} values, found "
                f"{len(row) if isinstance(row, list | tuple) else type(row).__name__}"
            )
    return [list(r) for r in value]


def parse_row(obj: Any, cfg: ImportConfig, vocab: int, k: int | None, default_id: str) -> Example:
    """One source row as an Example, or BadRecord naming what is wrong in it."""
    if isinstance(obj, BadRecord):
        raise obj
    if not isinstance(obj, dict):
        raise BadRecord(f"a row must be an object, found {type(obj).__name__}")
    c, v = cfg.columns, cfg.values
    need = [c.ids_column, c.values_column] + (
        [c.input_ids_column] if c.input_ids_column else [c.prompt_column, c.response_column]
    )
    missing = [n for n in need + ([c.tail_column] if c.tail_column else []) if n not in obj]
    if missing:
        raise BadRecord(f"no column {', '.join(map(repr, missing))} (found {', '.join(obj)})")
    ex_id = obj.get(c.id_column, default_id)
    if not isinstance(ex_id, str | int) or isinstance(ex_id, bool) or ex_id == "":
        raise BadRecord(f"{c.id_column} must be a non-empty string, found {ex_id!r}")
    ids_raw = obj[c.ids_column]
    P = len(ids_raw) if isinstance(ids_raw, list | tuple) else -1
    if c.input_ids_column:
        seq = _int_list(obj[c.input_ids_column], c.input_ids_column, vocab)
        if not 0 < P < len(seq):
            raise BadRecord(
                f"{c.input_ids_column} holds {len(seq)} ids and {c.ids_column} {P} positions; "
                "the targets are for the last P ids, which needs 0 < P < the sequence's length"
            )
        prompt, response = seq[: len(seq) - P], seq[len(seq) - P :]
    else:
        prompt = _int_list(obj[c.prompt_column], c.prompt_column, vocab)
        response = _int_list(obj[c.response_column], c.response_column, vocab)
    ids_m = _matrix(ids_raw, c.ids_column, len(response), k)
    vals_m = _matrix(
        obj[c.values_column], c.values_column, len(response), len(ids_m[0]) if ids_m else k
    )
    if not response:  # no positions (a dataset may hold such rows): nothing more to check
        empty = np.zeros((0, k or 0))
        targets = TopK(empty.astype(np.int64), empty.astype(np.float32), np.zeros(0, np.float32))
        return Example(str(ex_id), np.array(prompt, np.int64), np.zeros(0, np.int64), targets)
    ids = np.array([_int_list(r, f"{c.ids_column}[{j}]", vocab) for j, r in enumerate(ids_m)])
    if any(len(set(r)) != len(r) for r in ids.tolist()):
        j = next(j for j, r in enumerate(ids.tolist()) if len(set(r)) != len(r))
        raise BadRecord(f"{c.ids_column}[{j}] names an id twice: {ids[j].tolist()}")
    try:
        vals = np.array(vals_m, dtype=np.float64)
    except (TypeError, ValueError):
        raise BadRecord(f"{c.values_column} holds a value that is not a number") from None
    if np.isnan(vals).any() or (vals == np.inf).any():
        raise BadRecord(f"{c.values_column} holds NaN or +inf")
    if v.values == "logits":
        if np.isneginf(vals).all(axis=1).any():
            raise BadRecord(f"{c.values_column}: a position has only -inf logits")
        top = np.max(vals, axis=1, keepdims=True)
        logp = vals - top - np.log(np.exp(vals - top).sum(axis=1, keepdims=True))
        tail = np.full(len(vals), -np.inf)
    else:
        if (vals > SUM_TOLERANCE).any():
            raise BadRecord(
                f"{c.values_column} holds {vals.max():.4g} > 0, not a log-prob; raw logits? "
                "pass --values logits"
            )
        logp = np.minimum(vals, 0.0)
        total = np.exp(logp).sum(axis=1)
        if (total > 1 + SUM_TOLERANCE).any():
            j = int(np.argmax(total))
            raise BadRecord(
                f"{c.values_column}[{j}]: probabilities sum to {total[j]:.4g} > 1; these are not "
                "log-probs of one distribution (raw logits? pass --values logits)"
            )
        with np.errstate(divide="ignore"):
            tail = np.log(np.clip(1.0 - total, 0.0, None))
        if c.tail_column:
            tail = _given_tail(obj[c.tail_column], c.tail_column, len(response))
    targets = TopK(ids, logp.astype(np.float32), tail.astype(np.float32))
    return Example(str(ex_id), np.array(prompt, np.int64), np.array(response, np.int64), targets)


def _given_tail(value: Any, name: str, P: int) -> np.ndarray:
    if not isinstance(value, list | tuple) or len(value) != P:
        raise BadRecord(f"{name} must be a list of {P} log tail masses (one per position)")
    try:
        tail = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise BadRecord(f"{name} holds a value that is not a number") from None
    if np.isnan(tail).any() or (tail > SUM_TOLERANCE).any():
        raise BadRecord(f"{name} holds NaN or a log-mass above 0")
    return np.minimum(tail, 0.0)


@dataclass
class _Rows:
    """The rows of the sources in order: (Example or BadRecord, file, line, row)."""

    files: list[str]
    cfg: ImportConfig
    vocab: int
    k: int | None = None

    def __iter__(self) -> Iterator[tuple[Example | BadRecord, str, int | None, int | None]]:
        seen: dict[str, str] = {}
        for source, name in zip(self.files, default_id_names(self.files), strict=True):
            for line, row, obj in iter_raw(source, flag="SRC"):
                where = f"{source}:{line}" if line is not None else f"{source} row {row}"
                default_id = f"{name}:{line}" if line is not None else f"{name}:row{row}"
                try:
                    ex = parse_row(obj, self.cfg, self.vocab, self.k, default_id)
                    if ex.id in seen:
                        raise BadRecord(f"id {ex.id!r} is already used at {seen[ex.id]}")
                    seen[ex.id] = where
                    if self.k is None and ex.num_positions:  # the first row with targets
                        self.k = ex.targets.ids.shape[1]  # type: ignore[union-attr]
                    yield ex, source, line, row
                except BadRecord as e:
                    yield e, source, line, row


def import_plain(
    sources: Sequence[str], out: str | os.PathLike[str], cfg: ImportConfig
) -> Manifest:
    """Write the rows of ``sources`` as a logit dataset at ``out`` (a new folder)."""
    from .tokenizer import tokenizer_fingerprint

    out_loc = Location(out)
    check_out_empty(out_loc)
    files = expand_sources(sources, flag="SRC")
    tok_dir = cfg.run.tokenizer
    if not Path(tok_dir).is_dir():  # a folder only, as build's --tokenizer: never downloaded
        raise InputError(
            f"--tokenizer {tok_dir}: no such folder; pass the folder of the tokenizer the ids "
            "belong to (one saved with tokenizer.save_pretrained)"
        )
    tok = load_local_tokenizer(
        tok_dir, f"--tokenizer {tok_dir}", "pass the folder of the tokenizer the ids belong to"
    )
    vocab = cfg.run.vocab_size or len(tok)
    # Pass 1 checks every row (reporting all problems at once); pass 2 writes: memory stays
    # bounded by one shard, whatever the sources' size.
    check = _Rows(files, cfg, vocab)
    skipped = [
        Skipped(f, line, row, str(r)) for r, f, line, row in check if isinstance(r, BadRecord)
    ]
    if skipped and cfg.run.on_error == "raise":
        listed = "\n".join(f"  {s.where}: {s.reason}" for s in skipped[:_MAX_LISTED])
        more = len(skipped) - _MAX_LISTED
        raise InputError(
            f"{len(skipped)} bad row(s):\n{listed}"
            + (f"\n  … and {more} more" if more > 0 else "")
            + "\nfix them, or pass --on-error skip to leave them out (they are listed in the "
            "manifest's extra.skipped)"
        )
    if check.k is None:
        first = skipped[0].reason if skipped else "no row has a target position"
        raise InputError(f"SRC {' '.join(sources)}: no valid row to import ({first})")
    v = cfg.values
    info = DatasetInfo(
        vocab_size=vocab,
        tokenizer_fingerprint=tokenizer_fingerprint(tok),
        targets=TargetSpec("topk", k=check.k, n=0, codec=v.codec, sampling=None),
        teacher={"name_or_path": v.teacher_name, "revision": None, "config_hash": None},
        capture={
            "temperature": v.temperature,
            "targets_from": f"imported {v.values} (see imported)",
            "imported": {
                "sources": files,
                "tail": TAIL_UNKNOWN
                if v.values == "logits"
                else ("given" if cfg.columns.tail_column else TAIL_COMPUTED),
                "settings": to_dict(cfg),
            },
        },
    )
    with DatasetWriter(
        out_loc.url, info, writer_id="import", shard_positions=cfg.run.shard_positions
    ) as w:
        w.extra.update(skipped=[s.to_json() for s in skipped], skipped_count=len(skipped))
        for r, *_ in _Rows(files, cfg, vocab, check.k):
            if isinstance(r, Example):
                w.add(r)
    return load_manifest(out_loc)
