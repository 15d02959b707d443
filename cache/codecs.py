"""Numeric codecs of the shard format: token-id byte planes and log-probability quantizers.

All functions are vectorized numpy over a whole record batch; none loops per position.

Token ids. Per position the ids are sorted ascending and stored as gaps (the first id as is,
then differences), split into little-endian byte planes: plane b holds byte b of every gap.
Sorted gaps are small, so the high planes are nearly all zero and zstd folds them away; this
costs about 1 byte per id against ~2 for plain uint16/uint32 ids (docs/FORMAT.md, measured).

Probabilities. Codecs for the teacher's log-probabilities (and the tail mass):
- ``f32`` / ``f16``: the log-probability as an IEEE float (f16: relative error ≤ 2^-11).
- ``u8`` / ``u16``: the square root of the probability, rounded to 1/255 (1/65535) steps.
  sqrt(p) is the variance-stabilizing map of a categorical distribution: a fixed step in sqrt(p)
  costs the same KL wherever p lies, unlike fixed steps in log p, which waste precision on tiny
  probabilities and lose it on the near-certain tokens that matter most. A stored probability is
  never rounded to zero (code ≥ 1), so a decoded entry is never -inf unless it was exactly 0.
  Decoding renormalizes the entries plus the tail so that each position sums to one.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from typing import Literal

import numpy as np
import zstandard

Codec = Literal["f32", "f16", "u8", "u16"]
CODECS: tuple[Codec, ...] = ("f32", "f16", "u8", "u16")
QMAX = {"u8": 255, "u16": 65535}
_STORAGE = {"f32": np.float32, "f16": np.float16, "u8": np.uint8, "u16": np.uint16}


def id_bytes_for_vocab(vocab_size: int) -> int:
    """Bytes per token id (and per gap plane count): the narrowest width that holds the vocab."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return max(1, (int(vocab_size - 1).bit_length() + 7) // 8)


def storage_dtype(codec: Codec) -> np.dtype:
    """numpy dtype in which ``codec`` values are stored in the shard."""
    return np.dtype(_STORAGE[codec])


# ---------------------------------------------------------------------------- token ids


def sort_by_id(ids: np.ndarray, *values: np.ndarray) -> tuple[np.ndarray, ...]:
    """Sort each row of (P, K) ``ids`` ascending and apply the same permutation to ``values``."""
    order = np.argsort(ids, axis=1, kind="stable")
    return tuple(np.take_along_axis(a, order, axis=1) for a in (ids, *values))


def order_within_segments(ids: np.ndarray, seg_lengths: np.ndarray) -> np.ndarray:
    """The permutation that sorts flat ``ids`` (non-negative, < 2^32) ascending within each
    segment of ``seg_lengths`` and keeps the segments in order: one stable argsort of (segment,
    id) packed in an int64, nearly sorted already (9x faster than ``np.lexsort`` of the two)."""
    seg = np.repeat(np.arange(len(seg_lengths), dtype=np.int64), np.asarray(seg_lengths, np.int64))
    return np.argsort((seg << 32) | np.asarray(ids).astype(np.int64), kind="stable")


def encode_id_planes(ids: np.ndarray, seg_lengths: np.ndarray, id_bytes: int) -> list[np.ndarray]:
    """Gap-code flat ``ids`` (ascending within each segment) into ``id_bytes`` uint8 planes.

    ``seg_lengths`` gives the number of ids of each position; segments tile ``ids`` in order.
    """
    ids = np.asarray(ids, dtype=np.int64)
    gaps = np.empty_like(ids)
    if ids.size:
        gaps[0] = ids[0]
        gaps[1:] = ids[1:] - ids[:-1]
        starts = np.cumsum(seg_lengths)[:-1]
        starts = starts[starts < ids.size]
        gaps[starts] = ids[starts]
    if gaps.size and gaps.min() < 0:
        raise ValueError("token ids must be sorted ascending within each position before encoding")
    return [((gaps >> (8 * b)) & 0xFF).astype(np.uint8) for b in range(id_bytes)]


def decode_id_planes(planes: list[np.ndarray], seg_lengths: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_id_planes`: flat int32 ids.

    One cumulative sum over all segments, made to restart at each: the first gap of a segment
    has the previous (non-empty) segment's total subtracted, so every running sum is an id of
    its own segment and fits int32 (ids of up to 3 bytes; 4-byte ids sum in int64).
    """
    gaps = _gaps(planes, np.int32 if len(planes) <= 3 else np.int64)
    seg_lengths = np.asarray(seg_lengths, dtype=np.int64)
    if int(seg_lengths.sum()) != gaps.size:
        raise ValueError(f"{gaps.size} id gaps do not tile segments of {int(seg_lengths.sum())}")
    if gaps.size == 0:
        return gaps.astype(np.int32)
    starts = (np.cumsum(seg_lengths) - seg_lengths)[seg_lengths > 0]
    totals = np.add.reduceat(gaps, starts)
    gaps[starts[1:]] -= totals[:-1]
    return np.cumsum(gaps, out=gaps).astype(np.int32, copy=False)


def decode_id_planes_fixed(planes: list[np.ndarray], k: int) -> np.ndarray:
    """Fast path of :func:`decode_id_planes` when every position holds exactly ``k`` ids: (P, k)."""
    gaps = _gaps(planes, np.int32).reshape(-1, k)
    return np.cumsum(gaps, axis=1, out=gaps)


def _gaps(planes: list[np.ndarray], dtype: type) -> np.ndarray:
    """The gaps of uint8 ``planes`` (least significant first) as one ``dtype`` array, built in
    place: one array of the output's size is allocated (decoding is bound by fresh memory)."""
    gaps = planes[-1].astype(dtype)
    for plane in reversed(planes[:-1]):
        gaps <<= 8
        gaps |= plane
    return gaps


# ---------------------------------------------------------------------------- probabilities


def encode_logprobs(logprobs: np.ndarray, codec: Codec) -> np.ndarray:
    """Encode log-probabilities (any shape, float) with ``codec``."""
    logprobs = np.asarray(logprobs, dtype=np.float32)
    if codec in ("f32", "f16"):
        return logprobs.astype(_STORAGE[codec])
    qmax = QMAX[codec]
    with np.errstate(under="ignore"):
        root = np.exp(0.5 * logprobs.astype(np.float64))  # sqrt(p)
    codes = np.clip(np.rint(root * qmax), 1, qmax)
    codes[root == 0] = 0  # exactly zero mass (log p = -inf) stays exactly zero
    return codes.astype(_STORAGE[codec])


def decode_logprobs(stored: np.ndarray, codec: Codec) -> np.ndarray:
    """Decode stored values to float32 log-probabilities (not renormalized)."""
    if codec in ("f32", "f16"):
        return stored.astype(np.float32)
    with np.errstate(divide="ignore"):
        return (2.0 * np.log(stored.astype(np.float32) / np.float32(QMAX[codec]))).astype(
            np.float32
        )


def tail_logmass(logprobs: np.ndarray) -> np.ndarray:
    """log(1 − Σ exp(logprobs)) over the last axis, computed stably; -inf when the sum is ≥ 1."""
    lp = np.asarray(logprobs, dtype=np.float64)
    top = np.exp(lp).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log1p(-np.minimum(top, 1.0))
    return out.astype(np.float32)


def renormalize(logprobs: np.ndarray, tail: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shift (P, K) ``logprobs`` and (P,) ``tail`` so that each position's mass sums to one."""
    both = np.concatenate([logprobs, tail[:, None]], axis=1)
    peak = both.max(axis=1, keepdims=True)
    peak[~np.isfinite(peak)] = 0.0
    with np.errstate(divide="ignore"):
        lse = peak + np.log(np.exp(both - peak).sum(axis=1, keepdims=True))
    return (logprobs - lse).astype(np.float32), (tail - lse[:, 0]).astype(np.float32)


def error_bound(codec: Codec) -> str:
    """The documented per-value error bound of ``codec`` (before renormalization)."""
    return {
        "f32": "|Δ log p| ≤ 2^-24·|log p|",
        "f16": "|Δ log p| ≤ 2^-11·|log p| (and ≤ 6e-8 absolute near 0)",
        "u8": "|Δ sqrt p| ≤ 1/510 (p ≥ 3.9e-6); smaller p decode as 1.5e-5",
        "u16": "|Δ sqrt p| ≤ 1/131070 (p ≥ 5.8e-11); smaller p decode as 2.3e-10",
    }[codec]


# ---------------------------------------------------------------------------- id ranks

RANK_MIN_COUNT = 8
"""Ids stored fewer times than this in a shard are left out of its rank table and follow the
table's ids in id order: listing an id costs about 2 bytes, more than ranking a rare id saves.
On the fidelity study's datasets (12,096 positions a shard) 8 and 16 gave the smallest shards,
2 about 3% larger (docs/RESULTS.md)."""


def frequency_table(ids: np.ndarray, vocab_size: int, min_count: int | None = None) -> np.ndarray:
    """The ids stored at least ``min_count`` (default :data:`RANK_MIN_COUNT`) times in ``ids``
    (any shape), most frequent first, ties by ascending id: (T,) int32, the rank table of a
    shard (docs/FORMAT.md, "Id ranks")."""
    min_count = RANK_MIN_COUNT if min_count is None else min_count
    counts = np.bincount(np.asarray(ids, dtype=np.int64).reshape(-1), minlength=vocab_size)
    keep = np.flatnonzero(counts >= min_count)
    return keep[np.lexsort((keep, -counts[keep]))].astype(np.int32)


def ids_by_rank(table: np.ndarray, vocab_size: int) -> np.ndarray:
    """(V,) int32: the id of each rank. The table's ids first, then every other id ascending."""
    rest = np.ones(vocab_size, dtype=bool)
    rest[table] = False
    return np.concatenate([table, np.flatnonzero(rest)]).astype(np.int32)


def ranks_of_ids(table: np.ndarray, vocab_size: int) -> np.ndarray:
    """(V,) int32: the rank of each id, the inverse of :func:`ids_by_rank`."""
    by_rank = ids_by_rank(table, vocab_size)
    rank = np.empty(vocab_size, dtype=np.int32)
    rank[by_rank] = np.arange(vocab_size, dtype=np.int32)
    return rank


def pack_rank_table(table: np.ndarray) -> str:
    """A rank table as the shard metadata stores it: JSON ``{"count": T, "zstd": base64}``, the
    base64 of one zstd frame of the T ids as little-endian int32."""
    raw = np.asarray(table, dtype="<i4").tobytes()
    packed = zstandard.ZstdCompressor(level=3).compress(raw)  # 19: 15% smaller, 30x slower
    return json.dumps({"count": len(table), "zstd": base64.b64encode(packed).decode("ascii")})


@functools.lru_cache(maxsize=16)
def unpack_rank_table(value: bytes, vocab_size: int) -> np.ndarray:
    """(V,) int32 id of each rank from a shard's packed rank table (read-only, cached: every
    record batch of a shard carries the same one). Raises ValueError if it is malformed."""
    try:
        obj = json.loads(value)
        count, packed = obj["count"], base64.b64decode(obj["zstd"], validate=True)
        if not isinstance(count, int) or not 0 <= count <= vocab_size:
            raise ValueError(f"count {count!r} is not an id count in [0, {vocab_size}]")
        if zstandard.frame_content_size(packed) not in (-1, 4 * count):
            raise ValueError(f"its frame holds {zstandard.frame_content_size(packed)} bytes")
        raw = zstandard.ZstdDecompressor().decompress(packed, max_output_size=4 * count)
    except (ValueError, TypeError, KeyError, binascii.Error, zstandard.ZstdError) as e:
        raise ValueError(f"its id rank table does not decode ({e})") from None
    table = np.frombuffer(raw, dtype="<i4")
    if len(table) != count:
        raise ValueError(f"its id rank table holds {len(table)} ids, not {count}")
    if count and (table.min() < 0 or table.max() >= vocab_size):
        raise ValueError(f"its id rank table holds ids outside [0, {vocab_size})")
    if len(np.unique(table)) != count:
        raise ValueError("its id rank table lists an id twice")
    by_rank = ids_by_rank(table, vocab_size)
    by_rank.flags.writeable = False
    return by_rank


def ids_from_ranks(ranks: np.ndarray, by_rank: np.ndarray) -> np.ndarray:
    """The int32 id of each of ``ranks`` (any shape; a new array). Raises ValueError for a rank
    outside the table (a damaged shard)."""
    if ranks.size and (ranks.min() < 0 or ranks.max() >= len(by_rank)):
        raise ValueError(f"id ranks outside [0, {len(by_rank)})")
    return np.take(by_rank, ranks, mode="clip")  # in place (out=ranks) is ten times slower
