"""Read a logit dataset (local folder or fsspec URL) into numpy, one record batch at a time.

The reader trusts only ``manifest.json``: a shard that is not listed there was never committed
and is not read. With ``verify=True`` each shard's sha256 is checked before it is decoded, which
is the only way to catch silent corruption: zstd-compressed Arrow decodes most flipped bits into
wrong numbers without an error (docs/FORMAT.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .codecs import (
    QMAX,
    decode_id_planes,
    decode_id_planes_fixed,
    decode_logprobs,
    ids_from_ranks,
    unpack_rank_table,
)
from .errors import ShardError
from .format import (
    META_PREFIX,
    RANK_TABLE_KEYS,
    DatasetInfo,
    Example,
    Sampled,
    TopK,
    counted,
    id_plane_names,
)
from .manifest import Manifest, ShardEntry, load_manifest
from .storage import Location


@dataclass
class DecodedBatch:
    """One record batch decoded to flat numpy arrays. R rows, P positions, U sampled ids."""

    ids: list[str]
    prompt_ids: np.ndarray
    """Flat token ids of all student prompts; row r is prompt_offsets[r]:prompt_offsets[r+1]."""
    prompt_offsets: np.ndarray
    response_ids: np.ndarray
    """Flat (P,) response token ids; position offsets of row r are response_offsets[r:r+2]."""
    response_offsets: np.ndarray
    topk_ids: np.ndarray | None = None
    """(P, K) int32 ids, each position's in the order they are stored: ascending (format
    versions 1 and 2), or by their rank in the shard (version 3: most frequent first)."""
    topk_logprobs: np.ndarray | None = None
    """(P, K) float32 log-probs (u8/u16 codecs: renormalized together with the tail)."""
    tail_logmass: np.ndarray | None = None
    """(P,) float32 log of the mass outside the top-k."""
    sample_ids: np.ndarray | None = None
    """(U,) int32 drawn ids, each position's in the order they are stored, as ``topk_ids``
    (top-k datasets with tail draws: the tail's draws)."""
    sample_counts: np.ndarray | None = None
    """(U,) uint8 draws of each id."""
    sample_offsets: np.ndarray | None = None
    """(P+1,) int64 offsets of each position's sampled ids."""
    topk_counts: np.ndarray | None = None
    """(P,) int64 ids kept at each position (adaptive top-k, format version 2): row p of
    ``topk_ids``/``topk_logprobs`` holds them first, then padding (id 0, log-prob -inf)."""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_positions(self) -> int:
        return len(self.response_ids)

    def example(self, i: int) -> Example:
        """Row ``i`` as an :class:`Example` (copies nothing but small slices)."""
        p0, p1 = self.prompt_offsets[i], self.prompt_offsets[i + 1]
        r0, r1 = self.response_offsets[i], self.response_offsets[i + 1]
        draws = None
        if self.sample_offsets is not None:
            assert self.sample_ids is not None and self.sample_counts is not None
            u0, u1 = self.sample_offsets[r0], self.sample_offsets[r1]
            draws = Sampled(
                self.sample_ids[u0:u1],
                self.sample_counts[u0:u1],
                np.diff(self.sample_offsets[r0 : r1 + 1]),
            )
        targets: TopK | Sampled
        if self.topk_ids is not None:
            assert self.topk_logprobs is not None and self.tail_logmass is not None
            counts = None if self.topk_counts is None else self.topk_counts[r0:r1]
            targets = TopK(
                self.topk_ids[r0:r1],
                self.topk_logprobs[r0:r1],
                self.tail_logmass[r0:r1],
                draws,
                counts,
            )
        else:
            assert draws is not None
            targets = draws
        return Example(self.ids[i], self.prompt_ids[p0:p1], self.response_ids[r0:r1], targets)


def list_values(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list column, offsets rebased to start at zero."""
    offsets = col.offsets.to_numpy().astype(np.int64)
    values = col.flatten().to_numpy(zero_copy_only=False)
    return values, offsets - offsets[0]


class _ProbTables:
    """Lookup tables for the sqrt-probability codecs: code → probability and → log-probability."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def get(self, codec: str) -> tuple[np.ndarray, np.ndarray]:
        if codec not in self._cache:
            codes = np.arange(QMAX[codec] + 1)
            prob = ((codes / QMAX[codec]) ** 2).astype(np.float32)
            self._cache[codec] = (prob, decode_logprobs(codes, codec))  # type: ignore[arg-type]
        return self._cache[codec]


_TABLES = _ProbTables()


def _renormalized(codes: np.ndarray, tail: np.ndarray, codec: str) -> tuple[np.ndarray, np.ndarray]:
    """(P, k) top-k log-probs and (P,) tail log-mass from u8/u16 codes, renormalized so that
    each position's entries plus its tail sum to one (docs/FORMAT.md)."""
    prob, logp = _TABLES.get(codec)
    with np.errstate(divide="ignore"):
        # einsum: a row sum over a short axis, several times faster than .sum(axis=1)
        log_total = np.log(np.einsum("pk->p", np.take(prob, codes)) + prob[tail])
    logprobs = np.take(logp, codes)  # np.take: about twice as fast as logp[codes] here
    logprobs -= log_total[:, None]
    return logprobs, logp[tail] - log_total


_KEEPING_FREED_MEMORY = False


def keep_freed_memory(pad: int = 64 << 20) -> None:
    """Have glibc's malloc keep ``pad`` bytes (64 MiB) of freed heap for reuse rather than
    return them to the OS (``mallopt(M_TOP_PAD)``); once per process, a no-op off glibc.

    Decoding a record batch allocates and frees arrays of megabytes. Pages returned to the OS
    are faulted in again, zeroed, by the next batch: measured on a 12,096-position batch of
    top-32 + 32 tail draws, 2,327 minor page faults per decode (98 with the pad) and decoding
    3× slower (docs/RESULTS.md). The training stream calls this in the process that decodes.
    """
    global _KEEPING_FREED_MEMORY
    if _KEEPING_FREED_MEMORY:
        return
    _KEEPING_FREED_MEMORY = True
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    m_top_pad = -2  # malloc.h
    ctypes.CDLL("libc.so.6").mallopt(m_top_pad, pad)


def decode_batch(batch: pa.RecordBatch, info: DatasetInfo) -> DecodedBatch:
    """Decode one record batch of a shard of ``info``'s dataset."""
    prompt_ids, prompt_off = list_values(batch.column("prompt_ids"))
    response_ids, response_off = list_values(batch.column("response_ids"))
    out = DecodedBatch(
        ids=batch.column("id").to_pylist(),
        prompt_ids=prompt_ids,
        prompt_offsets=prompt_off,
        response_ids=response_ids,
        response_offsets=response_off,
    )
    spec = info.targets
    by_rank = _rank_tables(batch.schema.metadata, info.vocab_size)
    if spec.adaptive_k:
        _decode_adaptive_topk(batch, info, out, by_rank.get("topk"))
    elif spec.kind == "topk":
        planes = [list_values(batch.column(n))[0] for n in id_plane_names("topk", info.id_bytes)]
        out.topk_ids = decode_id_planes_fixed(planes, spec.k)
        if "topk" in by_rank:
            out.topk_ids = ids_from_ranks(out.topk_ids, by_rank["topk"])
        stored = list_values(batch.column("topk_logprobs"))[0]
        tail = list_values(batch.column("tail_logmass"))[0]
        if spec.codec in ("f32", "f16"):
            out.topk_logprobs = decode_logprobs(stored, spec.codec).reshape(-1, spec.k)
            out.tail_logmass = decode_logprobs(tail, spec.codec)
        else:
            codes = stored.reshape(-1, spec.k)
            out.topk_logprobs, out.tail_logmass = _renormalized(codes, tail, spec.codec)
    if spec.has_draws:
        nunique = list_values(batch.column("sample_nunique"))[0].astype(np.int64)
        planes = [list_values(batch.column(n))[0] for n in id_plane_names("sample", info.id_bytes)]
        out.sample_ids = decode_id_planes(planes, nunique)
        if "sample" in by_rank:
            out.sample_ids = ids_from_ranks(out.sample_ids, by_rank["sample"])
        out.sample_counts = list_values(batch.column("sample_counts"))[0]
        out.sample_offsets = np.concatenate([[0], np.cumsum(nunique)])
    return out


def _rank_tables(meta: dict[bytes, bytes] | None, vocab_size: int) -> dict[str, np.ndarray]:
    """The (V,) id of each rank for each id kind a shard stores as ranks (format version 3)."""
    out = {}
    for kind, key in RANK_TABLE_KEYS.items():
        value = (meta or {}).get(key.encode())
        if value is not None:
            out[kind] = unpack_rank_table(value, vocab_size)
    return out


def _decode_adaptive_topk(
    batch: pa.RecordBatch, info: DatasetInfo, out: DecodedBatch, by_rank: np.ndarray | None
) -> None:
    """Top-k of a variable-k batch (``topk_count`` ids per position) into padded (P, k) rows:
    ids 0 and log-probs -inf past a position's count.

    The u8/u16 codes are scattered into padded rows first, padded with code 0 (probability 0,
    log-prob -inf, as the codec stores an id of no mass), and then decoded as fixed-k rows.
    """
    spec = info.targets
    counts = list_values(batch.column("topk_count"))[0].astype(np.int64)  # (P,)
    planes = [list_values(batch.column(n))[0] for n in id_plane_names("topk", info.id_bytes)]
    stored = list_values(batch.column("topk_logprobs"))[0]  # (Σ counts,)
    tail = list_values(batch.column("tail_logmass"))[0]
    kept = np.flatnonzero(np.arange(spec.k) < counts[:, None])  # row-major, as the entries
    out.topk_counts = counts
    out.topk_ids = np.zeros((len(counts), spec.k), dtype=np.int32)
    ids = decode_id_planes(planes, counts)
    out.topk_ids.ravel()[kept] = ids if by_rank is None else ids_from_ranks(ids, by_rank)
    if spec.codec in ("f32", "f16"):
        out.topk_logprobs = np.full((len(counts), spec.k), -np.inf, dtype=np.float32)
        out.topk_logprobs.ravel()[kept] = decode_logprobs(stored, spec.codec)
        out.tail_logmass = decode_logprobs(tail, spec.codec)
        return
    codes = np.zeros((len(counts), spec.k), dtype=stored.dtype)
    codes.ravel()[kept] = stored
    out.topk_logprobs, out.tail_logmass = _renormalized(codes, tail, spec.codec)


class ShardReader:
    """One committed shard: random access to its record batches."""

    def __init__(
        self,
        loc: Location,
        entry: ShardEntry,
        info: DatasetInfo,
        *,
        verify: bool = False,
        cache_dir: str | Path | None = None,
        data: bytes | None = None,
    ):
        """``data``: the shard's bytes when the caller already holds them (not fetched again)."""
        self.loc = loc
        self.entry = entry
        self.info = info
        self.where = f"shard {entry.file} of {loc}"
        if data is None:
            data = _fetch(loc, entry, cache_dir, self.where)
        if len(data) != entry.bytes:
            raise ShardError(
                f"{self.where}: {len(data)} bytes on storage but the manifest says {entry.bytes}: "
                f"the shard is truncated or was replaced; {repair_advice(loc)}"
            )
        if verify:
            found = hashlib.sha256(data).hexdigest()
            if found != entry.sha256:
                raise ShardError(
                    f"{self.where}: sha256 {found[:16]}… does not match the manifest's "
                    f"{entry.sha256[:16]}…: the shard is corrupt; {repair_advice(loc)}"
                )
        try:
            self._reader = pa.ipc.open_file(pa.py_buffer(data))
        except (pa.ArrowException, OSError) as e:
            raise ShardError(
                f"{self.where}: not a readable Arrow IPC file ({e}); it is truncated or corrupt"
            ) from None
        expected = info.schema()
        if not self._reader.schema.equals(expected, check_metadata=False):
            raise ShardError(
                f"{self.where}: schema does not match the manifest's target spec "
                f"({info.targets}): found {self._reader.schema}"
            )
        meta = self._reader.schema.metadata or {}
        stored = meta.get(f"{META_PREFIX}info".encode())
        try:
            embedded = None if stored is None else json.loads(stored)
        except ValueError as e:  # JSON or UTF-8: bytes damaged in storage
            raise ShardError(
                f"{self.where}: its embedded metadata is not valid JSON ({e}); the shard is "
                f"corrupt: {repair_advice(loc, verify=True)}"
            ) from None
        if embedded is not None and not _same_encoding(
            DatasetInfo.from_json(embedded, self.where), info
        ):
            raise ShardError(
                f"{self.where}: the shard's embedded metadata names another dataset "
                "(tokenizer or targets differ from manifest.json)"
            )

    @property
    def num_batches(self) -> int:
        return self._reader.num_record_batches

    def record_batch(self, i: int) -> pa.RecordBatch:
        try:
            rb = self._reader.get_batch(i)
            # Full validation turns damaged offsets into an error: decoding them unchecked
            # can abort the whole process inside Arrow (docs/RELIABILITY.md).
            rb.validate(full=True)
            return rb
        except (pa.ArrowException, OSError) as e:
            raise ShardError(
                f"{self.where}: record batch {i} does not decode ({e}); the shard is "
                f"corrupt: {repair_advice(self.loc, verify=True)}"
            ) from None

    def batch(self, i: int) -> DecodedBatch:
        rb = self.record_batch(i)
        try:
            return decode_batch(rb, self.info)
        except (pa.ArrowException, ValueError, IndexError) as e:
            raise ShardError(
                f"{self.where}: record batch {i} decodes to inconsistent arrays ({e}); the "
                f"shard is corrupt: {repair_advice(self.loc, verify=True)}"
            ) from None

    def __iter__(self) -> Iterator[DecodedBatch]:
        for i in range(self.num_batches):
            yield self.batch(i)


def _same_encoding(a: DatasetInfo, b: DatasetInfo) -> bool:
    """Whether a shard's own metadata agrees with the manifest on what its ids and values mean.

    The teacher and capture settings may differ: a merged dataset mixes teachers when asked.
    """
    return (a.tokenizer_fingerprint, a.vocab_size, a.targets) == (
        b.tokenizer_fingerprint,
        b.vocab_size,
        b.targets,
    )


def repair_advice(loc: Location, *, verify: bool = False) -> str:
    """What mends a missing or damaged shard of ``loc``. Rerunning the build into the same
    folder does not: its shards count as committed (a missing one stops the rerun)."""
    from .capture_config import CONFIG_NAME

    q = shlex.quote(str(loc))
    first = f"run `logitcache verify {q}` to list every damaged shard, then " if verify else ""
    again = "write the data again into a new folder"
    if loc.exists(CONFIG_NAME):
        config = shlex.quote(loc.url_of(CONFIG_NAME))
        again = f"capture again into a new folder: logitcache build --config {config} --out NEW_DIR"
        try:  # a job array's config is its part 0's: capture every part in one run instead
            if json.loads(loc.read_bytes(CONFIG_NAME))["run"]["num_shards"] > 1:
                again += " --num-shards 1 --shard-index 0"
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an unreadable config: the command as it is (build names the problem)
    return (
        f"{first}restore the shard from a copy of the dataset, or {again} (rerunning the build "
        f"into {q} does not replace it)"
    )


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _fetch(loc: Location, entry: ShardEntry, cache_dir: str | Path | None, where: str) -> bytes:
    """The shard's bytes, from a local cache of remote shards when one is given."""
    cached = None
    # The checksum names the cached copy, so only a real hex digest may: a manifest's
    # "../x" must not reach outside cache_dir.
    if cache_dir is not None and not loc.is_local and _SHA256_HEX.fullmatch(entry.sha256):
        cached = Path(cache_dir) / f"{entry.sha256}.arrow"
        if cached.exists() and cached.stat().st_size == entry.bytes:
            return cached.read_bytes()
    try:
        data = loc.read_bytes(entry.file)
    except FileNotFoundError:
        raise ShardError(
            f"{where}: listed in manifest.json but missing from storage; {repair_advice(loc)}"
        ) from None
    if cached is not None and hashlib.sha256(data).hexdigest() == entry.sha256:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, cached)
    return data


class LogitDataset:
    """A committed logit dataset: its manifest, and its shards as numpy batches."""

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        verify: bool = False,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | Path | None = None,
    ):
        self.loc = Location(url, storage_options)
        self.manifest: Manifest = load_manifest(self.loc)
        self.verify = verify
        self.cache_dir = cache_dir

    @property
    def info(self) -> DatasetInfo:
        return self.manifest.info

    @property
    def shards(self) -> list[ShardEntry]:
        return self.manifest.shards

    @cached_property
    def num_examples(self) -> int:
        return self.manifest.num_examples

    @cached_property
    def num_positions(self) -> int:
        return self.manifest.num_positions

    def shard(self, i: int) -> ShardReader:
        return ShardReader(
            self.loc, self.shards[i], self.info, verify=self.verify, cache_dir=self.cache_dir
        )

    def iter_batches(self, shard_indices: list[int] | None = None) -> Iterator[DecodedBatch]:
        for i in range(len(self.shards)) if shard_indices is None else shard_indices:
            yield from self.shard(i)

    def iter_examples(self) -> Iterator[Example]:
        for batch in self.iter_batches():
            for i in range(len(batch)):
                yield batch.example(i)

    def __len__(self) -> int:
        return self.num_examples

    def __repr__(self) -> str:
        return (
            f"LogitDataset({self.loc}, {counted(self.num_examples, 'example')}, "
            f"{counted(self.num_positions, 'position')}, {counted(len(self.shards), 'shard')}, "
            f"{self.info.targets.label})"
        )


def open_dataset(url: str | os.PathLike[str], **kwargs: Any) -> LogitDataset:
    """Open the dataset at a local path or fsspec URL (see :class:`LogitDataset`)."""
    return LogitDataset(url, **kwargs)


def committed_ids(
    url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> set[str]:
    """Ids of every example committed to the dataset, finalized or still in writer journals.

    Capture resumes from this: committed examples are skipped, the rest are captured.
    """
    from .manifest import committed_manifests

    loc = Location(url, storage_options)
    # A shard listed in both the manifest and a journal (finalized, then resumed) counts once.
    entries: dict[str, tuple[ShardEntry, DatasetInfo]] = {}
    for _, m in committed_manifests(loc):
        entries.update({s.file: (s, m.info) for s in m.shards})
    ids: set[str] = set()
    for entry, info in entries.values():
        reader = ShardReader(loc, entry, info)
        for i in range(reader.num_batches):
            ids.update(reader.record_batch(i).column("id").to_pylist())
    return ids
