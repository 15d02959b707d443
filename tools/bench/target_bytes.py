"""Where the bytes of stored targets go, how fast they decode, and four ideas to spend fewer.

For each dataset given (written by `logitcache build` or the fidelity study), side by side in
one run:

* bytes/position by column group (token ids, top-k ids, top-k log-probs, tail mass, counts,
  tail draws), as zstd Arrow buffers;
* decode speed of the whole reader (:func:`~logitcache.cache.reader.decode_batch`) on one
  core, in M positions/s, the median of ``--repeats`` passes: with malloc's defaults, then
  as the training stream decodes (:func:`~logitcache.cache.reader.keep_freed_memory`);
* ideas measured on the same data, without changing the format: the response token stored as
  its rank in the position's top-k (it usually is the most likely id) instead of its id; a
  zstd dictionary trained on other record batches of the dataset for the id planes; and
  log-probs of low-mass ids (p < 1/64) kept to 6 of their 8 bits;
* and one idea that is now the format (version 3): the id planes with ids stored as
  themselves and as their rank in how often the shard stores them, every shard re-encoded
  both ways, plus the bytes of the rank tables.

    python -m logitcache.tools.bench.target_bytes DIR [DIR ...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from logitcache.cache.format import RANK_TABLE_KEYS
from logitcache.cache.reader import decode_batch, keep_freed_memory, list_values, open_dataset


def _zstd(arrays: list[np.ndarray], level: int = 1) -> int:
    """Bytes of the arrays as Arrow's zstd buffer compression stores them (level 1)."""
    import zstandard

    c = zstandard.ZstdCompressor(level=level)
    return sum(len(c.compress(np.ascontiguousarray(a).tobytes())) for a in arrays)


GROUPS = {
    "tokens": ("id", "prompt_ids", "response_ids"),
    "top-k ids": ("topk_id_",),
    "top-k log-probs": ("topk_logprobs",),
    "tail mass": ("tail_logmass",),
    "k per position": ("topk_count",),
    "tail draws": ("sample_",),
}


def column_bytes(batches: list[pa.RecordBatch]) -> dict[str, int]:
    """Compressed bytes of each column group over ``batches`` (values and offsets)."""
    out = dict.fromkeys(GROUPS, 0)
    for rb in batches:
        for name in rb.schema.names:
            group = next(g for g, pre in GROUPS.items() if name.startswith(pre))
            col = rb.column(name)
            bufs = [np.frombuffer(b, np.uint8) for b in col.buffers() if b is not None]
            out[group] += _zstd(bufs)
    return out


def decode_rate(batches: list[pa.RecordBatch], info, repeats: int) -> float:
    """M positions per CPU-second of decode_batch over ``batches``, the median of ``repeats``
    passes. CPU time of this thread, not wall time: on a shared machine the wall clock also
    counts the other processes' turns, and the reader runs on one core."""
    positions = sum(len(list_values(rb.column("response_ids"))[0]) for rb in batches)
    times = []
    for _ in range(repeats):
        t0 = time.thread_time()
        for rb in batches:
            decode_batch(rb, info)
        times.append(time.thread_time() - t0)
    return positions / float(np.median(times)) / 1e6


def response_rank_bytes(ds) -> tuple[int, int, float]:
    """(bytes of response_ids as stored, bytes as rank-in-top-k with ids of the misses,
    fraction of positions whose token is the top-1)."""
    as_ids, as_rank, top1, total = 0, 0, 0, 0
    for b in ds.iter_batches():
        if b.topk_logprobs is None or b.topk_ids is None:
            return 0, 0, 0.0
        order = np.argsort(-b.topk_logprobs, axis=1, kind="stable")  # most likely first
        ranked = np.take_along_axis(b.topk_ids, order, 1)
        hit = ranked == b.response_ids[:, None]  # (P, k)
        found = hit.any(1)
        rank = np.where(found, hit.argmax(1), 255).astype(np.uint8)
        misses = b.response_ids[~found].astype(np.uint16)
        as_ids += _zstd([b.response_ids.astype(np.uint16)])
        as_rank += _zstd([rank, misses])
        top1 += int((rank == 0).sum())
        total += len(rank)
    return as_ids, as_rank, top1 / max(total, 1)


def dictionary_bytes(batches: list[pa.RecordBatch]) -> tuple[int, int]:
    """(bytes of the second half of every id plane, the same with a zstd dictionary trained on
    the first halves): the dictionary never sees what it compresses."""
    import zstandard

    planes = [
        list_values(rb.column(n))[0].tobytes()
        for rb in batches
        for n in rb.schema.names
        if "_id_b" in n
    ]
    halves = [(p[: len(p) // 2], p[len(p) // 2 :]) for p in planes]
    samples = [a[j : j + 4096] for a, _ in halves for j in range(0, len(a), 4096)]
    if len(samples) < 8:
        return 0, 0
    d = zstandard.train_dictionary(16384, samples)
    c, cd = zstandard.ZstdCompressor(level=1), zstandard.ZstdCompressor(level=1, dict_data=d)
    plain = sum(len(c.compress(b)) for _, b in halves)
    return plain, sum(len(cd.compress(b)) for _, b in halves)


def id_rank_bytes(
    ds, repeats: int = 0
) -> tuple[dict[str, tuple[int, int]], int, tuple[float, ...]]:
    """Ids stored as themselves (format versions 1 and 2) against ids stored as their rank in
    the shard (the writer now), every shard re-encoded both ways
    (:func:`~logitcache.cache.writer.encode_shard`): ({"top-k ids" | "tail draws": (bytes as
    ids, bytes as ranks)} of the id planes as zstd buffers, bytes of the rank tables, and with
    ``repeats`` (encode as ids, encode as ranks, decode as ids, decode as ranks) in M
    positions/CPU-s: encodes the median of min(repeats, 5) passes, decodes as
    :func:`decode_rate`). The examples are given to the writer with ids ascending, as the
    capture hands them over."""
    from logitcache.cache.writer import encode_shard

    sizes: dict[bool, dict[str, int]] = {
        False: dict.fromkeys(GROUPS, 0),
        True: dict.fromkeys(GROUPS, 0),
    }
    batches: dict[bool, list[pa.RecordBatch]] = {False: [], True: []}
    encode_s = {False: 0.0, True: 0.0}
    tables = 0
    for i in range(len(ds.shards)):
        rows = [b.example(j).by_id() for b in ds.shard(i) for j in range(len(b))]
        for ranked, out in sizes.items():
            times = []
            for _ in range(max(1, min(repeats, 5))):
                t0 = time.thread_time()
                data, _ = encode_shard(ds.info, rows, 1024, id_ranks=ranked)
                times.append(time.thread_time() - t0)
            encode_s[ranked] += float(np.median(times))
            f = pa.ipc.open_file(pa.py_buffer(data))
            encoded = [f.get_batch(j) for j in range(f.num_record_batches)]
            batches[ranked] += encoded
            for g, n in column_bytes(encoded).items():
                out[g] += n
            if ranked:
                meta = f.schema.metadata or {}
                tables += sum(len(meta.get(k.encode(), b"")) for k in RANK_TABLE_KEYS.values())
    groups = ("top-k ids", "tail draws")
    by_group = {g: (sizes[False][g], sizes[True][g]) for g in groups if sizes[False][g]}
    if not repeats:
        return by_group, tables, ()
    P = ds.num_positions / 1e6
    rates = (P / encode_s[False], P / encode_s[True])
    rates += tuple(decode_rate(batches[r], ds.info, repeats) for r in (False, True))
    return by_group, tables, rates


def coarse_low_mass(batches: list[pa.RecordBatch]) -> tuple[int, int, float]:
    """(bytes of the u8 log-prob codes, bytes with codes of p < 1/64 rounded to multiples of 4,
    the largest |Δ√p| that costs): codes below 32 are the ids with p < (32/255)² ≈ 1/64."""
    plain = coarse = 0
    worst = 0.0
    for rb in batches:
        if "topk_logprobs" not in rb.schema.names:
            return 0, 0, 0.0
        codes = list_values(rb.column("topk_logprobs"))[0]
        if codes.dtype != np.uint8:
            return 0, 0, 0.0
        low = codes < 32
        c2 = codes.copy()
        c2[low] = np.clip(np.round(codes[low] / 4.0) * 4, 1, 31).astype(np.uint8)
        plain += _zstd([codes])
        coarse += _zstd([c2])
        if low.any():
            worst = max(worst, float(np.abs(c2[low].astype(int) - codes[low]).max()) / 255)
    return plain, coarse, worst


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m logitcache.tools.bench.target_bytes", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    ap.add_argument("datasets", nargs="+", help="dataset folders")
    ap.add_argument("--repeats", type=int, default=30, help="decode passes; the median is kept")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    ideas = []
    for d in args.datasets:
        ds = open_dataset(d)
        batches = [
            ds.shard(i).record_batch(j)
            for i in range(len(ds.shards))
            for j in range(ds.shard(i).num_batches)
        ]
        ideas.append((Path(d).name, ds, batches, ds.num_positions))
    # Decode speed with malloc's defaults first, then as the training stream decodes: with
    # freed memory kept for reuse (keep_freed_memory cannot be undone in a process).
    plain = [decode_rate(batches, ds.info, args.repeats) for _, ds, batches, _ in ideas]
    keep_freed_memory()
    kept = [decode_rate(batches, ds.info, args.repeats) for _, ds, batches, _ in ideas]
    print(
        "| dataset | targets | B/position | by column (B/position) | decode M pos/CPU-s, "
        "malloc defaults | as the stream decodes (freed memory kept) |\n|---|---|---|---|---|---|"
    )
    for (name, ds, batches, P), rate, rate_kept in zip(ideas, plain, kept, strict=True):
        groups = column_bytes(batches)
        parts = ", ".join(f"{g} {b / P:.1f}" for g, b in groups.items() if b)
        print(
            f"| {name} | {ds.info.targets.label} | {ds.manifest.num_bytes / P:.1f} | "
            f"{parts} | {rate:.2f} | {rate_kept:.2f} |"
        )
    print(
        "\n| dataset | response ids → rank in top-k | id planes with a trained zstd dictionary "
        "| low-mass log-probs at 6 bits | ids as themselves → as ranks in the shard (+ its tables), "
        "encoded and decoded (freed memory kept) |"
    )
    print("|---|---|---|---|---|")
    for name, ds, batches, P in ideas:
        ids_b, rank_b, top1 = response_rank_bytes(ds)
        rank_cell = (
            f"{ids_b / P:.2f} → {rank_b / P:.2f} B (top-1: {top1:.0%})" if ids_b else "no top-k"
        )
        plain, with_dict = dictionary_bytes(batches)
        lp, coarse, worst = coarse_low_mass(batches)
        half = P / 2  # the dictionary is measured on the second half of the positions
        dict_cell = f"{plain / half:.2f} → {with_dict / half:.2f} B" if plain else "too little data"
        lp_cell = f"{lp / P:.2f} → {coarse / P:.2f} B (|Δ√p| ≤ {worst:.4f})" if lp else "not u8"
        by_group, tables, (enc_ids, enc_ranks, as_ids, as_ranks) = id_rank_bytes(ds, args.repeats)
        freq_cell = "; ".join(f"{g} {a / P:.2f} → {b / P:.2f} B" for g, (a, b) in by_group.items())
        freq_cell += (
            f" (+ tables {tables / P:.2f} B); encode {enc_ids:.2f} → {enc_ranks:.2f}, "
            f"decode {as_ids:.2f} → {as_ranks:.2f} M/CPU-s"
        )
        print(f"| {name} | {rank_cell} | {dict_cell} | {lp_cell} | {freq_cell} |")


if __name__ == "__main__":
    main()
