"""Single-bit flips in shards and the manifest: what `verify` and the reader catch."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from logitcache.cache.errors import LogitCacheError
from logitcache.cache.reader import open_dataset
from logitcache.cache.verify import verify_dataset

from ..synth import snapshot, synth_examples, synth_info, write_synth

# --------------------------------------------------------------------------- bit flips


def read_outcome(url: str | Path, reference: list[tuple[Any, ...]], *, verify: bool) -> str:
    """How reading a damaged dataset ends: ``error`` (a named LogitCacheError), ``silent``
    (wrong data, no error), ``harmless`` (the same data) or ``foreign:<Type>`` (another error)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy casts of garbage
            got = snapshot(url, verify=verify)
    except LogitCacheError:
        return "error"
    except Exception as e:
        return f"foreign:{type(e).__name__}"
    return "harmless" if got == reference else "silent"


def in_child(fn: Callable[[], str]) -> str:
    """Run ``fn`` in a forked child: an abort inside Arrow kills the child, not the caller."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            result = fn()
        except BaseException as e:
            result = f"foreign:{type(e).__name__}"
        os.write(w, result.encode())
        os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        result = f.read().decode()
    return result or f"abort:signal {os.WTERMSIG(status) if os.WIFSIGNALED(status) else status}"


@contextmanager
def flipped(path: Path, bit: int) -> Iterator[None]:
    """The file at ``path`` with one bit flipped, restored afterwards."""
    original = path.read_bytes()
    data = bytearray(original)
    data[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))
    try:
        yield
    finally:
        path.write_bytes(original)


def bit_regions(data: bytes) -> dict[str, range]:
    """Bits of an Arrow IPC file: its header (magic + padding) and its footer (schema, block
    index, footer length, magic), the parts whose damage is most likely to abort a reader."""
    footer_len = int.from_bytes(data[-10:-6], "little")
    start = len(data) - 10 - footer_len
    return {
        "header": range(0, 64),
        "footer": range(8 * start, 8 * len(data)),
        "tail": range(8 * (len(data) - 10), 8 * len(data)),
    }


def flip_trial(
    ds: Path,
    shard: str,
    bit: int,
    reference: list[tuple[Any, ...]],
    *,
    plain: bool = True,
    fork: bool = True,
) -> dict[str, Any]:
    """Flip one bit of one shard; what verify, the verified reader and the plain reader say."""
    with flipped(ds / shard, bit):
        try:
            report = verify_dataset(ds)
            hit = any(p.where == shard and p.field == "sha256" for p in report.problems)
            by_verify = "caught" if hit else "missed"
        except Exception as e:  # a bug in verify, reported as such
            by_verify = f"verify raised {type(e).__name__}"
        try:
            snapshot(ds, verify=True)
            by_reader = "missed"
        except LogitCacheError as e:
            by_reader = "caught" if shard in str(e) and "sha256" in str(e) else "other error"
        out = {"shard": shard, "bit": bit, "verify": by_verify, "verified_read": by_reader}
        if plain:
            go = lambda: read_outcome(ds, reference, verify=False)  # noqa: E731
            out["plain"] = in_child(go) if fork else go()
    return out


def manifest_flip_outcome(ds: Path, reference: list[tuple[Any, ...]]) -> str:
    """What a flipped bit of manifest.json leads to (run with the bit flipped)."""
    try:
        open_dataset(ds)
    except LogitCacheError:
        return "refused at open"
    plain = in_child(lambda: read_outcome(ds, reference, verify=False))
    if plain == "error":
        return "error on read"
    if not verify_dataset(ds).ok:
        return f"caught by verify (plain read: {plain})"
    return f"undetected (plain read: {plain})"


def manifest_field_at(data: bytes, byte: int) -> str:
    """The field of an indented manifest.json that holds ``byte``, e.g.
    ``teacher.name_or_path (value)`` or ``shards[].rows (key)``."""
    lines = data.decode().splitlines(keepends=True)
    starts = np.cumsum([0] + [len(line.encode()) for line in lines])
    i = int(np.searchsorted(starts, byte, side="right")) - 1
    pattern = re.compile(r'^(\s*)"([^"]*)"\s*:')
    m = pattern.match(lines[i])
    if m is None:
        return "(punctuation)"
    part = "key" if byte - starts[i] < m.end() else "value"
    path, indent = [m.group(2)], len(m.group(1))
    for line in reversed(lines[:i]):
        d = len(line) - len(line.lstrip())
        if d >= indent:
            continue
        indent = d
        parent = pattern.match(line)
        if parent is not None:
            path.insert(0, parent.group(2) + ("[]" if line.rstrip().endswith("[") else ""))
    return f"{'.'.join(path)} ({part})"


def shard_sweep(
    ds: Path,
    reference: list[tuple[Any, ...]],
    args: argparse.Namespace,
    rng: np.random.Generator,
    every_footer_bit: bool,
) -> None:
    shards = [s["file"] for s in json.loads((ds / "manifest.json").read_text())["shards"]]
    results: list[dict[str, Any]] = []
    for shard in shards[: args.shards]:
        data = (ds / shard).read_bytes()
        regions = bit_regions(data)
        picks = [("random", int(b)) for b in rng.choice(8 * len(data), args.flips, replace=False)]
        if shard == shards[0]:  # one shard's header, and its footer (all or a sample)
            picks += [("header", b) for b in regions["header"]]
            footer = list(regions["footer"])
            if not every_footer_bit:
                footer = sorted(rng.choice(footer, min(args.flips, len(footer)), replace=False))
            picks += [("footer", int(b)) for b in footer]
        results += [
            {**flip_trial(ds, shard, bit, reference), "region": region} for region, bit in picks
        ]
    sizes = [(ds / s).stat().st_size for s in shards]
    print(
        f"\n{ds.name}: {len(shards)} shards of {min(sizes)}-{max(sizes)} bytes, "
        f"{len(results)} single-bit flips"
    )
    for region in ("random", "header", "footer"):
        rs = [r for r in results if r["region"] == region]
        plain = Counter(r["plain"] for r in rs)
        print(
            f"  {region:7s} {len(rs):5d} flips: verify {dict(Counter(r['verify'] for r in rs))}, "
            f"reader(verify=True) {dict(Counter(r['verified_read'] for r in rs))}; plain "
            f"reader: {dict(plain)}; silently wrong data {plain['silent']} "
            f"({100 * plain['silent'] / len(rs):.1f}%), named error {plain['error']} "
            f"({100 * plain['error'] / len(rs):.1f}%)"
        )


def manifest_sweep(
    ds: Path, reference: list[tuple[Any, ...]], flips: int, rng: np.random.Generator
) -> None:
    mf = ds / "manifest.json"
    data = mf.read_bytes()
    bits = rng.choice(8 * len(data), min(flips, 8 * len(data)), replace=False)
    outcomes: Counter[str] = Counter()
    undetected: Counter[str] = Counter()
    for bit in bits:
        with flipped(mf, int(bit)):
            o = manifest_flip_outcome(ds, reference)
        if o.startswith("undetected"):
            undetected[manifest_field_at(data, int(bit) // 8)] += 1
        outcomes[o] += 1
    print(f"\n{ds.name}/manifest.json ({len(data)} bytes), {len(bits)} single-bit flips:")
    for o, n in outcomes.most_common():
        print(f"  {n:5d} {o}")
    print("  undetected flips by field:")
    for field, n in undetected.most_common():
        print(f"    {n:4d} {field}")


def cmd_flips(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed)
    root = Path(tempfile.mkdtemp(prefix="lc-flips-"))
    try:
        for kind, codec in (("topk", "u8"), ("topk", "f16"), ("sampled", "u8")):
            first = kind == "topk" and codec == "u8"
            if args.manifest_only and not first:
                continue
            info = synth_info(kind, codec=codec)
            ds = root / f"{kind}-{codec}"
            examples = synth_examples(info, args.examples, seed=args.seed)
            write_synth(ds, info, examples, shard_positions=args.shard_positions)
            reference = snapshot(ds)
            if not args.manifest_only:
                shard_sweep(
                    ds, reference, args, rng, every_footer_bit=first and args.all_footer_bits
                )
            if first and args.manifest_flips:
                manifest_sweep(
                    ds, reference, args.manifest_flips, np.random.default_rng([args.seed, 1])
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
