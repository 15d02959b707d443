"""Prompt records: every input format reads the same records; bad records name file and line."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
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
