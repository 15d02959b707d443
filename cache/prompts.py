"""Prompt records for capture: read JSONL, JSONL.zst, Parquet or a `datasets` folder into records.

A record is one JSON object (or one table row) that says what the student sees, optionally what
the teacher sees instead, and optionally the response (docs/CAPTURE.md):

    {"id": "q1", "prompt": "What is 2+2?", "response": "4"}            # text
    {"id": "q2", "messages": [{"role": "user", "content": "Hi"}]}       # chat
    {"id": "q3", "prompt": "...", "context": "Answer like a pirate."}   # own teacher-only context
    {"id": "q4", "teacher": ..., "student": ..., "response": "..."}    # two explicit views

Other fields are ignored, so a table may carry metadata columns. Records are read in a fixed
order (sources as given, globs sorted, rows in file order) and numbered; capture splits them
between ranks by that number, so every rank agrees on who owns what without talking.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec

from .errors import InputError

Messages = list[dict[str, str]]
"""A chat: ``[{"role": "user", "content": "..."}, ...]``."""
View = str | Messages
"""What one side sees: plain text or a chat."""
OnError = Literal["raise", "skip"]

SUFFIXES = (".jsonl", ".jsonl.zst", ".parquet")
SUPPORTED = "*.jsonl, *.jsonl.zst, *.parquet, or a folder saved with datasets' save_to_disk"
_MAX_LISTED = 10


@dataclass(frozen=True)
class PromptRecord:
    """One validated prompt record."""

    id: str
    """Unique id, kept in the dataset; resume skips ids already committed."""
    file: str
    """The source it came from."""
    line: int | None
    """1-based line of a JSONL source."""
    row: int | None
    """0-based row of a Parquet file or `datasets` folder."""
    student: View
    """What the student sees before the response."""
    teacher: View | None = None
    """What the teacher sees instead (before any context); None: the same as the student."""
    context: View | None = None
    """This record's own teacher-only context, added after the shared ``--context``."""
    response: str | None = None
    """The response to score; None in generate mode (the teacher writes it)."""

    @property
    def where(self) -> str:
        """``file:line`` (JSONL) or ``file row N`` (tables), for messages."""
        return _where(self.file, self.line, self.row)

    def skipped(self, reason: str) -> Skipped:
        return Skipped(self.file, self.line, self.row, reason)


def _where(file: str, line: int | None, row: int | None) -> str:
    return f"{file}:{line}" if line is not None else f"{file} row {row}"


@dataclass(frozen=True)
class Skipped:
    """A record left out under ``--on-error skip``, as recorded in the manifest's ``extra``."""

    file: str
    line: int | None
    """1-based line of a JSONL file."""
    row: int | None
    """0-based row of a Parquet file or `datasets` folder."""
    reason: str

    @property
    def where(self) -> str:
        return _where(self.file, self.line, self.row)

    def to_json(self) -> dict[str, Any]:
        loc = {"line": self.line} if self.line is not None else {"row": self.row}
        return {"file": self.file, **loc, "reason": self.reason}


@dataclass
class PromptSet:
    """Every record of the sources, each with its global number, and what was skipped."""

    records: list[tuple[int, PromptRecord]]
    skipped: list[tuple[int, Skipped]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    total: int = 0
    """Records read, valid or not (the range of the global numbers)."""

    def part(self, index: int, count: int) -> PromptSet:
        """The records (and skipped records) that part ``index`` of ``count`` owns."""
        return PromptSet(
            records=[(i, r) for i, r in self.records if i % count == index],
            skipped=[(i, s) for i, s in self.skipped if i % count == index],
            sources=self.sources,
            total=self.total,
        )


class BadRecord(Exception):
    """A record is malformed; the message is the reason (without the location)."""


# --------------------------------------------------------------------------- sources


def expand_sources(
    sources: Sequence[str], storage_options: dict[str, Any] | None = None
) -> list[str]:
    """Resolve globs and plain folders into the ordered list of files or `datasets` folders."""
    out: list[str] = []
    for src in sources:
        fs, path = fsspec.core.url_to_fs(src, **(storage_options or {}))
        if any(ch in path for ch in "*?["):
            found = sorted(fs.glob(path))
            if not found:
                raise InputError(f"--prompts {src}: the pattern matches no file")
            out += [_unstrip(fs, src, p) for p in found]
        elif not fs.exists(path):
            raise InputError(f"--prompts {src}: no such file or folder")
        elif fs.isdir(path) and not _is_datasets_folder(fs, path):
            found = sorted(
                p for p in fs.find(path) if p.endswith(SUFFIXES) and "/." not in p[len(path) :]
            )
            if not found:
                raise InputError(
                    f"--prompts {src}: the folder holds no prompt files and is not a datasets "
                    f"folder; expected {SUPPORTED}"
                )
            out += [_unstrip(fs, src, p) for p in found]
        else:
            out.append(src)
    return out


def _unstrip(fs: Any, original: str, path: str) -> str:
    """Give a path found by fsspec its protocol back (``memory://x``), as the user wrote it."""
    if "://" in original:
        return fs.unstrip_protocol(path)
    return path


def _is_datasets_folder(fs: Any, path: str) -> bool:
    return any(fs.exists(posixpath.join(path, n)) for n in ("state.json", "dataset_dict.json"))


def iter_raw(
    source: str, storage_options: dict[str, Any] | None = None
) -> Iterator[tuple[int | None, int | None, Any]]:
    """(line, row, object) of every record of one source; object is a BadRecord when unreadable."""
    fs, path = fsspec.core.url_to_fs(source, **(storage_options or {}))
    if fs.isdir(path):
        yield from _iter_datasets(source, storage_options)
    elif path.endswith(".jsonl.zst"):
        yield from _iter_jsonl(source, fs, path, zstd=True)
    elif path.endswith(".jsonl"):
        yield from _iter_jsonl(source, fs, path, zstd=False)
    elif path.endswith(".parquet"):
        yield from _iter_parquet(source, fs, path)
    else:
        raise InputError(f"--prompts {source}: unknown file type; expected {SUPPORTED}")


def _iter_jsonl(
    source: str, fs: Any, path: str, *, zstd: bool
) -> Iterator[tuple[int | None, int | None, Any]]:
    line_no = 0
    with fs.open(path, "rb") as raw:
        chunks = _zstd_chunks(raw, source) if zstd else iter(lambda: raw.read(1 << 20), b"")
        for line_no, line in enumerate(_lines(chunks), start=1):
            if not line.strip():
                continue  # blank lines are not records
            try:
                yield line_no, None, json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield line_no, None, BadRecord(f"not UTF-8 text ({e.reason} at byte {e.start})")
            except json.JSONDecodeError as e:
                yield line_no, None, BadRecord(f"not valid JSON ({e.msg} at column {e.colno})")


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Split a stream of byte chunks into lines (without the newline)."""
    rest = b""
    for chunk in chunks:
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def _zstd_chunks(raw: Any, source: str) -> Iterator[bytes]:
    """Decompressed chunks of a (multi-frame) zstd stream, streamed; a cut-off frame raises.

    A plain stream reader ends quietly at a truncated frame, losing the records after it.
    """
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    obj, fed = dctx.decompressobj(), False
    try:
        while chunk := raw.read(1 << 20):
            while chunk:
                fed = True
                out = obj.decompress(chunk)
                if out:
                    yield out
                chunk = b""
                if obj.eof:  # one frame done; what follows starts the next one
                    chunk, obj, fed = obj.unused_data, dctx.decompressobj(), False
    except zstandard.ZstdError as e:
        raise InputError(
            f"{source}: the zstd stream is corrupt ({e}); recompress the file (zstd FILE.jsonl)"
        ) from None
    if fed and not obj.eof:
        raise InputError(
            f"{source}: the zstd stream is truncated (its last frame is cut off); the file was "
            "not fully written or copied: recompress or re-copy it"
        )


def _iter_parquet(source: str, fs: Any, path: str) -> Iterator[tuple[int | None, int | None, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{source}: not a readable Parquet file ({e})") from None
        row = 0
        for batch in pf.iter_batches(batch_size=1024):
            for obj in _table_rows(batch):
                yield None, row, obj
                row += 1


def _table_rows(batch: Any) -> list[Any]:
    """A record batch (or table) as Python rows; a row with a string that is not UTF-8 becomes
    a BadRecord naming the column, instead of failing the whole batch."""
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:
        pass
    rows: list[Any] = []
    for i in range(batch.num_rows):
        try:
            rows.append(batch.slice(i, 1).to_pylist()[0])
        except UnicodeDecodeError as e:
            bad = [
                name
                for name, col in zip(batch.schema.names, batch.columns, strict=True)
                if _undecodable(col.slice(i, 1))
            ]
            rows.append(BadRecord(f"column {', '.join(bad)} is not UTF-8 text ({e.reason})"))
    return rows


def _undecodable(col: Any) -> bool:
    try:
        col.to_pylist()
    except UnicodeDecodeError:
        return True
    return False


def _iter_datasets(
    source: str, storage_options: dict[str, Any] | None
) -> Iterator[tuple[int | None, int | None, Any]]:
    try:
        import datasets
    except ImportError:
        raise InputError(
            f"--prompts {source} is a `datasets` folder, which needs the datasets package: "
            "pip install 'logitcache[datasets]'"
        ) from None
    ds = datasets.load_from_disk(source, storage_options=storage_options)
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if len(splits) != 1:
            raise InputError(
                f"--prompts {source} is a DatasetDict with splits {splits}; pass one split's "
                f"folder, e.g. --prompts {source.rstrip('/')}/{splits[0]}"
            )
        ds = ds[splits[0]]
    row = 0
    for batch in ds.with_format("arrow").iter(batch_size=1024):
        for obj in _table_rows(batch):
            yield None, row, obj
            row += 1


# --------------------------------------------------------------------------- records


def _check_text(value: str, name: str) -> str:
    """``value`` if it is valid Unicode; a lone surrogate (a JSON ``\\ud800`` escape without
    its pair) cannot be encoded, tokenized or stored."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRecord(
            f"{name} is not valid Unicode text: it holds the lone surrogate "
            f"U+{ord(value[e.start]):04X} at character {e.start} (half of a UTF-16 pair, e.g. "
            "a JSON \\ud800 escape without its partner)"
        ) from None
    return value


def check_messages(value: Any, name: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise BadRecord(
            f"{name} must be a non-empty list of {{role, content}} objects, got {_show(value)}"
        )
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise BadRecord(f"{name}[{i}] must be an object with role and content, got {_show(m)}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise BadRecord(
                    f"{name}[{i}].{key} must be a string, got {_show(m.get(key))}"
                    + (" (missing)" if key not in m else "")
                )
            _check_text(m[key], f"{name}[{i}].{key}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _check_view(value: Any, name: str) -> View:
    if isinstance(value, str):
        if not value:
            raise BadRecord(f"{name} is an empty string")
        return _check_text(value, name)
    return check_messages(value, name)


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'…' if len(text) > 60 else ''}"


def parse_record(
    obj: Any, source: tuple[str, int | None, int | None], default_id: str, *, require_response: bool
) -> PromptRecord:
    """Validate one raw record; raises BadRecord with the reason."""
    if isinstance(obj, BadRecord):
        raise obj
    if not isinstance(obj, dict):
        raise BadRecord(f"a record must be a JSON object, got {_show(obj)}")
    o = {k: v for k, v in obj.items() if v is not None}  # a table's null cell = absent
    rid = o.get("id", default_id)
    if isinstance(rid, bool) or not isinstance(rid, str | int) or rid == "":
        raise BadRecord(f"id must be a non-empty string or an integer, got {_show(rid)}")
    if isinstance(rid, str):
        _check_text(rid, "id")
    shorthand = [k for k in ("prompt", "messages") if k in o]
    explicit = [k for k in ("teacher", "student") if k in o]
    if len(shorthand) > 1 or (shorthand and explicit):
        raise BadRecord(
            f"has {' and '.join(shorthand + explicit)}: give either 'prompt', or 'messages', "
            "or both 'teacher' and 'student'"
        )
    teacher: View | None = None
    if shorthand == ["prompt"]:
        if not isinstance(o["prompt"], str):
            raise BadRecord(
                f"prompt must be a string, got {_show(o['prompt'])} (chat goes in 'messages')"
            )
        student = _check_view(o["prompt"], "prompt")
    elif shorthand == ["messages"]:
        student = check_messages(o["messages"], "messages")
    elif len(explicit) == 2:
        student = _check_view(o["student"], "student")
        teacher = _check_view(o["teacher"], "teacher")
    elif explicit:
        missing = ({"teacher", "student"} - set(explicit)).pop()
        raise BadRecord(f"has '{explicit[0]}' but no '{missing}': explicit views need both")
    else:
        raise BadRecord(
            "missing the prompt: give 'prompt' (text), 'messages' (chat), or 'teacher' and 'student'"
        )
    context = _check_view(o["context"], "context") if "context" in o else None
    response = o.get("response")
    if not require_response:
        response = None  # generate mode: the teacher writes the response
    elif response is None:
        raise BadRecord(
            "missing 'response' (score mode teacher-forces a given response); "
            "add one, or pass --mode generate to let the teacher write it"
        )
    elif not isinstance(response, str):
        raise BadRecord(f"response must be a string, got {_show(response)}")
    elif not response:
        raise BadRecord(
            "response is an empty string (score mode needs at least one token to score); "
            "give the response text, or pass --mode generate to let the teacher write it"
        )
    else:
        _check_text(response, "response")
    return PromptRecord(
        id=str(rid),
        file=source[0],
        line=source[1],
        row=source[2],
        student=student,
        teacher=teacher,
        context=context,
        response=response,
    )


def default_id_names(files: Sequence[str]) -> list[str]:
    """The file part of each source's default ids (``<name>:<line>``, ``<name>:row<N>``).

    The shortest trailing part of each path that no other source of the build ends with:
    the file name when it is unique (``train.jsonl``), else as many parent folders as tell the
    files apart (``en/train.jsonl``, ``fr/train.jsonl``). So ids are unique across one build
    and stable across its reruns (resume matches by id); a source named twice is an error.
    """
    keys = [_path_parts(f) for f in files]
    seen: dict[tuple[str, ...], str] = {}
    for f, key in zip(files, keys, strict=True):
        if key in seen:
            raise InputError(
                f"--prompts names {f} twice (also as {seen[key]}); pass each file once"
            )
        seen[key] = f
    names = []
    for key in keys:
        n = 1
        while n < len(key) and any(o != key and o[-n:] == key[-n:] for o in keys):
            n += 1
        names.append("/".join(key[-n:]))
    return names


def _path_parts(source: str) -> tuple[str, ...]:
    """A source's path as components: absolute for local files, with the bucket for URLs."""
    path = source.split("://", 1)[1] if "://" in source else posixpath.abspath(source)
    return tuple(p for p in path.rstrip("/").split("/") if p)


def read_prompts(
    sources: Sequence[str],
    *,
    require_response: bool,
    on_error: OnError = "raise",
    storage_options: dict[str, Any] | None = None,
) -> PromptSet:
    """Read and validate every record; bad records raise (listing all of them) or are skipped."""
    files = expand_sources(sources, storage_options)
    names = default_id_names(files)
    out = PromptSet(records=[], sources=files)
    seen: dict[str, str] = {}
    index = 0
    for source, name in zip(files, names, strict=True):
        for line, row, obj in iter_raw(source, storage_options):
            default_id = f"{name}:{line}" if line is not None else f"{name}:row{row}"
            try:
                rec = parse_record(
                    obj, (source, line, row), default_id, require_response=require_response
                )
                if rec.id in seen:
                    raise BadRecord(
                        f"id {rec.id!r} is already used at {seen[rec.id]}; ids must be unique"
                    )
                seen[rec.id] = rec.where
                out.records.append((index, rec))
            except BadRecord as e:
                out.skipped.append((index, Skipped(source, line, row, str(e))))
            index += 1
    out.total = index
    if out.skipped and on_error == "raise":
        listed = "\n".join(
            f"  {s.file}:{s.line}: {s.reason}"
            if s.line is not None
            else f"  {s.file} row {s.row}: {s.reason}"
            for _, s in out.skipped[:_MAX_LISTED]
        )
        more = len(out.skipped) - _MAX_LISTED
        raise InputError(
            f"{len(out.skipped)} malformed prompt record(s):\n{listed}"
            + (f"\n  … and {more} more" if more > 0 else "")
            + "\nfix them, or pass --on-error skip to leave them out (they are listed in the "
            "manifest's extra.skipped)"
        )
    if not out.records:
        what = (
            f"all {out.total} records are malformed (first: {out.skipped[0][1].reason})"
            if out.skipped
            else "the files hold no records"
        )
        raise InputError(f"--prompts {' '.join(sources)}: empty prompt set: {what}")
    return out
