"""Export a logit dataset to plain columns (Parquet or Arrow) that any Arrow tool reads.

The native shards store ids as byte planes of sorted gaps and probabilities in a codec
(docs/FORMAT.md): compact, but opaque to polars, DuckDB or ``datasets``. An export holds what
:mod:`cache.reader` returns, as nested lists of plain numbers, one output file per native shard,
so memory stays bounded by one shard whatever the dataset's size. Layout (``datasets``-style):

    OUT/data/train-00000-of-00003.parquet   one file per native shard, in manifest order
    OUT/logitcache.json                     the source manifest's info and the column meanings
    OUT/README.md                           a dataset card; written last: the export is complete
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from .codecs import order_within_segments
from .errors import InputError
from .format import DatasetInfo
from .paths import output_problem
from .reader import DecodedBatch, LogitDataset
from .storage import Location

ExportFormat = Literal["parquet", "arrow"]
EXPORT_FORMATS: tuple[str, ...] = ("parquet", "arrow")
EXPORT_META = "logitcache.json"
DATA_DIR = "data"

COLUMNS: dict[str, str] = {
    "id": "the example's id (string)",
    "prompt_ids": "the student's prompt token ids",
    "response_ids": "the response token ids; position j's targets are for response_ids[j]",
    "topk_ids": "top-k only: per position, the teacher's k most likely ids, ascending",
    "topk_logprobs": "top-k only: per position, their log-probs (u8/u16: renormalised with the "
    "tail, exactly as logitcache's reader returns them)",
    "tail_logmass": "top-k only: per position, log of the mass outside the top k",
    "sample_ids": "per position, the drawn ids, ascending (top-k: draws from the tail only)",
    "sample_counts": "per position, the draws of each id; they sum to n, or to the position's "
    "own n_j with targets.n_rate (top-k: an id weighs exp(tail_logmass) * count / n_j; a "
    "position without tail mass, or given no draws, has none)",
}


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: its data files (relative to OUT), and their totals."""

    files: list[str]
    examples: int
    positions: int
    bytes: int


def export_schema(info: DatasetInfo) -> pa.Schema:
    """The plain columns of an export of ``info``'s dataset."""
    ids, f32 = pa.list_(pa.int32()), pa.list_(pa.float32())
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt_ids", ids, nullable=False),
        pa.field("response_ids", ids, nullable=False),
    ]
    if info.targets.kind == "topk":
        fields += [
            pa.field("topk_ids", pa.list_(ids), nullable=False),
            pa.field("topk_logprobs", pa.list_(f32), nullable=False),
            pa.field("tail_logmass", f32, nullable=False),
        ]
    if info.targets.has_draws:
        fields += [
            pa.field("sample_ids", pa.list_(ids), nullable=False),
            pa.field("sample_counts", pa.list_(pa.list_(pa.int32())), nullable=False),
        ]
    meta = {"logitcache.info": json.dumps(info.to_json(), sort_keys=True)}
    return pa.schema(fields, metadata=meta)


def _lists(values: np.ndarray, offsets: np.ndarray, typ: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(
        pa.array(np.asarray(offsets, dtype=np.int32)), pa.array(values, type=typ)
    )


def export_batch(b: DecodedBatch, schema: pa.Schema) -> pa.RecordBatch:
    """One decoded batch as plain columns: a list per row, a list per position inside it."""
    r_off = b.response_offsets
    cols: dict[str, pa.Array] = {
        "id": pa.array(b.ids, type=pa.string()),
        "prompt_ids": _lists(b.prompt_ids, b.prompt_offsets, pa.int32()),
        "response_ids": _lists(b.response_ids, r_off, pa.int32()),
    }
    if b.topk_ids is not None:
        assert b.topk_logprobs is not None and b.tail_logmass is not None
        P, k = b.topk_ids.shape
        per_pos = np.arange(P + 1, dtype=np.int64) * k
        ids, lps = b.topk_ids.reshape(-1), b.topk_logprobs.reshape(-1)
        if b.topk_counts is not None:  # adaptive top-k: each position's kept ids only
            kept = np.arange(k) < b.topk_counts[:, None]
            ids, lps = b.topk_ids[kept], b.topk_logprobs[kept]
            per_pos = np.concatenate([[0], np.cumsum(b.topk_counts)])
        ids, lps = _ascending(ids, per_pos, lps)
        cols["topk_ids"] = pa.ListArray.from_arrays(
            pa.array(r_off.astype(np.int32)), _lists(ids, per_pos, pa.int32())
        )
        cols["topk_logprobs"] = pa.ListArray.from_arrays(
            pa.array(r_off.astype(np.int32)), _lists(lps, per_pos, pa.float32())
        )
        cols["tail_logmass"] = _lists(b.tail_logmass, r_off, pa.float32())
    if b.sample_offsets is not None:
        assert b.sample_ids is not None and b.sample_counts is not None
        outer = pa.array(r_off.astype(np.int32))
        ids, counts = _ascending(b.sample_ids, b.sample_offsets, b.sample_counts)
        cols["sample_ids"] = pa.ListArray.from_arrays(
            outer, _lists(ids, b.sample_offsets, pa.int32())
        )
        cols["sample_counts"] = pa.ListArray.from_arrays(
            outer, _lists(counts, b.sample_offsets, pa.int32())
        )
    return pa.record_batch([cols[f.name] for f in schema], schema=schema)


def _ascending(
    ids: np.ndarray, offsets: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Flat ``ids`` and their ``values`` with each position's ids (``offsets``) ascending: the
    order the export documents, whatever order the shard stores them in (version 3: by rank)."""
    order = order_within_segments(ids, np.diff(offsets))
    return ids[order], values[order]


def data_file_name(i: int, total: int, fmt: ExportFormat) -> str:
    return f"train-{i:05d}-of-{total:05d}.{fmt}"


def _encode_file(batches: Iterable[pa.RecordBatch], schema: pa.Schema, fmt: str) -> bytes:
    sink = pa.BufferOutputStream()
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with pq.ParquetWriter(sink, schema, compression="zstd") as w:
            for rb in batches:
                w.write_batch(rb)
    else:  # Arrow IPC stream: what `datasets` writes and reads as .arrow
        with pa.ipc.new_stream(
            sink, schema, options=pa.ipc.IpcWriteOptions(compression="zstd")
        ) as w:
            for rb in batches:
                w.write_batch(rb)
    return sink.getvalue().to_pybytes()


def check_out_empty(out: Location, flag: str = "OUT") -> None:
    """Refuse to write into a folder that already holds something, or into a file."""
    if out.is_local and (problem := output_problem(out.url, f"{flag} {out}", folder=True)):
        raise InputError(problem)
    found = out.listdir() if out.exists() else []
    if found:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise InputError(
            f"{flag} {out} exists and is not empty ({shown}); give a new folder, or remove the "
            "old one"
        )


def export_dataset(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    fmt: ExportFormat = "parquet",
    *,
    storage_options: dict[str, Any] | None = None,
) -> ExportResult:
    """Write ``src``'s examples as plain columns to ``out`` (see the module docstring)."""
    if fmt not in EXPORT_FORMATS:
        raise InputError(f"--format is {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    out_loc = Location(out, storage_options)
    check_out_empty(out_loc)
    ds = LogitDataset(src, verify=True, storage_options=storage_options)
    schema = export_schema(ds.info)
    total = len(ds.shards)
    files, nbytes = [], 0
    for i in range(total):
        name = data_file_name(i, total, fmt)
        data = _encode_file((export_batch(b, schema) for b in ds.shard(i)), schema, fmt)
        out_loc.write_atomic(data, DATA_DIR, name)
        files.append(f"{DATA_DIR}/{name}")
        nbytes += len(data)
    meta = {
        "exported_from": str(src),
        "format": fmt,
        "files": files,
        "num_examples": ds.num_examples,
        "num_positions": ds.num_positions,
        "columns": {c: COLUMNS[c] for c in schema.names},
        **ds.info.to_json(),
    }
    out_loc.write_atomic((json.dumps(meta, indent=1) + "\n").encode(), EXPORT_META)
    out_loc.write_atomic(_export_card(ds, fmt, schema).encode(), "README.md")
    return ExportResult(files, ds.num_examples, ds.num_positions, nbytes)


def _export_card(ds: LogitDataset, fmt: str, schema: pa.Schema) -> str:
    t = ds.info.targets
    cols = "\n".join(f"- `{c}` (`{schema.field(c).type}`): {COLUMNS[c]}" for c in schema.names)
    return (
        "---\n"
        "configs:\n"
        "- config_name: default\n"
        f"  data_files:\n  - split: train\n    path: {DATA_DIR}/train-*.{fmt}\n"
        "tags:\n- distillation\n- logits\n"
        "---\n\n"
        f"# Teacher targets ({t.label}), plain columns\n\n"
        f"Exported by logitcache from a logit dataset of {ds.num_examples} examples and "
        f"{ds.num_positions} response positions; teacher "
        f"`{ds.info.teacher.get('name_or_path')}`, tokenizer `{ds.info.tokenizer_fingerprint}` "
        f"(vocabulary {ds.info.vocab_size}). `{EXPORT_META}` holds the source manifest's "
        "description.\n\n"
        f"Columns, one row per example:\n\n{cols}\n"
    )
