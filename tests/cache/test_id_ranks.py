"""Format version 3: ids stored as their rank in how often the shard stores them."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import zstandard

from logitcache.cache import codecs
from logitcache.cache.codecs import (
    frequency_table,
    ids_by_rank,
    ids_from_ranks,
    pack_rank_table,
    ranks_of_ids,
    unpack_rank_table,
)
from logitcache.cache.errors import ShardError
from logitcache.cache.format import RANK_TABLE_KEYS, Example, Sampled, TargetSpec, TopK
from logitcache.cache.manifest import finalize
from logitcache.cache.merge import merge_datasets
from logitcache.cache.reader import open_dataset
from logitcache.cache.storage import Location
from logitcache.cache.verify import verify_dataset
from logitcache.cache.writer import DatasetWriter, encode_shard

from .synth import make_info


def test_frequency_table_most_stored_first_ties_by_id_rare_ids_left_out() -> None:
    ids = np.array([7, 3, 7, 9, 3, 7, 5, 9, 1])  # 7: 3 times; 3 and 9: twice; 1 and 5: once
    assert frequency_table(ids, 10, min_count=2).tolist() == [7, 3, 9]
    assert frequency_table(ids, 10, min_count=1).tolist() == [7, 3, 9, 1, 5]
    assert frequency_table(ids, 10, min_count=4).tolist() == []


def test_ranks_and_ids_are_inverse_with_the_table_first() -> None:
    table = np.array([7, 3, 9], dtype=np.int32)
    by_rank = ids_by_rank(table, 10)
    assert by_rank.tolist() == [7, 3, 9, 0, 1, 2, 4, 5, 6, 8]  # then the others ascending
    rank = ranks_of_ids(table, 10)
    assert np.array_equal(by_rank[rank], np.arange(10))
    assert np.array_equal(ids_from_ranks(rank.copy(), by_rank), np.arange(10))


def _damaged(what: str) -> bytes:
    obj = json.loads(pack_rank_table(np.array([40000, 12])))
    return {
        "not JSON": b"{",
        "a count that is not the table's": json.dumps({**obj, "count": 3}).encode(),
        "not base64": json.dumps({**obj, "zstd": "@@@"}).encode(),
        "ids outside the vocabulary": pack_rank_table(np.array([70000])).encode(),
        "an id twice": pack_rank_table(np.array([5, 5])).encode(),
    }[what]


def test_packed_table_round_trips() -> None:
    table = np.array([40000, 12, 65535, 0], dtype=np.int32)
    by_rank = unpack_rank_table(pack_rank_table(table).encode(), 65536)
    assert by_rank[:4].tolist() == table.tolist() and len(by_rank) == 65536


@pytest.mark.parametrize(
    "what",
    ["not JSON", "a count that is not the table's", "not base64", "ids outside the vocabulary",
     "an id twice"],
)  # fmt: skip
def test_a_damaged_table_is_a_value_error(what: str) -> None:
    with pytest.raises(ValueError, match="id rank table"):
        unpack_rank_table(_damaged(what), 65536)


def test_ranks_outside_the_table_are_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"id ranks outside \[0, 4\)"):
        ids_from_ranks(np.array([0, 4], dtype=np.int32), np.arange(4, dtype=np.int32))


def popular_examples(n: int, vocab: int, seed: int = 0) -> list[Example]:
    """Top-4 + 4 tail draws from a handful of popular ids spread over the vocabulary, as real
    text puts most positions' mass on the same common tokens."""
    rng = np.random.default_rng(seed)
    popular = rng.choice(vocab, 24, replace=False)
    out = []
    for i in range(n):
        P = 12
        ids = np.stack([rng.choice(popular[:12], 4, replace=False) for _ in range(P)])
        lp = np.log(np.full((P, 4), 0.2, np.float32))
        drawn = [np.sort(rng.choice(popular[12:], 2, replace=False)) for _ in range(P)]
        draws = Sampled(np.concatenate(drawn), np.full(2 * P, 2), np.full(P, 2))
        tail = np.log(np.full(P, 0.2, np.float32))
        resp = rng.integers(0, vocab, P)
        out.append(Example(f"ex{i}", np.array([1]), resp, TopK(ids, lp, tail, draws)))
    return out


def test_shards_store_ranks_smaller_and_read_back_the_same_targets(tmp_path) -> None:
    info = make_info("topk", k=4, codec="f32", vocab=60000, tail_draws=4)
    examples = popular_examples(60, 60000)
    with DatasetWriter(tmp_path / "ds", info, batch_rows=16) as w:
        for ex in examples:
            w.add(ex)
    ds = open_dataset(tmp_path / "ds", verify=True)
    assert ds.manifest.format_version == 3
    meta = pa.ipc.open_file(tmp_path / "ds" / ds.shards[0].file).schema.metadata
    assert {RANK_TABLE_KEYS["topk"].encode(), RANK_TABLE_KEYS["sample"].encode()} <= set(meta)

    got = {e.id: e for e in ds.iter_examples()}
    for ex in examples:
        g, want = got[ex.id].by_id(), ex.by_id()
        assert np.array_equal(g.targets.ids, want.targets.ids)
        assert np.array_equal(g.targets.logprobs, want.targets.logprobs)
        assert np.array_equal(g.targets.tail_draws.ids, want.targets.tail_draws.ids)
        assert np.array_equal(g.targets.tail_draws.counts, want.targets.tail_draws.counts)
    # As stored, each position's ids run from the shard's most stored to its least.
    table = unpack_rank_table(meta[RANK_TABLE_KEYS["topk"].encode()], 60000)
    rank = np.argsort(table)
    first = got["ex0"].targets.ids
    assert np.all(np.diff(rank[first], axis=1) > 0)

    as_ids, _ = encode_shard(info, examples, 16, id_ranks=False)
    as_ranks, _ = encode_shard(info, examples, 16)
    assert len(as_ranks) < 0.9 * len(as_ids)
    assert not verify_dataset(tmp_path / "ds").problems


def test_a_damaged_rank_table_is_a_named_error_and_verify_reports_it(tmp_path, monkeypatch) -> None:
    info = make_info("topk", k=4, codec="f32", vocab=60000, tail_draws=4)
    monkeypatch.setattr(codecs, "RANK_MIN_COUNT", 1)
    with DatasetWriter(tmp_path / "ds", info) as w:
        for ex in popular_examples(5, 60000):
            w.add(ex)
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    shard = manifest["shards"][0]["file"]
    reader = pa.ipc.open_file(tmp_path / "ds" / shard)
    key = RANK_TABLE_KEYS["topk"].encode()
    schema = reader.schema.with_metadata(
        {**reader.schema.metadata, key: pack_rank_table(np.array([3, 3])).encode()}
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        for i in range(reader.num_record_batches):
            w.write_batch(pa.record_batch(reader.get_batch(i).columns, schema=schema))
    data = sink.getvalue().to_pybytes()
    (tmp_path / "ds" / shard).write_bytes(data)  # as a faulty writer would have written it
    manifest["shards"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(ShardError, match=rf"shard {shard} .*record batch 0 .*lists an id twice"):
        list(open_dataset(tmp_path / "ds", verify=True).iter_batches())
    problems = verify_dataset(tmp_path / "ds").problems
    assert any("lists an id twice" in p.found and p.where == shard for p in problems), problems


def test_adaptive_padding_of_any_value_is_written_with_ranks(tmp_path, monkeypatch) -> None:
    """Padding past a position's kept ids is never read: out-of-vocabulary values included."""
    monkeypatch.setattr(codecs, "RANK_MIN_COUNT", 1)  # so that the shard has a table
    info = replace(make_info("topk", k=4, codec="f32", vocab=300), targets=TargetSpec(
        "topk", k=4, codec="f32", k_mass=0.5))  # fmt: skip
    ids = np.array([[5, 9, 300, 2**31 - 1], [7, -1, -1, -1]])
    lp = np.log(np.array([[0.3, 0.3, 0.1, 0.1], [0.6, 0.1, 0.1, 0.1]], np.float32))
    lp[0, 2:] = lp[1, 1:] = -np.inf
    targets = TopK(ids, lp, np.log(np.array([0.4, 0.4], np.float32)), counts=np.array([2, 1]))
    with DatasetWriter(tmp_path / "ds", info) as w:
        w.add(Example("a", np.array([1]), np.array([5, 7]), targets))
    (got,) = open_dataset(tmp_path / "ds", verify=True).iter_examples()
    assert got.by_id().targets.ids.tolist() == [[5, 9, 0, 0], [7, 0, 0, 0]]


def test_a_table_claiming_more_than_the_vocabulary_is_refused_before_decompressing() -> None:
    packed = json.loads(pack_rank_table(np.array([1, 2])))
    for count in (float("inf"), 10**12, -1, "2"):
        value = json.dumps({**packed, "count": count}).encode()
        with pytest.raises(ValueError, match="is not an id count"):
            unpack_rank_table(value, 65536)
    huge = zstandard.ZstdCompressor().compress(bytes(4 * 1000))  # declares 4,000 bytes
    value = json.dumps({"count": 2, "zstd": base64.b64encode(huge).decode()}).encode()
    with pytest.raises(ValueError, match="its frame holds 4000 bytes"):
        unpack_rank_table(value, 65536)


def test_finalize_and_merge_keep_the_newest_input_version(tmp_path) -> None:
    old = Path(__file__).parents[1] / "data" / "format_v1" / "topk_u8_draws"
    shutil.copytree(old, tmp_path / "v1")
    finalize(Location(tmp_path / "v1"))  # nothing new: still the dataset it was
    assert json.loads((tmp_path / "v1" / "manifest.json").read_text())["format_version"] == 1
    merge_datasets(tmp_path / "m1", [tmp_path / "v1"])  # copies version-1 shards: version 1
    assert open_dataset(tmp_path / "m1").manifest.format_version == 1

    info = open_dataset(old).info
    with DatasetWriter(tmp_path / "v3", info, writer_id="new") as w:
        for ex in open_dataset(old).iter_examples():
            w.add(Example("new-" + ex.id, ex.prompt_ids, ex.response_ids, ex.targets))
    merge_datasets(tmp_path / "m3", [old, tmp_path / "v3"])
    merged = open_dataset(tmp_path / "m3", verify=True)
    assert (
        merged.manifest.format_version == 3
        and merged.num_examples == 2 * open_dataset(old).num_examples
    )


def test_by_id_takes_targets_built_with_other_dtypes() -> None:
    empty = Sampled(np.array([]), np.array([]), np.array([]))
    assert empty.by_id().ids.size == 0
    t = TopK(
        np.array([[3.0, 1.0]]), np.array([[-1.0, -2.0]]), np.array([-3.0]), counts=np.array([2.0])
    )
    assert t.by_id().ids.tolist() == [[1.0, 3.0]] and t.by_id().logprobs.tolist() == [[-2.0, -1.0]]
