"""`logitcache import`: the plain top-k layout in; export → import gives the same targets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from logitcache.cache.errors import InputError
from logitcache.cache.importer import ImportConfig, ImportRunConfig, import_plain
from logitcache.cache.reader import open_dataset
from logitcache.cache.writer import DatasetWriter
from logitcache.tools.cli import main

from .synth import make_examples, make_info


def _export(tmp_path, codec, fmt="parquet"):
    info = make_info("topk", codec=codec, vocab=384)
    with DatasetWriter(tmp_path / "ds", info, shard_positions=60) as w:
        examples = make_examples(info, 40, max_len=10)
        assert any(ex.num_positions == 0 for ex in examples)  # kept by the round trip too
        for ex in examples:
            w.add(ex)
    exp = str(tmp_path / "exp")
    assert main(["export", str(tmp_path / "ds"), exp, "--format", fmt]) == 0
    return tmp_path / "ds", str(tmp_path / "exp" / "data" / f"*.{fmt}")


def _targets(path):
    return {ex.id: ex.by_id() for ex in open_dataset(path).iter_examples()}


def test_round_trip_f32_is_exact(tmp_path, tiny_tokenizer_dir, capsys):
    src, files = _export(tmp_path, "f32")
    out = tmp_path / "back"
    argv = ["import", files, str(out), "--tokenizer", str(tiny_tokenizer_dir), "--codec", "f32"]
    assert main([*argv, "--tail-column", "tail_logmass"]) == 0
    assert "imported 40 examples" in capsys.readouterr().out
    a, b = _targets(src), _targets(out)
    assert a.keys() == b.keys()
    for key, ex in a.items():
        got = b[key]
        assert np.array_equal(got.prompt_ids, ex.prompt_ids)
        assert np.array_equal(got.response_ids, ex.response_ids)
        assert np.array_equal(got.targets.ids, ex.targets.ids)
        assert got.targets.logprobs.tobytes() == ex.targets.logprobs.tobytes()
        assert got.targets.tail_logmass.tobytes() == ex.targets.tail_logmass.tobytes()
    # Without the tail column, the tail is 1 − Σ p of the log-probs.
    assert main([*argv[:2], str(tmp_path / "computed"), *argv[3:]]) == 0
    for key, ex in _targets(tmp_path / "computed").items():
        want = np.exp(a[key].targets.tail_logmass.astype(np.float64))
        assert (
            np.abs(np.exp(ex.targets.tail_logmass.astype(np.float64)) - want).max(initial=0) < 1e-6
        )


def test_round_trip_through_arrow_files(tmp_path, tiny_tokenizer_dir):
    src, files = _export(tmp_path, "f32", fmt="arrow")
    out = tmp_path / "back"
    argv = ["import", files, str(out), "--tokenizer", str(tiny_tokenizer_dir), "--codec", "f32"]
    assert main([*argv, "--tail-column", "tail_logmass"]) == 0
    a, b = _targets(src), _targets(out)
    assert a.keys() == b.keys()
    for key, ex in a.items():
        assert np.array_equal(b[key].targets.ids, ex.targets.ids)
        assert b[key].targets.logprobs.tobytes() == ex.targets.logprobs.tobytes()


def test_a_damaged_arrow_file_is_named(tmp_path, tiny_tokenizer_dir, capsys):
    _, files = _export(tmp_path, "f32", fmt="arrow")
    first = sorted((tmp_path / "exp" / "data").glob("*.arrow"))[0]
    first.write_bytes(first.read_bytes()[:200])
    out = tmp_path / "back"
    assert main(["import", files, str(out), "--tokenizer", str(tiny_tokenizer_dir)]) == 1
    err = capsys.readouterr().err
    assert str(first) in err and "Arrow IPC file" in err


def test_a_missing_tokenizer_folder_or_a_file_as_out_is_refused(
    tmp_path, tiny_tokenizer_dir, capsys
):
    _, files = _export(tmp_path, "f32")
    assert main(["import", files, str(tmp_path / "back"), "--tokenizer", "nope"]) == 1
    assert "--tokenizer nope: no such folder; pass the folder of the tokenizer" in (
        capsys.readouterr().err
    )
    (tmp_path / "f.json").write_text("{}")
    assert main(["import", files, str(tmp_path / "f.json"), "--tokenizer", "nope"]) == 1
    assert f"OUT {tmp_path / 'f.json'} is an existing file, not a folder" in capsys.readouterr().err


def test_round_trip_u8_within_the_codec_bound(tmp_path, tiny_tokenizer_dir):
    src, files = _export(tmp_path, "u8")
    out = tmp_path / "back"
    assert main(["import", files, str(out), "--tokenizer", str(tiny_tokenizer_dir)]) == 0
    a, b = _targets(src), _targets(out)
    worst = 0.0
    for key, ex in a.items():
        got = b[key]
        assert np.array_equal(got.targets.ids, ex.targets.ids)
        for x, y in ((got.targets.logprobs, ex.targets.logprobs),
                     (got.targets.tail_logmass, ex.targets.tail_logmass)):  # fmt: skip
            worst = max(worst, float(np.abs(np.exp(x / 2) - np.exp(y / 2)).max(initial=0)))
    assert worst <= 0.0080  # docs/FORMAT.md: u8, k = 8, |√p̃ − √p| after renormalizing


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _logit_rows():
    good = {"input_ids": [5, 6, 7, 8], "tok": [[7, 9], [8, 1]], "lg": [[2.0, 0.0], [1.0, 1.0]]}
    return [
        {"id": "a", **good},
        {"id": "b", **good, "tok": [[7, 999], [8, 1]]},  # id outside the vocabulary
        {"id": "c", **good, "lg": [[2.0], [1.0, 1.0]]},  # a position with one value
        {"id": "d", **good, "input_ids": [5, 6]},  # targets for every token: no prompt
        {"id": "a", **good},  # the id again
    ]


LOGIT_FLAGS = ["--input-ids-column", "input_ids", "--ids-column", "tok"]
LOGIT_FLAGS += ["--values-column", "lg", "--values", "logits"]


def test_bad_rows_are_named_with_file_and_line(tmp_path, tiny_tokenizer_dir, capsys):
    src = _jsonl(tmp_path / "logits.jsonl", _logit_rows())
    out = tmp_path / "out"
    assert (
        main(["import", src, str(out), "--tokenizer", str(tiny_tokenizer_dir), *LOGIT_FLAGS]) == 1
    )
    msg = capsys.readouterr().err
    assert msg.startswith("logitcache import: error: 4 bad row(s):\n")
    assert f"{src}:2: tok[0] holds id 999, outside [0, 384)" in msg
    assert f"{src}:3: lg[0] must be a list of 2 values, found 1" in msg
    assert f"{src}:4: input_ids holds 2 ids and tok 2 positions; the targets are for" in msg
    assert f"{src}:5: id 'a' is already used at {src}:1" in msg
    assert "pass --on-error skip" in msg
    assert not out.exists()  # nothing written


def test_logits_without_split_skip_bad_rows(tmp_path, tiny_tokenizer_dir, capsys):
    src = _jsonl(tmp_path / "logits.jsonl", _logit_rows())
    out = tmp_path / "out"
    argv = ["import", src, str(out), "--tokenizer", str(tiny_tokenizer_dir), *LOGIT_FLAGS]
    assert main([*argv, "--on-error", "skip", "--codec", "f32", "--teacher-name", "t0"]) == 0
    assert "4 row(s) skipped; tail: unknown" in capsys.readouterr().out
    m = open_dataset(out).manifest
    assert m.extra["skipped_count"] == 4
    assert [s["line"] for s in m.extra["skipped"]] == [2, 3, 4, 5]
    imported = m.info.capture["imported"]
    assert imported["sources"] == [src] and imported["tail"].startswith("unknown")
    assert imported["settings"]["columns"]["ids_column"] == "tok"
    assert m.info.teacher["name_or_path"] == "t0"
    card = (out / "README.md").read_text()
    assert f"| imported from | {src} |" in card and "| tail mass | unknown: " in card
    (ex,) = open_dataset(out).iter_examples()
    assert ex.prompt_ids.tolist() == [5, 6] and ex.response_ids.tolist() == [7, 8]
    assert ex.targets.ids.tolist() == [[7, 9], [1, 8]]  # stored ascending
    want = np.array([[0.0, -2.0], [0.0, 0.0]]) - np.log([1 + np.exp(-2.0), 2.0])[:, None]
    np.testing.assert_allclose(ex.targets.logprobs, want, rtol=1e-6)
    assert np.isneginf(ex.targets.tail_logmass).all()


def test_logprobs_that_sum_above_one_are_refused(tmp_path, tiny_tokenizer_dir, capsys):
    row = {"prompt_ids": [1], "response_ids": [2], "topk_ids": [[3, 4]]}
    src = _jsonl(tmp_path / "p.jsonl", [{**row, "topk_logprobs": [[-0.1, -0.2]]}])
    assert main(["import", src, str(tmp_path / "out"), "--tokenizer", str(tiny_tokenizer_dir)]) == 1
    assert (
        f"{src}:1: topk_logprobs[0]: probabilities sum to 1.724 > 1; these are not log-probs "
        "of one distribution (raw logits? pass --values logits)"
    ) in capsys.readouterr().err


def test_import_refuses_a_non_empty_out(tmp_path, tiny_tokenizer_dir):
    row = {"prompt_ids": [1], "response_ids": [2], "topk_ids": [[3]], "topk_logprobs": [[-0.1]]}
    src = _jsonl(tmp_path / "p.jsonl", [row])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    cfg = ImportConfig(run=ImportRunConfig(tokenizer=str(tiny_tokenizer_dir)))
    with pytest.raises(InputError, match=r"OUT .*out exists and is not empty \(x\); give"):
        import_plain([src], tmp_path / "out", cfg)


def test_arrow_sources_in_the_stream_and_the_file_format(tmp_path):
    """`*.arrow` is read as an IPC stream (what `datasets` and export write) or, failing that,
    as an IPC file (Feather v2)."""
    import pyarrow as pa
    import pyarrow.feather as feather

    from logitcache.cache.sources import iter_raw

    table = pa.table({"id": ["a", "b", "c"], "prompt": ["x", "y", "z"]})
    with pa.ipc.new_stream(tmp_path / "s.arrow", table.schema) as w:
        for batch in table.to_batches(max_chunksize=2):
            w.write_batch(batch)
    feather.write_feather(table, tmp_path / "f.arrow")
    for name in ("s.arrow", "f.arrow"):
        rows = list(iter_raw(str(tmp_path / name)))
        assert rows == [(None, i, r) for i, r in enumerate(table.to_pylist())]
