"""Prompt records: every input format reads the same records; bad records name file and line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from logitcache.cache.errors import InputError
from logitcache.cache.prompts import read_prompts

RECORDS = [
    {"id": "a", "prompt": "What is 2+2?", "response": "4"},
    {"id": "b", "messages": [{"role": "user", "content": "Hi"}], "response": "Hello"},
    {"id": "c", "prompt": "Name a colour.", "context": "Answer briefly.", "response": "Red"},
    {
        "id": "d",
        "teacher": [
            {"role": "system", "content": "Be a pirate."},
            {"role": "user", "content": "Hi"},
        ],
        "student": [{"role": "user", "content": "Hi"}],
        "response": "Ahoy",
    },
]


def _jsonl(records: list) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def _summary(ps) -> list[tuple]:
    return [(i, r.id, r.student, r.teacher, r.context, r.response) for i, r in ps.records]


def write_all_formats(tmp_path: Path) -> dict[str, str]:
    """The same four records as JSONL, JSONL.zst, Parquet and a save_to_disk folder."""
    import datasets

    paths = {}
    (tmp_path / "p.jsonl").write_text(_jsonl(RECORDS))
    paths["jsonl"] = str(tmp_path / "p.jsonl")
    (tmp_path / "p.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(_jsonl(RECORDS).encode())
    )
    paths["zst"] = str(tmp_path / "p.jsonl.zst")
    # Tables need one schema: absent fields are nulls, chats are lists of structs.
    cols = ["id", "prompt", "messages", "context", "teacher", "student", "response"]
    rows = [{c: r.get(c) for c in cols} for r in RECORDS]
    msg = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    schema = pa.schema(
        [(c, msg if c in ("messages", "teacher", "student") else pa.string()) for c in cols]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "p.parquet")
    paths["parquet"] = str(tmp_path / "p.parquet")
    datasets.Dataset(pa.Table.from_pylist(rows, schema=schema)).save_to_disk(tmp_path / "hf")
    paths["datasets"] = str(tmp_path / "hf")
    return paths


def test_multi_frame_zstd_streams_every_frame(tmp_path: Path) -> None:
    frames = [
        zstandard.ZstdCompressor().compress(_jsonl(RECORDS[i : i + 2]).encode()) for i in (0, 2)
    ]
    (tmp_path / "p.jsonl.zst").write_bytes(b"".join(frames))
    got = read_prompts([str(tmp_path / "p.jsonl.zst")], require_response=True)
    assert [r.id for _, r in got.records] == ["a", "b", "c", "d"]


@pytest.mark.parametrize("fmt", ["jsonl", "zst", "parquet", "datasets"])
def test_every_format_reads_the_same_records(tmp_path: Path, fmt: str) -> None:
    paths = write_all_formats(tmp_path)
    got = read_prompts([paths[fmt]], require_response=True)
    expected = read_prompts([paths["jsonl"]], require_response=True)
    assert _summary(got) == _summary(expected)
    assert [r.id for _, r in got.records] == ["a", "b", "c", "d"]
    rec = dict(got.records)[3]
    assert rec.teacher[0] == {"role": "system", "content": "Be a pirate."}
    assert rec.student == [{"role": "user", "content": "Hi"}]


def test_fsspec_memory_url() -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/prompts/x.jsonl", _jsonl(RECORDS).encode())
    fs.pipe(
        "/prompts/y.jsonl", _jsonl([{"id": "e", "prompt": "More?", "response": "Yes"}]).encode()
    )
    try:
        got = read_prompts(["memory://prompts/*.jsonl"], require_response=True)
        single = read_prompts(["memory://prompts/y.jsonl"], require_response=True)
    finally:
        fs.rm("/prompts", recursive=True)
    assert [r.id for _, r in got.records] == ["a", "b", "c", "d", "e"]
    assert got.records[-1][1].file.startswith("memory://")
    assert got.records[-1][1].file.endswith("/prompts/y.jsonl")
    assert [r.id for _, r in single.records] == ["e"]


def test_folder_of_files_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "2.jsonl").write_text(_jsonl(RECORDS[2:]))
    (tmp_path / "1.jsonl").write_text(_jsonl(RECORDS[:2]))
    got = read_prompts([str(tmp_path)], require_response=True)
    assert [r.id for _, r in got.records] == ["a", "b", "c", "d"]


def test_default_ids_name_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text("\n" + _jsonl([{"prompt": "x"}, {"prompt": "y"}]))
    got = read_prompts([str(tmp_path / "p.jsonl")], require_response=False)
    assert [r.id for _, r in got.records] == ["p.jsonl:2", "p.jsonl:3"]  # blank line 1 skipped


def test_generate_mode_ignores_responses(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text(_jsonl(RECORDS))
    got = read_prompts([str(tmp_path / "p.jsonl")], require_response=False)
    assert all(r.response is None for _, r in got.records)


BAD = [
    ('{"id": "x", "prompt": "hi"', r"p\.jsonl:1: not valid JSON"),
    ('["a list"]', r"p\.jsonl:1: a record must be a JSON object, got list"),
    ('{"id": "x"}', r"p\.jsonl:1: missing the prompt"),
    ('{"prompt": 5, "response": "r"}', r"p\.jsonl:1: prompt must be a string, got int 5"),
    ('{"prompt": "p"}', r"p\.jsonl:1: missing 'response'.*--mode generate"),
    ('{"prompt": "p", "response": 7}', r"p\.jsonl:1: response must be a string, got int 7"),
    ('{"prompt": "p", "response": ""}', r"p\.jsonl:1: response is an empty string"),
    (
        r'{"prompt": "bad \ud800 half", "response": "ok"}',
        r"prompt is not valid Unicode.*U\+D800 at character 4",
    ),
    (r'{"prompt": "p", "response": "\udfff"}', r"response is not valid Unicode.*U\+DFFF"),
    (r'{"id": "\ud83d", "prompt": "p", "response": "r"}', r"id is not valid Unicode"),
    (
        r'{"messages": [{"role": "user", "content": "a\udc00"}], "response": "r"}',
        r"messages\[0\]\.content is not valid Unicode",
    ),
    (r'{"prompt": "p", "context": "\ud800", "response": "r"}', r"context is not valid Unicode"),
    (
        r'{"teacher": [{"role": "\ud800", "content": "c"}], "student": "s", "response": "r"}',
        r"teacher\[0\]\.role is not valid Unicode",
    ),
    ('{"id": 1.5, "prompt": "p", "response": "r"}', r"p\.jsonl:1: id must be a non-empty string"),
    (
        '{"messages": [{"role": "user"}], "response": "r"}',
        r"messages\[0\]\.content must be a string.*missing",
    ),
    ('{"messages": "hi", "response": "r"}', r"messages must be a non-empty list"),
    ('{"prompt": "p", "messages": [], "response": "r"}', r"either 'prompt', or 'messages'"),
    ('{"teacher": "t", "response": "r"}', r"has 'teacher' but no 'student'"),
]


@pytest.mark.parametrize(("line", "match"), BAD)
def test_malformed_record_names_file_and_line(tmp_path: Path, line: str, match: str) -> None:
    (tmp_path / "p.jsonl").write_text(line + "\n")
    with pytest.raises(InputError, match=match):
        read_prompts([str(tmp_path / "p.jsonl")], require_response=True)


def test_all_bad_records_are_listed_at_once(tmp_path: Path) -> None:
    lines = [json.dumps(RECORDS[0]), "{oops", json.dumps(RECORDS[1]), '{"prompt": 3}']
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(
        InputError,
        match=r"(?s)2 malformed.*p\.jsonl:2: not valid JSON.*p\.jsonl:4: prompt must be.*--on-error skip",
    ):
        read_prompts([str(tmp_path / "p.jsonl")], require_response=True)


def test_parquet_errors_name_the_row(tmp_path: Path) -> None:
    pq.write_table(
        pa.table({"id": ["a", "b"], "prompt": ["x", None], "response": ["r", "s"]}),
        tmp_path / "t.parquet",
    )
    with pytest.raises(InputError, match=r"t\.parquet row 1: missing the prompt"):
        read_prompts([str(tmp_path / "t.parquet")], require_response=True)


def test_duplicate_ids_are_an_error(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text(_jsonl([RECORDS[0], RECORDS[0]]))
    with pytest.raises(InputError, match=r"p\.jsonl:2: id 'a' is already used at .*p\.jsonl:1"):
        read_prompts([str(tmp_path / "p.jsonl")], require_response=True)


def test_skip_records_skipped_ones(tmp_path: Path) -> None:
    lines = [json.dumps(RECORDS[0]), "{oops", json.dumps(RECORDS[1]), '{"prompt": 3}']
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    got = read_prompts([str(tmp_path / "p.jsonl")], require_response=True, on_error="skip")
    assert [(i, r.id) for i, r in got.records] == [(0, "a"), (2, "b")]
    assert [(i, s.to_json()["line"]) for i, s in got.skipped] == [(1, 2), (3, 4)]
    assert got.skipped[0][1].to_json()["file"].endswith("p.jsonl")
    assert "not valid JSON" in got.skipped[0][1].reason
    # Parts split by global number, bad records included, so each is reported exactly once.
    halves = [got.part(i, 2) for i in range(2)]
    assert [len(h.records) for h in halves] == [2, 0]
    assert [len(h.skipped) for h in halves] == [0, 2]


def test_empty_prompt_set_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(InputError, match=r"empty prompt set: the files hold no records"):
        read_prompts([str(tmp_path / "empty.jsonl")], require_response=True)
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(InputError, match=r"empty prompt set: all 1 records are malformed"):
        read_prompts([str(tmp_path / "bad.jsonl")], require_response=True, on_error="skip")


def test_missing_sources_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"--prompts .*nope\.jsonl: no such file or folder"):
        read_prompts([str(tmp_path / "nope.jsonl")], require_response=True)
    with pytest.raises(InputError, match=r"the pattern matches no file"):
        read_prompts([str(tmp_path / "*.jsonl")], require_response=True)
    (tmp_path / "p.csv").write_text("id,prompt\n")
    with pytest.raises(InputError, match=r"p\.csv: unknown file type; expected \*\.jsonl"):
        read_prompts([str(tmp_path / "p.csv")], require_response=True)


def test_corrupt_zstd_names_the_file(tmp_path: Path) -> None:
    data = zstandard.ZstdCompressor().compress(_jsonl(RECORDS * 50).encode())
    (tmp_path / "p.jsonl.zst").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"p\.jsonl\.zst: the zstd stream is truncated"):
        read_prompts([str(tmp_path / "p.jsonl.zst")], require_response=True)
    (tmp_path / "q.jsonl.zst").write_bytes(data[:20] + bytes(len(data) - 20))
    with pytest.raises(InputError, match=r"q\.jsonl\.zst: the zstd stream is corrupt"):
        read_prompts([str(tmp_path / "q.jsonl.zst")], require_response=True)


def test_default_ids_are_unique_across_files_of_the_same_name(tmp_path: Path) -> None:
    """Two train.jsonl in different folders: every record of both is read, none reported."""
    for lang in ("en", "fr"):
        (tmp_path / lang).mkdir()
        (tmp_path / lang / "train.jsonl").write_text(_jsonl([{"prompt": lang}, {"prompt": "2"}]))
    files = [str(tmp_path / "en" / "train.jsonl"), str(tmp_path / "fr" / "train.jsonl")]
    got = read_prompts(files, require_response=False, on_error="skip")
    assert got.skipped == []
    want = ["en/train.jsonl:1", "en/train.jsonl:2", "fr/train.jsonl:1", "fr/train.jsonl:2"]
    assert [r.id for _, r in got.records] == want
    # Stable across reruns (resume matches by id), also when the folder is given instead.
    again = read_prompts([str(tmp_path)], require_response=False)
    assert [r.id for _, r in again.records] == want
    # A file whose name is unique keeps the bare name, as datasets written before expect.
    alone = read_prompts(files[:1], require_response=False)
    assert [r.id for _, r in alone.records] == ["train.jsonl:1", "train.jsonl:2"]


def test_default_ids_in_nested_folders_and_tables(tmp_path: Path) -> None:
    (tmp_path / "a" / "x").mkdir(parents=True)
    (tmp_path / "b" / "x").mkdir(parents=True)
    table = pa.table({"prompt": ["p"]})
    for sub in ("a/x", "b/x", "a"):
        pq.write_table(table, tmp_path / sub / "t.parquet")
    got = read_prompts([str(tmp_path)], require_response=False)
    ids = [r.id for _, r in got.records]
    assert ids == ["a/t.parquet:row0", "a/x/t.parquet:row0", "b/x/t.parquet:row0"]


def test_a_file_named_twice_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text(_jsonl([{"prompt": "x"}]))
    with pytest.raises(InputError, match=r"--prompts names .*p\.jsonl twice.*pass each file once"):
        read_prompts([str(tmp_path / "p.jsonl"), str(tmp_path)], require_response=False)


def test_explicit_duplicate_ids_across_files_name_both_places(tmp_path: Path) -> None:
    for lang in ("en", "fr"):
        (tmp_path / lang).mkdir()
        (tmp_path / lang / "train.jsonl").write_text(_jsonl([{"id": "q1", "prompt": "x"}]))
    files = [str(tmp_path / "en" / "train.jsonl"), str(tmp_path / "fr" / "train.jsonl")]
    with pytest.raises(
        InputError, match=r"fr/train\.jsonl:1: id 'q1' is already used at .*en/train\.jsonl:1"
    ):
        read_prompts(files, require_response=False)


def _invalid_utf8_strings() -> pa.Array:
    """A string column whose second value is not UTF-8 (Arrow does not check on write)."""
    offsets = pa.py_buffer(np.array([0, 2, 4, 6], dtype=np.int32).tobytes())
    return pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(b"ok\xff\xfeok")])


def test_tables_with_invalid_utf8_are_bad_rows(tmp_path: Path) -> None:
    import datasets

    table = pa.table({"prompt": _invalid_utf8_strings(), "response": ["a", "b", "c"]})
    pq.write_table(table, tmp_path / "t.parquet")
    datasets.Dataset(table).save_to_disk(str(tmp_path / "ds"))
    for src, where in (
        (tmp_path / "t.parquet", r"t\.parquet row 1"),
        (tmp_path / "ds", "ds row 1"),
    ):
        with pytest.raises(InputError, match=where + r": column prompt is not UTF-8 text"):
            read_prompts([str(src)], require_response=True)
        got = read_prompts([str(src)], require_response=True, on_error="skip")
        assert [r.student for _, r in got.records] == ["ok", "ok"]
        assert [s.row for _, s in got.skipped] == [1]


def test_context_file_with_a_lone_surrogate(tmp_path: Path) -> None:
    from logitcache.cache.views import Context

    (tmp_path / "ctx.json").write_text(r'[{"role": "system", "content": "be \ud800 nice"}]')
    with pytest.raises(
        InputError, match=r"--context .*ctx\.json: .*context\[0\]\.content is not valid Unicode"
    ):
        Context.load(str(tmp_path / "ctx.json"))


@pytest.mark.parametrize(
    ("line", "match"),
    [
        (
            '{"prompt": ' + "[" * 5000 + "]" * 5000 + ', "response": "r"}',
            r"not readable JSON: nested deeper",
        ),
        ('{"prompt": "hi", "prompt": "ho", "response": "r"}', r"the key 'prompt' appears twice"),
    ],
)
def test_unreadable_json_is_a_bad_record(tmp_path: Path, line: str, match: str) -> None:
    good = json.dumps({"prompt": "ok", "response": "r"})
    (tmp_path / "p.jsonl").write_text(f"{good}\n{line}\n{good}\n")
    with pytest.raises(InputError, match=r"p\.jsonl:2: " + match):
        read_prompts([str(tmp_path / "p.jsonl")], require_response=True)
    got = read_prompts([str(tmp_path / "p.jsonl")], require_response=True, on_error="skip")
    assert [r.line for _, r in got.records] == [1, 3]


def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_bytes(b"\xef\xbb\xbf" + _jsonl([{"prompt": "a"}]).encode())
    got = read_prompts([str(tmp_path / "p.jsonl")], require_response=False)
    assert [r.student for _, r in got.records] == ["a"]


def test_file_names_that_are_not_utf8_or_look_like_globs(tmp_path: Path) -> None:
    """A literal name with [ ] is read as is; a name that is not UTF-8 gives valid ids."""
    (tmp_path / "star[1].jsonl").write_text(_jsonl([{"prompt": "a"}]))
    got = read_prompts([str(tmp_path / "star[1].jsonl")], require_response=False)
    assert [r.id for _, r in got.records] == ["star[1].jsonl:1"]
    bad = os.fsdecode(os.fsencode(str(tmp_path)) + b"/bad\xff.jsonl")
    Path(bad).write_text(_jsonl([{"prompt": "b"}]))
    got = read_prompts([bad], require_response=False)
    (rec,) = [r for _, r in got.records]
    assert rec.id == "bad\\udcff.jsonl:1" and rec.file.endswith("bad\\udcff.jsonl")
    rec.id.encode("utf-8")


def test_a_symlink_to_a_file_already_named_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(_jsonl([{"prompt": "a"}]))
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "a.jsonl")
    with pytest.raises(InputError, match=r"names .*link\.jsonl twice \(also as .*a\.jsonl\)"):
        read_prompts(
            [str(tmp_path / "a.jsonl"), str(tmp_path / "link.jsonl")], require_response=False
        )
