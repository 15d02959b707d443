"""Damaged shards: every flipped bit is caught by verification, and never crashes a reader.

The full sweep (thousands of flips, the manifest too) is `python -m
logitcache.tools.reliability flips`; these tests run a fast sample of it (docs/RELIABILITY.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from logitcache.cache.errors import ShardError
from logitcache.cache.reader import open_dataset
from logitcache.cache.verify import verify_dataset
from logitcache.tools.reliability.flips import bit_regions, flip_trial, read_outcome
from logitcache.tools.synth import snapshot, synth_examples, synth_info, write_synth

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a child per flip")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], list]:
    ds = tmp_path_factory.mktemp("flips") / "ds"
    info = synth_info("topk", k=8, codec="u8")
    write_synth(ds, info, synth_examples(info, 30, seed=3), shard_positions=150)
    shards = [s["file"] for s in json.loads((ds / "manifest.json").read_text())["shards"]]
    assert len(shards) >= 3
    return ds, shards, snapshot(ds)


def _sample(ds: Path, shard: str, rng: np.random.Generator, random_bits: int) -> list[int]:
    data = (ds / shard).read_bytes()
    regions = bit_regions(data)
    picks = set(rng.choice(8 * len(data), random_bits, replace=False).tolist())
    picks |= set(regions["header"]) | set(regions["tail"])  # magic, footer length, magic
    picks |= set(rng.choice(list(regions["footer"]), 32, replace=False).tolist())
    return sorted(picks)


def test_every_flipped_bit_is_caught_by_verify_and_the_verifying_reader(dataset) -> None:
    ds, shards, reference = dataset
    rng = np.random.default_rng(0)
    trials = [(shards[0], b) for b in _sample(ds, shards[0], rng, 40)]
    trials += [(shards[1], b) for b in rng.choice(8 * (ds / shards[1]).stat().st_size, 40).tolist()]
    assert len(trials) > 250
    missed = [
        (s, b, r)
        for s, b in trials
        if (r := flip_trial(ds, s, b, reference, plain=False))["verify"] != "caught"
        or r["verified_read"] != "caught"
    ]
    assert missed == []
    assert snapshot(ds, verify=True) == reference  # every flip was undone


@needs_fork
def test_the_plain_reader_errors_or_misses_but_never_aborts(dataset) -> None:
    ds, shards, reference = dataset
    rng = np.random.default_rng(1)
    outcomes: Counter[str] = Counter()
    for shard in shards[:2]:
        data = (ds / shard).read_bytes()
        for bit in rng.choice(8 * len(data), 25, replace=False).tolist():
            outcomes[flip_trial(ds, shard, bit, reference)["plain"]] += 1
    # Only named errors, or data that decodes (wrong or not): no abort, no foreign exception.
    assert set(outcomes) <= {"error", "silent", "harmless"}, outcomes
    # Why `verify` exists: without the checksum some flips come back as wrong numbers.
    assert outcomes["silent"] > 0 and outcomes["error"] > 0, outcomes


def _replace_shard(ds: Path, shard: str, data: bytes) -> None:
    """Swap in other bytes and re-hash them, as a buggy writer (not the disk) would."""
    (ds / shard).write_bytes(data)
    m = json.loads((ds / "manifest.json").read_text())
    for s in m["shards"]:
        if s["file"] == shard:
            s.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (ds / "manifest.json").write_text(json.dumps(m))


def _rewrite(ds: Path, shard: str, edit) -> None:
    reader = pa.ipc.open_file(ds / shard)
    schema, batch = reader.schema, reader.get_batch(0)
    schema, batch = edit(schema, batch)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_batch(batch)
    _replace_shard(ds, shard, sink.getvalue().to_pybytes())


def _patch_offsets(ds: Path, shard: str, index: int, value: int) -> None:
    """Rewrite ``shard`` uncompressed, then overwrite one offset of prompt_ids in the file."""
    reader = pa.ipc.open_file(ds / shard)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, reader.schema) as w:  # no compression: buffers lie in the file
        w.write_batch(reader.get_batch(0))
    data = bytearray(sink.getvalue().to_pybytes())
    buf = pa.py_buffer(bytes(data))
    col = pa.ipc.open_file(buf).get_batch(0).column("prompt_ids")
    at = col.buffers()[1].address - buf.address  # the offsets buffer, read zero-copy
    offsets = np.frombuffer(bytes(data[at : at + 4 * (len(col) + 1)]), np.int32).copy()
    offsets[index] = value
    data[at : at + offsets.nbytes] = offsets.tobytes()
    _replace_shard(ds, shard, bytes(data))


@pytest.mark.parametrize(
    ("index", "value"),
    [(0, 2048), (-1, 1 << 20), (1, -5)],
    ids=["first-past-end", "last-past-end", "non-monotonic"],
)
def test_damaged_offsets_are_a_named_error_not_an_abort(tmp_path: Path, index, value) -> None:
    info = synth_info("topk", k=8)
    write_synth(tmp_path / "ds", info, synth_examples(info, 10), shard_positions=10_000)
    shard = json.loads((tmp_path / "ds" / "manifest.json").read_text())["shards"][0]["file"]
    _patch_offsets(tmp_path / "ds", shard, index, value)
    # In a child: unvalidated, the first case aborted the interpreter (SIGABRT inside Arrow)
    # and the second read past the end of the buffer without an error.
    code = (
        "import sys\n"
        "from logitcache.cache.reader import open_dataset\n"
        "from logitcache.cache.errors import ShardError\n"
        "try:\n"
        f"    list(open_dataset({str(tmp_path / 'ds')!r}, verify=True).iter_batches())\n"
        "except ShardError as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 3, (p.returncode, p.stderr[-2000:])
    assert f"shard {shard}" in p.stdout and "record batch 0 does not decode" in p.stdout


def test_unreadable_embedded_metadata_is_a_named_error(tmp_path: Path) -> None:
    info = synth_info("topk", k=8)
    write_synth(tmp_path / "ds", info, synth_examples(info, 10), shard_positions=10_000)
    shard = json.loads((tmp_path / "ds" / "manifest.json").read_text())["shards"][0]["file"]

    def bad_metadata(schema: pa.Schema, batch: pa.RecordBatch):
        meta = {**schema.metadata, b"logitcache.info": b'{"tokenizer": \xff'}
        schema = schema.with_metadata(meta)
        return schema, pa.record_batch(batch.columns, schema=schema)

    _rewrite(tmp_path / "ds", shard, bad_metadata)
    with pytest.raises(ShardError, match=rf"{shard}.*embedded metadata is not valid JSON"):
        list(open_dataset(tmp_path / "ds", verify=True).iter_batches())


def test_truncation_is_caught_even_when_the_manifest_is_edited_to_match(dataset, tmp_path) -> None:
    ds, shards, reference = dataset
    copy = tmp_path / "ds"
    copy.mkdir()
    for f in ds.iterdir():
        if f.is_file():
            (copy / f.name).write_bytes(f.read_bytes())
    original = (copy / shards[1]).read_bytes()
    manifest = (copy / "manifest.json").read_text()
    rng = np.random.default_rng(2)
    for cut in sorted(rng.choice(len(original), 25, replace=False).tolist()):
        (copy / shards[1]).write_bytes(original[:cut])
        assert read_outcome(copy, reference, verify=False) == "error"  # size differs
        m = json.loads(manifest)
        m["shards"][1]["bytes"] = cut
        (copy / "manifest.json").write_text(json.dumps(m))
        # Sizes agree now: the Arrow file format's footer still refuses a cut file.
        assert read_outcome(copy, reference, verify=False) == "error", cut
        assert [p.field for p in verify_dataset(copy).problems] == ["sha256"]
        (copy / "manifest.json").write_text(manifest)


def test_verify_a_clean_sampled_dataset(tmp_path: Path) -> None:
    info = synth_info("sampled", n=16)
    write_synth(tmp_path / "ds", info, synth_examples(info, 20), shard_positions=100)
    report = verify_dataset(tmp_path / "ds")
    assert report.ok and report.examples == 20
