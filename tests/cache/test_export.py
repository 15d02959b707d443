"""`logitcache export`: plain columns, read back with polars and DuckDB, equal to our reader."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from logitcache.cache.errors import InputError, ManifestError
from logitcache.cache.export import export_dataset
from logitcache.cache.reader import open_dataset
from logitcache.tools.cli import main

from .synth import make_examples, make_info


def _dataset(path, kind="topk", **kw):
    from logitcache.cache.writer import DatasetWriter

    info = make_info(kind, **kw)
    with DatasetWriter(path, info, shard_positions=60, batch_rows=4) as w:
        for ex in make_examples(info, 14, max_len=12):
            w.add(ex)
    return path


def _reader_rows(path):
    out = {}
    for ex in (e.by_id() for e in open_dataset(path).iter_examples()):  # export: ascending
        t = ex.targets
        draws = getattr(t, "tail_draws", t)
        row = {"prompt_ids": ex.prompt_ids.tolist(), "response_ids": ex.response_ids.tolist()}
        if hasattr(t, "logprobs"):
            row |= {"topk_ids": t.ids, "topk_logprobs": t.logprobs, "tail_logmass": t.tail_logmass}
        if draws is not None:
            off = np.concatenate([[0], np.cumsum(draws.nunique)])
            row["sample_ids"] = [draws.ids[a:b].tolist() for a, b in itertools.pairwise(off)]
            row["sample_counts"] = [draws.counts[a:b].tolist() for a, b in itertools.pairwise(off)]
        out[ex.id] = row
    return out


def _assert_same(exported: dict, native: dict) -> None:
    assert exported.keys() == native.keys()
    for key, row in native.items():
        got = exported[key]
        assert got["prompt_ids"] == row["prompt_ids"]
        assert got["response_ids"] == row["response_ids"]
        if "topk_ids" in row:
            P, k = row["topk_ids"].shape
            assert np.array(got["topk_ids"], dtype=np.int64).reshape(P, k).tolist() == (
                row["topk_ids"].tolist()
            )
            lp = np.array(got["topk_logprobs"], dtype=np.float32).reshape(P, k)
            assert lp.tobytes() == row["topk_logprobs"].astype(np.float32).tobytes()
            tail = np.array(got["tail_logmass"], dtype=np.float32)
            assert tail.tobytes() == row["tail_logmass"].astype(np.float32).tobytes()
        if "sample_ids" in row:
            assert got["sample_ids"] == row["sample_ids"]
            assert got["sample_counts"] == row["sample_counts"]


@pytest.mark.parametrize(
    "kind,kw",
    [("topk", {"codec": "u8", "tail_draws": 6}), ("topk", {"codec": "f16"}), ("sampled", {"n": 9})],
)
def test_export_parquet_read_by_polars_and_duckdb(tmp_path, kind, kw):
    import duckdb
    import polars as pl

    src = _dataset(tmp_path / "ds", kind, **kw)
    out = tmp_path / "export"
    assert main(["export", str(src), str(out), "--format", "parquet"]) == 0
    n_shards = len(open_dataset(src).shards)
    files = sorted(p.name for p in (out / "data").iterdir())
    assert n_shards > 1
    assert files == [f"train-{i:05d}-of-{n_shards:05d}.parquet" for i in range(n_shards)]
    native = _reader_rows(src)

    df = pl.read_parquet(out / "data" / "*.parquet")
    _assert_same({r["id"]: r for r in df.to_dicts()}, native)

    rel = duckdb.sql(f"SELECT * FROM read_parquet('{out}/data/*.parquet')")
    names = rel.columns
    _assert_same({r[0]: dict(zip(names, r, strict=True)) for r in rel.fetchall()}, native)

    meta = json.loads((out / "logitcache.json").read_text())
    assert meta["num_examples"] == len(native)
    assert meta["targets"]["kind"] == kind
    card = (out / "README.md").read_text()
    assert card.startswith("---\nconfigs:\n") and "path: data/train-*.parquet" in card


def test_export_arrow_read_by_polars(tmp_path):
    import polars as pl

    src = _dataset(tmp_path / "ds", "topk", codec="u16")
    out = tmp_path / "export"
    export_dataset(src, out, "arrow")
    frames = [pl.read_ipc_stream(p) for p in sorted((out / "data").glob("*.arrow"))]
    _assert_same({r["id"]: r for r in pl.concat(frames).to_dicts()}, _reader_rows(src))


def test_export_refuses_non_empty_out(tmp_path, capsys):
    src = _dataset(tmp_path / "ds")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(InputError, match=r"OUT .*out exists and is not empty \(old.txt\); give"):
        export_dataset(src, out)
    assert main(["export", str(src), str(out)]) == 1
    assert "give a new folder" in capsys.readouterr().err


def test_export_refuses_non_dataset(tmp_path):
    (tmp_path / "notads").mkdir()
    with pytest.raises(ManifestError, match=r"manifest.json not found; is this a logitcache"):
        export_dataset(tmp_path / "notads", tmp_path / "out")
    assert not (tmp_path / "out").exists()
