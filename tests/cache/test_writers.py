"""Several writers into one dataset, crash recovery of a writer, and finalize."""

from __future__ import annotations

import json
import multiprocessing as mp

import pytest

from logitcache.cache.format import PARTS_DIR
from logitcache.cache.manifest import finalize
from logitcache.cache.reader import committed_ids, open_dataset
from logitcache.cache.storage import Location
from logitcache.cache.writer import DatasetWriter

from .synth import make_examples, make_info


def _rank(path, rank: int) -> None:
    info = make_info("topk", k=8)
    w = DatasetWriter(path, info, writer_id=f"r{rank:05d}", shard_positions=50)
    for ex in make_examples(info, 20, seed=rank, prefix=f"r{rank}-"):
        w.add(ex)
    w.close(finalize_dataset=False)


def test_concurrent_writers_then_finalize(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(tmp_path / "ds", r)) for r in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    m = finalize(Location(tmp_path / "ds"))
    assert m.num_examples == 60
    ds = open_dataset(tmp_path / "ds", verify=True)
    ids = [e.id for e in ds.iter_examples()]
    assert sorted(ids) == sorted(f"r{r}-{i}" for r in range(3) for i in range(20))
    assert finalize(Location(tmp_path / "ds")).to_json()["shards"] == m.to_json()["shards"]


def test_crashed_writer_keeps_committed_and_resumes(tmp_path):
    info = make_info("topk", k=8)
    examples = make_examples(info, 30)
    w = DatasetWriter(tmp_path / "ds", info, shard_positions=60)
    for ex in examples[:20]:
        w.add(ex)
    committed = committed_ids(tmp_path / "ds")
    assert 0 < len(committed) < 20  # some shards committed, the rest still buffered
    del w  # crash: no close, no finalize
    (tmp_path / "ds" / ".tmp-w0-leftover").write_bytes(b"partial")
    w = DatasetWriter(tmp_path / "ds", info, shard_positions=60)
    assert not (tmp_path / "ds" / ".tmp-w0-leftover").exists()
    for ex in examples:
        if ex.id not in committed:
            w.add(ex)
    w.close()
    ds = open_dataset(tmp_path / "ds", verify=True)
    assert sorted(e.id for e in ds.iter_examples()) == sorted(e.id for e in examples)


def test_a_journal_says_whether_its_writer_finished(tmp_path):
    """Committed shards alone do not make a dataset: finalize refuses a journal whose writer
    stopped early, naming it, its examples and the fix, unless asked for a partial one."""
    from logitcache.cache.errors import ManifestError

    info = make_info("topk", k=8)
    ds, journal = tmp_path / "ds", tmp_path / "ds" / PARTS_DIR / "w0.json"
    w = DatasetWriter(ds, info, shard_positions=50)
    for ex in make_examples(info, 20):
        w.add(ex)
    assert json.loads(journal.read_text())["finished"] is False
    del w  # crash: no close
    held = len(committed_ids(ds))
    with pytest.raises(ManifestError) as e:
        finalize(Location(ds))
    assert (
        f"_parts/w0.json holds {held} examples but its writer has not finished its share (it "
        f"was interrupted, or is still running); reopen DatasetWriter({str(ds)!r}, info, "
        f"writer_id='w0'), add the examples it lacks and close() it; or run `logitcache "
        f"finalize {ds} --partial` to publish the {held} examples committed so far"
    ) in str(e.value)
    with pytest.raises(ManifestError, match=r"manifest.json not found; the dataset is not final"):
        open_dataset(ds)
    assert not (ds / "manifest.json").exists()
    assert finalize(Location(ds), partial=True).num_examples == held

    w = DatasetWriter(ds, info)  # reopened: unfinished again until closed
    assert json.loads(journal.read_text())["finished"] is False
    w.close(finalize_dataset=False)
    assert json.loads(journal.read_text())["finished"] is True
    assert finalize(Location(ds)).num_examples == held


def test_an_unfinished_import_says_to_import_again_into_a_new_folder(tmp_path):
    from dataclasses import replace

    from logitcache.cache.errors import ManifestError

    info = make_info("topk", k=8)
    info = replace(info, capture={**info.capture, "imported": {"sources": ["rows.parquet"]}})
    w = DatasetWriter(tmp_path / "ds", info, writer_id="import")
    for ex in make_examples(info, 3):
        w.add(ex)
    w.flush()  # committed; the import then dies
    with pytest.raises(
        ManifestError,
        match=r"_parts/import.json holds 3 examples .* rerun the `logitcache import` command "
        r"with a new output folder; or run `logitcache finalize .*ds --partial`",
    ):
        finalize(Location(tmp_path / "ds"))


def test_a_journal_of_an_older_version_without_the_marker_finalizes(tmp_path):
    info = make_info("topk", k=8)
    w = DatasetWriter(tmp_path / "ds", info, shard_positions=50)
    for ex in make_examples(info, 20):
        w.add(ex)
    journal = tmp_path / "ds" / PARTS_DIR / "w0.json"
    old = json.loads(journal.read_text())
    del old["finished"]  # written before journals said whether their writer finished
    journal.write_text(json.dumps(old))
    assert finalize(Location(tmp_path / "ds")).num_examples == old["num_examples"]


def test_finalize_with_nothing(tmp_path):
    from logitcache.cache.errors import ManifestError

    with pytest.raises(ManifestError, match=r"nothing to finalize"):
        finalize(Location(tmp_path))


def test_journal_per_writer(tmp_path):
    info = make_info("sampled", n=8)
    for r in range(2):
        w = DatasetWriter(tmp_path / "ds", info, writer_id=f"r{r}")
        for ex in make_examples(info, 3, prefix=f"{r}-"):
            w.add(ex)
        w.close(finalize_dataset=False)
    assert sorted(p.name for p in (tmp_path / "ds" / PARTS_DIR).iterdir()) == ["r0.json", "r1.json"]


def test_finalize_removes_the_temp_file_of_a_killed_finalize(tmp_path):
    _rank(tmp_path / "ds", 0)
    # A finalize killed between writing its temp file and renaming it leaves the temp behind;
    # a writer's in-flight shard temp (another process, still running) must stay.
    killed = tmp_path / "ds" / ".tmp.manifest-k1ll3d"
    killed.write_bytes(b'{"half": ')
    writing = tmp_path / "ds" / ".tmp-r00001-abc"
    writing.write_bytes(b"shard bytes in flight")
    finalize(Location(tmp_path / "ds"))
    assert not killed.exists() and writing.exists()
    assert open_dataset(tmp_path / "ds", verify=True).num_examples == 20
