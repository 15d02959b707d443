"""Bad datasets are named errors: truncated, flipped, missing, edited, unknown, escaping."""

from __future__ import annotations

import json

import pytest

from logitcache.cache.errors import IncompatibleError, ManifestError, ShardError
from logitcache.cache.manifest import finalize
from logitcache.cache.reader import open_dataset
from logitcache.cache.storage import Location
from logitcache.cache.verify import verify_dataset
from logitcache.cache.writer import DatasetWriter

from .synth import make_examples, make_info


@pytest.fixture
def dataset(tmp_path):
    info = make_info("topk", k=8)
    with DatasetWriter(tmp_path / "ds", info, shard_positions=100) as w:
        for ex in make_examples(info, 20):
            w.add(ex)
    return tmp_path / "ds"


def _first_shard(ds):
    return ds / json.loads((ds / "manifest.json").read_text())["shards"][0]["file"]


def _edit_manifest(ds, fn):
    m = json.loads((ds / "manifest.json").read_text())
    fn(m)
    (ds / "manifest.json").write_text(json.dumps(m))


def test_truncated_shard(dataset):
    shard = _first_shard(dataset)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ShardError, match=r"shard-w0-000000\.arrow.*truncated"):
        list(open_dataset(dataset).iter_batches())
    report = verify_dataset(dataset)
    assert any(p.field == "bytes" and p.where == shard.name for p in report.problems)


def test_flipped_bit_caught_by_checksum(dataset):
    shard = _first_shard(dataset)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"sha256 .* does not match.*corrupt"):
        list(open_dataset(dataset, verify=True).iter_batches())
    report = verify_dataset(dataset)
    assert [p.field for p in report.problems] == ["sha256"]
    assert report.problems[0].where == shard.name


def test_missing_shard(dataset):
    shard = _first_shard(dataset)
    shard.unlink()
    # A build rerun into the folder stops at the missing shard again: the advice says what works.
    with pytest.raises(
        ShardError,
        match=r"missing from storage; restore the shard from a copy of the dataset, or write "
        r"the data again into a new folder \(rerunning the build into .*/ds does not replace it\)",
    ):
        list(open_dataset(dataset).iter_batches())
    assert [(p.field, p.found) for p in verify_dataset(dataset).problems] == [("file", "missing")]


def test_a_damaged_batch_names_the_verify_command_with_the_dataset(dataset):
    shard = _first_shard(dataset)
    import pyarrow as pa

    class Damaged:  # a batch whose bytes do not decode, as a damaged shard's
        def get_batch(self, i):
            raise pa.ArrowInvalid("bad offsets")

    reader = open_dataset(dataset).shard(0)
    reader._reader = Damaged()
    with pytest.raises(ShardError) as e:
        reader.record_batch(0)
    assert f"run `logitcache verify {dataset}` to list every damaged shard, then restore" in str(
        e.value
    )
    assert shard.name in str(e.value)


def test_manifest_out_of_step(dataset):
    _edit_manifest(dataset, lambda m: m.update(num_examples=m["num_examples"] + 1))
    with pytest.raises(ManifestError, match=r"num_examples is 21 but its shards add up to 20"):
        open_dataset(dataset)


def test_manifest_rows_edited(dataset):
    def edit(m):
        m["shards"][0]["rows"] += 1
        m["num_examples"] += 1

    _edit_manifest(dataset, edit)
    report = verify_dataset(dataset)
    assert any(p.field == "rows" for p in report.problems)


def test_unknown_format_version(dataset):
    _edit_manifest(dataset, lambda m: m.update(format_version=99))
    with pytest.raises(
        ManifestError, match=r"format_version is 99 .* reads versions 1, 2 and 3; upgrade"
    ):
        open_dataset(dataset)


@pytest.mark.parametrize(
    "bad",
    [
        "../outside.arrow",
        "/etc/passwd",
        "sub/shard-w0-000000.arrow",
        "shard-w0-000000.arrow/../../x",
    ],
)
def test_manifest_path_escaping_folder(dataset, bad):
    _edit_manifest(dataset, lambda m: m["shards"][0].update(file=bad))
    with pytest.raises(ManifestError, match=r"not a plain shard name.*may not point outside"):
        open_dataset(dataset)


def test_unknown_sampling_scheme_in_manifest(dataset):
    _edit_manifest(dataset, lambda m: m["targets"].update(sampling="stratified"))
    with pytest.raises(ManifestError, match=r"targets.sampling is 'stratified'; expected one of"):
        open_dataset(dataset)


def test_manifest_not_json(dataset):
    (dataset / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match=r"manifest.json: not valid JSON"):
        open_dataset(dataset)


def test_missing_manifest_names_finalize(tmp_path):
    info = make_info("topk")
    w = DatasetWriter(tmp_path / "ds", info, writer_id="r0")
    for ex in make_examples(info, 3):
        w.add(ex)
    w.close(finalize_dataset=False)
    with pytest.raises(ManifestError, match=r"manifest.json not found.*logitcache finalize"):
        open_dataset(tmp_path / "ds")
    finalize(Location(tmp_path / "ds"))
    assert open_dataset(tmp_path / "ds").num_examples == 3


def test_not_a_dataset(tmp_path):
    with pytest.raises(ManifestError, match=r"not found; is this a logitcache dataset folder"):
        open_dataset(tmp_path)


def test_a_file_given_as_a_dataset_is_named_at_once(tmp_path):
    (tmp_path / "score.jsonl").write_text("{}\n")
    with pytest.raises(ManifestError, match=r"score.jsonl is a file, not a dataset folder: give"):
        open_dataset(tmp_path / "score.jsonl")
    report = verify_dataset(tmp_path / "score.jsonl")  # reported, not retried as a failing disk
    assert "is a file, not a dataset folder" in report.problems[0].found


def test_writer_refuses_other_dataset_in_folder(dataset):
    other = make_info("topk", k=4)
    with pytest.raises(IncompatibleError, match=r"targets top-8 u8 vs top-4 u8.*write to a new"):
        DatasetWriter(dataset, other)


def test_writer_rejects_bad_example(tmp_path):
    info = make_info("topk", k=8)
    ex = make_examples(info, 1, seed=5, max_len=10)[0]
    ex.response_ids = ex.response_ids.copy()
    ex.response_ids[...] = info.vocab_size
    with (
        DatasetWriter(tmp_path / "ds", info) as w,
        pytest.raises(
            ValueError, match=r"example 'ex0': response_ids holds ids outside \[0, 1000\)"
        ),
    ):
        w.add(ex)


def test_shard_schema_mismatch(dataset):
    _edit_manifest(dataset, lambda m: m["targets"].update(codec="f16"))
    with pytest.raises(ShardError, match=r"schema does not match the manifest's target spec"):
        list(open_dataset(dataset).iter_batches())


def test_shard_metadata_mismatch(dataset):
    _edit_manifest(dataset, lambda m: m["targets"].update(k=4))
    with pytest.raises(ShardError, match=r"embedded metadata names another dataset"):
        list(open_dataset(dataset).iter_batches())
