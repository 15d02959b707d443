"""Check a dataset end to end: checksums, schema, counts, id ranges and id uniqueness.

Every problem is reported (not just the first), each naming the shard, the field, what was
expected and what was found, so a user can tell a bad copy from a bad capture at a glance.
"""

from __future__ import annotations

import hashlib
import os
import shlex
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from .errors import LogitCacheError
from .format import MANIFEST_NAME, PARTS_DIR, SHARD_NAME_RE, DatasetInfo, id_plane_names
from .manifest import ShardEntry, load_manifest, load_parts, pending_parts
from .reader import ShardReader, list_values
from .storage import Location


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset."""

    where: str
    field: str
    expected: str
    found: str

    def __str__(self) -> str:
        return f"{self.where}: {self.field}: expected {self.expected}, found {self.found}"


@dataclass
class VerifyReport:
    problems: list[Problem]
    warnings: list[str]
    shards: int
    examples: int
    positions: int

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_dataset(
    url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> VerifyReport:
    """Verify the dataset at ``url``; never raises on bad data, reports it instead."""
    loc = Location(url, storage_options)
    problems: list[Problem] = []
    warnings: list[str] = []
    try:
        manifest = load_manifest(loc)
    except LogitCacheError as e:
        return VerifyReport(
            [Problem(MANIFEST_NAME, "manifest", "a valid manifest", str(e))], [], 0, 0, 0
        )
    first_seen: dict[str, str] = {}
    examples = positions = 0
    for entry in manifest.shards:
        rows, pos = _verify_shard(loc, entry, manifest.info, problems, first_seen)
        examples += rows
        positions += pos
    listed = {s.file for s in manifest.shards}
    for name in loc.listdir():
        if SHARD_NAME_RE.match(name) and name not in listed:
            warnings.append(
                f"{name}: on storage but not in {MANIFEST_NAME} (uncommitted or not "
                "finalized); readers ignore it"
            )
    try:
        parts = load_parts(loc)
    except LogitCacheError as e:
        parts = {}
        warnings.append(str(e))
    pending = pending_parts(loc, parts)
    if pending is not None:  # finalize would refuse: say what finishes the capture first
        warnings.append(f"the capture is not complete: {pending}")
    for pname, part in parts.items() if pending is None else ():
        missing = [s.file for s in part.shards if s.file not in listed]
        if missing:
            warnings.append(
                f"{PARTS_DIR}/{pname}: {len(missing)} committed shard(s) not in "
                f"{MANIFEST_NAME}; run `logitcache finalize {shlex.quote(str(loc))}`"
            )
    return VerifyReport(problems, warnings, len(manifest.shards), examples, positions)


def _verify_shard(
    loc: Location,
    entry: ShardEntry,
    info: DatasetInfo,
    problems: list[Problem],
    first_seen: dict[str, str],
) -> tuple[int, int]:
    where = entry.file

    def bad(field: str, expected: object, found: object) -> None:
        problems.append(Problem(where, field, str(expected), str(found)))

    if not loc.exists(entry.file):
        bad("file", "present", "missing")
        return 0, 0
    data = loc.read_bytes(entry.file)
    if len(data) != entry.bytes:
        bad("bytes", entry.bytes, len(data))
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.sha256:
        bad("sha256", entry.sha256, digest)
        return 0, 0  # decoding corrupt bytes would only add noise to the report
    try:
        reader = ShardReader(loc, entry, info, data=data)  # the bytes just hashed
        batches = [reader.record_batch(i) for i in range(reader.num_batches)]
    except LogitCacheError as e:
        bad("arrow", "a readable shard matching the manifest", e)
        return 0, 0
    rows = positions = 0
    for b, rb in enumerate(batches):
        r, p = _verify_batch(rb, info, f"batch {b}", bad)
        rows += r
        positions += p
        for ex_id in rb.column("id").to_pylist():
            if ex_id in first_seen:
                bad("id", "unique ids", f"{ex_id!r} also in {first_seen[ex_id]}")
            else:
                first_seen[ex_id] = where
    if rows != entry.rows:
        bad("rows", entry.rows, rows)
    if positions != entry.positions:
        bad("positions", entry.positions, positions)
    return rows, positions


def _verify_batch(rb: pa.RecordBatch, info: DatasetInfo, batch: str, bad: Any) -> tuple[int, int]:
    response, roff = list_values(rb.column("response_ids"))
    prompt, _ = list_values(rb.column("prompt_ids"))
    n_pos = np.diff(roff)
    for name, ids in (("prompt_ids", prompt), ("response_ids", response)):
        if ids.size and ids.max() >= info.vocab_size:
            bad(f"{batch} {name}", f"ids < vocab_size {info.vocab_size}", f"max id {ids.max()}")
    spec = info.targets

    def lengths(name: str, expected: np.ndarray) -> None:
        found = np.diff(list_values(rb.column(name))[1])
        if not np.array_equal(found, expected):
            r = int(np.argmax(found != expected))
            bad(f"{batch} {name}", f"{expected[r]} values in row {r}", found[r])

    if spec.kind == "topk":
        per_row = n_pos * spec.k
        if spec.adaptive_k:  # version 2: topk_count ids at each position, within [k_min, k]
            lengths("topk_count", n_pos)
            kj, _ = list_values(rb.column("topk_count"))
            if kj.size and (kj.min() < spec.min_k or kj.max() > spec.k):
                bad(
                    f"{batch} topk_count",
                    f"in [{spec.min_k}, {spec.k}]",
                    f"[{kj.min()}, {kj.max()}]",
                )
            per_row = _segment_sums(kj, roff) if len(kj) == n_pos.sum() else per_row
        for name in [*id_plane_names("topk", info.id_bytes), "topk_logprobs"]:
            lengths(name, per_row)
        lengths("tail_logmass", n_pos)
    if spec.has_draws:
        lengths("sample_nunique", n_pos)
        nunique, _ = list_values(rb.column("sample_nunique"))
        u_per_row = _segment_sums(nunique, roff)
        for name in [*id_plane_names("sample", info.id_bytes), "sample_counts"]:
            lengths(name, u_per_row)
        counts, _ = list_values(rb.column("sample_counts"))
        if len(counts) == nunique.sum():
            per_pos = _segment_sums(
                counts, np.concatenate([[0], np.cumsum(nunique, dtype=np.int64)])
            )
            # Top-k tail draws: a position whose tail holds no mass has none; with n_rate,
            # a position has at most n (the rule's count depends on the exact tail mass).
            ok = (per_pos == spec.n) | ((per_pos == 0) & (spec.kind == "topk"))
            want = f"{spec.n} draws at every position"
            if spec.tail_draws and spec.n_rate is not None:
                ok, want = per_pos <= spec.n, f"at most {spec.n} draws at a position"
            if not np.all(ok):
                p = int(np.argmax(~ok))
                bad(
                    f"{batch} sample_counts",
                    want + (" (or 0 where the tail is empty)" if spec.kind == "topk" else ""),
                    f"{per_pos[p]} at position {p}",
                )
    try:
        from .reader import decode_batch

        dec = decode_batch(rb, info)
        for what, ids in (("top-k ids", dec.topk_ids), ("sampled ids", dec.sample_ids)):
            if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= info.vocab_size):
                bad(f"{batch} {what}", f"in [0, {info.vocab_size})", f"[{ids.min()}, {ids.max()}]")
    except (ValueError, IndexError) as e:
        bad(f"{batch} targets", "decodable", e)
    return rb.num_rows, int(n_pos.sum())


def _segment_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Sum of values[offsets[i]:offsets[i+1]] for each i (empty segments sum to 0)."""
    csum = np.concatenate([[0], np.cumsum(values.astype(np.int64))])
    return csum[offsets[1:]] - csum[offsets[:-1]]
