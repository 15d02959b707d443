"""DatasetWriter: examples in, committed zstd Arrow shards and a manifest out.

Commit protocol (docs/FORMAT.md): a shard is encoded in memory, hashed, written under a
temporary name, flushed and renamed; only then is it listed in this writer's journal
(``_parts/<writer>.json``, itself replaced atomically). ``close()`` marks the journal finished
and folds the journals into ``manifest.json``. A crash at any point leaves every committed shard
readable and the journal unfinished, and reopening a writer with the same ``writer_id``
continues after its last committed shard.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from .codecs import (
    encode_id_planes,
    encode_logprobs,
    frequency_table,
    order_within_segments,
    pack_rank_table,
    ranks_of_ids,
    sort_by_id,
)
from .errors import IncompatibleError
from .format import (
    FORMAT_VERSION,
    PARTS_DIR,
    RANK_TABLE_KEYS,
    WRITER_ID_RE,
    DatasetInfo,
    Example,
    Sampled,
    TargetSpec,
    TopK,
    id_plane_names,
    shard_name,
)
from .manifest import (
    Manifest,
    ShardEntry,
    check_compatible,
    committed_manifests,
    finalize,
    load_parts,
    part_name,
    write_journal,
    writer_tmp_prefix,
)
from .storage import Location

DEFAULT_SHARD_POSITIONS = 1 << 20
DEFAULT_BATCH_ROWS = 1024


class DatasetWriter:
    """Append examples to a dataset at a local path or fsspec URL.

    Several writers with distinct ``writer_id`` (one per rank) may write one dataset at once.
    With ``background=True`` encoding, compression and upload run in a worker thread, so the
    caller (a GPU loop) never waits for them; errors surface on the next call or on close.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        info: DatasetInfo,
        *,
        writer_id: str = "w0",
        shard_positions: int = DEFAULT_SHARD_POSITIONS,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        background: bool = False,
        storage_options: dict[str, Any] | None = None,
    ):
        if not WRITER_ID_RE.match(writer_id):
            raise ValueError(f"writer_id {writer_id!r} must match {WRITER_ID_RE.pattern}")
        problems = info.targets.validate()
        if problems:
            raise ValueError("; ".join(problems))
        self.loc = Location(url, storage_options)
        self.info = info
        self.writer_id = writer_id
        self.shard_positions = shard_positions
        self.batch_rows = batch_rows
        self.schema = info.schema()
        self._check_existing()
        self.loc.makedirs(PARTS_DIR)
        self._clean_own_temp_files()
        part = load_parts(self.loc).get(part_name(writer_id))
        self.journal = part if part is not None else Manifest(info=info, finished=False)
        if self.journal.finished is not False:  # reopened: unfinished until closed again
            self.journal.finished = False
            self._write_journal()
        self._seq = 1 + max(
            (_seq_of(s.file) for s in self.journal.shards if _is_own(s.file, writer_id)), default=-1
        )
        self._rows: list[Example] = []
        self._buffered_positions = 0
        self._pool = (
            ThreadPoolExecutor(1, thread_name_prefix="logitcache-writer") if background else None
        )
        self._pending: list[Future[None]] = []
        self._closed = False

    # ------------------------------------------------------------------ public

    @property
    def extra(self) -> dict[str, Any]:
        """This writer's bookkeeping, saved in its journal with each commit (cumulative)."""
        return self.journal.extra

    def add(self, example: Example) -> None:
        """Buffer one example; a shard is committed once enough positions are buffered."""
        self._raise_background_errors()
        self._validate(example)
        self._rows.append(example)
        self._buffered_positions += example.num_positions
        if self._buffered_positions >= self.shard_positions:
            self.flush()

    def flush(self) -> None:
        """Commit the buffered examples as one shard (no-op when nothing is buffered)."""
        self._raise_background_errors()
        if not self._rows:
            return
        rows, self._rows, self._buffered_positions = self._rows, [], 0
        seq, self._seq = self._seq, self._seq + 1
        if self._pool is None:
            self._commit(rows, seq)
        else:
            self._pending.append(self._pool.submit(self._commit, rows, seq))

    def close(self, finalize_dataset: bool = True) -> Manifest | None:
        """Commit what is buffered, wait for background work, mark the journal finished (this
        writer has written its whole share), then (by default) finalize.

        Multi-writer jobs pass ``finalize_dataset=False`` on each rank and finalize once.
        """
        if self._closed:
            return None
        self.flush()
        self._wait()
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown()
        self.journal.finished = True  # an empty writer is recorded too: finalize sees it
        self._write_journal()
        return finalize(self.loc) if finalize_dataset else None

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:  # keep what was committed; do not finalize a failed run
            self._rows = []
            self._wait(raise_errors=False)
            if self._pool is not None:
                self._pool.shutdown()

    # ------------------------------------------------------------------ internals

    def _check_existing(self) -> None:
        for where, committed in committed_manifests(self.loc):
            try:
                check_compatible(committed.info, self.info, where)
            except IncompatibleError as e:
                raise IncompatibleError(
                    f"{e}. The folder {self.loc} already holds a different dataset: "
                    "write to a new folder, or rerun with the original settings to resume"
                ) from None

    def _clean_own_temp_files(self) -> None:
        # Leftovers of a crash mid-write: shard files in the folder, journals in _parts/.
        if self.loc.is_local:
            prefix = self._tmp_prefix()
            for folder in ((), (PARTS_DIR,)):
                for name in self.loc.listdir(*folder):
                    if name.startswith(prefix):
                        self.loc.remove(*folder, name)

    def _tmp_prefix(self) -> str:
        return writer_tmp_prefix(self.writer_id)

    def _validate(self, ex: Example) -> None:
        P = len(ex.response_ids)
        where = f"example {ex.id!r}"
        if not isinstance(ex.id, str) or not ex.id:
            raise ValueError(f"{where}: id must be a non-empty string")
        for name in ("prompt_ids", "response_ids"):
            arr = np.asarray(getattr(ex, name))
            if arr.ndim != 1:
                raise ValueError(f"{where}: {name} must be 1-D, got shape {arr.shape}")
            if arr.size and (arr.min() < 0 or arr.max() >= self.info.vocab_size):
                raise ValueError(f"{where}: {name} holds ids outside [0, {self.info.vocab_size})")
        t, spec = ex.targets, self.info.targets
        if spec.kind == "topk":
            if not isinstance(t, TopK):
                raise ValueError(
                    f"{where}: the dataset stores top-k targets, got {type(t).__name__}"
                )
            if (
                t.ids.shape != (P, spec.k)
                or t.logprobs.shape != (P, spec.k)
                or t.tail_logmass.shape != (P,)
            ):
                raise ValueError(
                    f"{where}: top-k targets must be ({P}, {spec.k}) ids and log-probs and ({P},) tail, "
                    f"got {t.ids.shape}, {t.logprobs.shape}, {t.tail_logmass.shape}"
                )
            ids = t.ids
            if spec.adaptive_k:
                counts = None if t.counts is None else np.asarray(t.counts)
                if counts is None or counts.shape != (P,):
                    raise ValueError(
                        f"{where}: the dataset stores adaptive top-k (targets.k_mass "
                        f"{spec.k_mass}): TopK.counts must give the ids kept at each of its {P} "
                        f"positions, got {None if counts is None else counts.shape}"
                    )
                if P and (counts.min() < spec.min_k or counts.max() > spec.k):
                    raise ValueError(
                        f"{where}: TopK.counts must lie in [{spec.min_k}, {spec.k}] "
                        f"(targets.k_min, targets.k), got {counts.min()}..{counts.max()}"
                    )
                ids = t.ids[np.arange(spec.k) < counts[:, None]]  # the kept ids only
            elif t.counts is not None:
                raise ValueError(
                    f"{where}: the example's TopK has counts (adaptive top-k) but the dataset "
                    f"stores {spec.k} ids at every position (targets.k_mass is not set)"
                )
            if spec.n and t.tail_draws is None:
                raise ValueError(
                    f"{where}: the dataset stores top-{spec.k} with {spec.n} tail draws per "
                    "position, but the example's TopK has no tail_draws"
                )
            if not spec.n and t.tail_draws is not None:
                raise ValueError(
                    f"{where}: the example's TopK has tail_draws but the dataset stores none "
                    "(targets.n is 0)"
                )
            draws = t.tail_draws
        else:
            if not isinstance(t, Sampled):
                raise ValueError(
                    f"{where}: the dataset stores sampled targets, got {type(t).__name__}"
                )
            ids, draws = t.ids, t
        if draws is not None and (
            draws.nunique.shape != (P,)
            or draws.ids.shape != draws.counts.shape
            or draws.nunique.sum() != len(draws.ids)
        ):
            raise ValueError(f"{where}: draws need nunique of shape ({P},) summing to len(ids)")
        for arr in [ids] if draws is None or draws.ids is ids else [ids, draws.ids]:
            if arr.size and (arr.min() < 0 or arr.max() >= self.info.vocab_size):
                raise ValueError(f"{where}: target ids outside [0, {self.info.vocab_size})")

    def _commit(self, rows: list[Example], seq: int) -> None:
        data, positions = encode_shard(self.info, rows, self.batch_rows, self.schema)
        self.journal.format_version = FORMAT_VERSION  # (a journal resumed from an older writer)
        name = shard_name(self.writer_id, seq)
        self.loc.write_atomic(data, name, tmp_prefix=self._tmp_prefix())
        entry = ShardEntry(
            file=name,
            rows=len(rows),
            positions=positions,
            bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        self.journal.shards.append(entry)
        self._write_journal()

    def _write_journal(self) -> None:
        write_journal(self.loc, self.writer_id, self.journal)

    def _wait(self, raise_errors: bool = True) -> None:
        pending, self._pending = self._pending, []
        for f in pending:
            exc = f.exception()
            if exc is not None and raise_errors:
                raise exc

    def _raise_background_errors(self) -> None:
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for f in done:
            exc = f.exception()
            if exc is not None:
                raise exc


def _is_own(file: str, writer_id: str) -> bool:
    return file.startswith(f"shard-{writer_id}-")


def _seq_of(file: str) -> int:
    return int(file.rsplit("-", 1)[1].split(".")[0])


def _list_array(values: np.ndarray, lengths: np.ndarray, typ: pa.DataType) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError("a record batch holds over 2^31 values; lower batch_rows")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=typ))


def encode_columns(
    info: DatasetInfo, rows: list[Example], ranks: Mapping[str, np.ndarray] | None = None
) -> dict[str, pa.Array]:
    """Encode examples into the shard's columns (vectorized across all rows).

    ``ranks``: for "topk" and "sample", the (V,) rank of each id (:func:`shard_rank_tables`);
    an id kind given a rank is stored as ranks, ascending within each position. Without
    (the default), ids are stored as themselves."""
    ranks = ranks or {}
    tok = info.token_type
    tok_np = tok.to_pandas_dtype()
    n_pos = np.array([len(r.response_ids) for r in rows], dtype=np.int64)
    cols: dict[str, pa.Array] = {
        "id": pa.array([r.id for r in rows], type=pa.string()),
        "prompt_ids": _list_array(
            _concat([np.asarray(r.prompt_ids) for r in rows], tok_np),
            np.array([len(r.prompt_ids) for r in rows]),
            tok,
        ),
        "response_ids": _list_array(
            _concat([np.asarray(r.response_ids) for r in rows], tok_np), n_pos, tok
        ),
    }
    spec = info.targets
    if spec.kind == "topk":
        k = spec.k
        ids = _concat([r.targets.ids for r in rows], np.int64).reshape(-1, k)
        if "topk" in ranks:  # adaptive padding may hold any value: clipped, then masked below
            ids = ranks["topk"][np.clip(ids, 0, len(ranks["topk"]) - 1)].astype(np.int64)
        lps = _concat([r.targets.logprobs for r in rows], np.float32).reshape(-1, k)
        tail = _concat([r.targets.tail_logmass for r in rows], np.float32)
        per_pos = np.full(len(ids), k)  # ids kept at each position
        per_row = n_pos * k  # ids of each example
        if spec.adaptive_k:
            per_pos = _concat([r.targets.counts for r in rows], np.int64)
            per_row = np.array([int(np.sum(r.targets.counts)) for r in rows], dtype=np.int64)
            kept = np.arange(k) < per_pos[:, None]  # (P, k)
            ids = np.where(kept, ids, np.iinfo(np.int64).max)  # padding sorts last
        ids, lps = sort_by_id(ids, lps)
        if spec.adaptive_k:
            ids, lps = ids[kept], lps[kept]  # flat, ascending within each position
            cols["topk_count"] = _list_array(per_pos.astype(np.uint16), n_pos, pa.uint16())
        planes = encode_id_planes(ids.reshape(-1), per_pos, info.id_bytes)
        val_type = pa.from_numpy_dtype(encode_logprobs(np.zeros(0), spec.codec).dtype)
        for name, plane in zip(id_plane_names("topk", info.id_bytes), planes, strict=True):
            cols[name] = _list_array(plane, per_row, pa.uint8())
        cols["topk_logprobs"] = _list_array(
            encode_logprobs(lps.reshape(-1), spec.codec), per_row, val_type
        )
        cols["tail_logmass"] = _list_array(encode_logprobs(tail, spec.codec), n_pos, val_type)
    if spec.has_draws:
        draws = _draws(spec, rows)
        nunique = _concat([d.nunique for d in draws], np.int64)
        ids = _concat([d.ids for d in draws], np.int64)
        if "sample" in ranks:
            ids = ranks["sample"][ids].astype(np.int64)
        counts = _concat([d.counts for d in draws], np.int64)
        if nunique.size and nunique.max() > spec.n:
            raise ValueError(
                f"a position holds {nunique.max()} unique ids but only n={spec.n} draws"
            )
        per_row_u = np.array([len(d.ids) for d in draws], dtype=np.int64)
        pos = np.repeat(np.arange(len(nunique)), nunique)
        # The capture writes each position's ids ascending already; sort only when they are not
        # (as ranks usually are not).
        if not np.all((ids[1:] > ids[:-1]) | (pos[1:] != pos[:-1])):
            order = order_within_segments(ids, nunique)
            ids, counts = ids[order], counts[order]
        planes = encode_id_planes(ids, nunique, info.id_bytes)
        for name, plane in zip(id_plane_names("sample", info.id_bytes), planes, strict=True):
            cols[name] = _list_array(plane, per_row_u, pa.uint8())
        cols["sample_counts"] = _list_array(counts.astype(np.uint8), per_row_u, pa.uint8())
        cols["sample_nunique"] = _list_array(nunique.astype(np.uint8), n_pos, pa.uint8())
    return cols


def encode_shard(
    info: DatasetInfo,
    rows: list[Example],
    batch_rows: int,
    schema: pa.Schema | None = None,
    id_ranks: bool = True,
) -> tuple[bytes, int]:
    """Serialize examples as one zstd Arrow IPC file; returns (bytes, positions).

    Ids are stored as their rank in how often this shard stores them (one rank table per id
    kind in the schema metadata, docs/FORMAT.md "Id ranks"): frequent ids get small ranks, so
    each position's sorted ranks have smaller gaps than its sorted ids and compress better.
    ``id_ranks=False`` stores the ids themselves, as format versions 1 and 2 do (benchmarks)."""
    schema = schema or info.schema()
    tables = {k: t for k, t in shard_rank_tables(info, rows).items() if len(t)} if id_ranks else {}
    meta = dict(schema.metadata or {})
    meta.update({RANK_TABLE_KEYS[kind]: pack_rank_table(t) for kind, t in tables.items()})
    schema = schema.with_metadata(meta)
    ranks = {kind: ranks_of_ids(t, info.vocab_size) for kind, t in tables.items()}
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_file(sink, schema, options=options) as w:
        for i in range(0, len(rows), batch_rows):
            cols = encode_columns(info, rows[i : i + batch_rows], ranks)
            w.write_batch(pa.record_batch([cols[f.name] for f in schema], schema=schema))
    return sink.getvalue().to_pybytes(), sum(len(r.response_ids) for r in rows)


def shard_rank_tables(info: DatasetInfo, rows: list[Example]) -> dict[str, np.ndarray]:
    """The rank table of each id kind these rows store ("topk", "sample"), from their counts."""
    spec, tables = info.targets, {}
    if spec.kind == "topk":
        ids = [
            r.targets.ids.reshape(-1)
            if r.targets.counts is None
            else r.targets.ids[np.arange(spec.k) < np.asarray(r.targets.counts)[:, None]]
            for r in rows
        ]
        tables["topk"] = frequency_table(_concat(ids, np.int64), info.vocab_size)
    if spec.has_draws:
        ids = _concat([d.ids for d in _draws(spec, rows)], np.int64)
        tables["sample"] = frequency_table(ids, info.vocab_size)
    return tables


def _draws(spec: TargetSpec, rows: list[Example]) -> list[Sampled]:
    """Each row's draws: a top-k row's tail draws, a sampled row's targets."""
    return [r.targets.tail_draws if spec.kind == "topk" else r.targets for r in rows]


def _concat(arrays: list[np.ndarray], dtype: Any) -> np.ndarray:
    if not arrays:
        return np.zeros(0, dtype=dtype)
    return np.concatenate([np.asarray(a).reshape(-1) for a in arrays]).astype(dtype, copy=False)
