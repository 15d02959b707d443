"""Prompt sources: resolve ``--prompts`` into files and read their raw records, in a fixed order.

Formats: JSONL, JSONL.zst (streamed, multi-frame), Parquet, a folder saved with `datasets`'
``save_to_disk``, a folder of such files, a glob; local or any fsspec URL. A record that cannot
be read (not UTF-8, not JSON, a table cell that is not UTF-8) is yielded as a
:class:`BadRecord`, so the caller reports it with its file and line like any other bad record.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterator, Sequence
from typing import Any

import fsspec

from .errors import InputError

SUFFIXES = (".jsonl", ".jsonl.zst", ".parquet", ".arrow")
SUPPORTED = (
    "*.jsonl, *.jsonl.zst, *.parquet, *.arrow (Arrow IPC), or a folder saved with datasets' "
    "save_to_disk"
)


class BadRecord(Exception):
    """A record is malformed; the message is the reason (without the location)."""


def expand_sources(
    sources: Sequence[str], storage_options: dict[str, Any] | None = None, flag: str = "--prompts"
) -> list[str]:
    """Resolve globs and plain folders into the ordered list of files or `datasets` folders;
    ``flag`` is how errors name the sources (`logitcache import`: SRC)."""
    out: list[str] = []
    for src in sources:
        fs, path = fsspec.core.url_to_fs(src, **(storage_options or {}))
        if any(ch in path for ch in "*?[") and not fs.exists(path):  # a literal name wins
            found = sorted(fs.glob(path))
            if not found:
                raise InputError(f"{flag} {src}: the pattern matches no file")
            out += [_unstrip(fs, src, p) for p in found]
        elif not fs.exists(path):
            raise InputError(f"{flag} {src}: no such file or folder")
        elif fs.isdir(path) and not _is_datasets_folder(fs, path):
            found = sorted(
                p for p in fs.find(path) if p.endswith(SUFFIXES) and "/." not in p[len(path) :]
            )
            if not found:
                raise InputError(
                    f"{flag} {src}: the folder holds no prompt files and is not a datasets "
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
    source: str, storage_options: dict[str, Any] | None = None, flag: str = "--prompts"
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
    elif path.endswith(".arrow"):
        yield from _iter_arrow(source, fs, path)
    else:
        raise InputError(f"{flag} {source}: unknown file type; expected {SUPPORTED}")


def _iter_jsonl(
    source: str, fs: Any, path: str, *, zstd: bool
) -> Iterator[tuple[int | None, int | None, Any]]:
    line_no = 0
    with fs.open(path, "rb") as raw:
        chunks = _zstd_chunks(raw, source) if zstd else iter(lambda: raw.read(1 << 20), b"")
        for line_no, line in enumerate(_lines(chunks), start=1):
            if not line.strip():
                continue  # blank lines are not records
            if line_no == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # a UTF-8 byte-order mark, as Windows editors write
            yield line_no, None, parse_json(line)


def parse_json(line: bytes) -> Any:
    """One JSON value from UTF-8 bytes, or a BadRecord saying why not."""
    try:
        return json.loads(line.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as e:
        return BadRecord(f"not UTF-8 text ({e.reason} at byte {e.start})")
    except json.JSONDecodeError as e:
        return BadRecord(f"not valid JSON ({e.msg} at column {e.colno})")
    except RecursionError:
        return BadRecord("not readable JSON: nested deeper than the JSON parser allows")
    except BadRecord as e:
        return e


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object; a key given twice is an error, not "the last one wins"."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BadRecord(f"the key {key!r} appears twice in one object; keep one")
        out[key] = value
    return out


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


def _iter_arrow(source: str, fs: Any, path: str) -> Iterator[tuple[int | None, int | None, Any]]:
    """Rows of an Arrow IPC file: the stream format (what `datasets` and `logitcache export
    --format arrow` write) or the random-access file format (Feather v2)."""
    import pyarrow as pa

    with fs.open(path, "rb") as f:  # streamed a record batch at a time, as Parquet row groups
        try:
            reader = pa.ipc.open_stream(f)
        except pa.ArrowInvalid:
            f.seek(0)
            try:
                file = pa.ipc.open_file(f)
            except pa.ArrowInvalid as e:
                raise InputError(f"{source}: not a readable Arrow IPC file ({e})") from None
            reader = (file.get_batch(i) for i in range(file.num_record_batches))
        row = 0
        try:
            for batch in reader:
                for obj in _table_rows(batch):
                    yield None, row, obj
                    row += 1
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(
                f"{source}: the Arrow IPC file is damaged after row {row} ({e}); re-copy or "
                "re-export it"
            ) from None


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


def default_id_names(files: Sequence[str]) -> list[str]:
    """The file part of each source's default ids (``<name>:<line>``, ``<name>:row<N>``).

    The shortest trailing part of each path that no other source of the build ends with:
    the file name when it is unique (``train.jsonl``), else as many parent folders as tell the
    files apart (``en/train.jsonl``, ``fr/train.jsonl``). So ids are unique across one build
    and stable across its reruns (resume matches by id); a source named twice is an error.
    """
    keys = [_path_parts(f) for f in files]
    seen: dict[tuple[str, ...], str] = {}
    for f in files:
        key = _path_parts(f, resolve=True)  # a symlink and its target are one file
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
        names.append(printable("/".join(key[-n:])))
    return names


def printable(text: str) -> str:
    """``text`` as valid Unicode: a file name that is not UTF-8 reaches Python with lone
    surrogates, which no id, manifest or message may hold; they become ``\\udcff`` escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _path_parts(source: str, resolve: bool = False) -> tuple[str, ...]:
    """A source's path as components: absolute for local files (symlinks resolved if asked),
    with the bucket for URLs."""
    if "://" in source:
        path = source.split("://", 1)[1]
    else:
        path = os.path.realpath(source) if resolve else posixpath.abspath(source)
    return tuple(p for p in path.rstrip("/").split("/") if p)
