"""manifest.json: the index of a dataset, written last, replaced atomically.

Each writer (one per GPU rank, or one per job-array task) journals the shards it commits in its
own part file, ``_parts/<writer>.json``, so concurrent writers never touch the same file; the
journal says ``"finished": true`` once its writer has closed after its whole share.
:func:`finalize` folds every part into the single ``manifest.json`` that readers use, and
refuses while a part is missing or unfinished (unless asked to publish a partial dataset).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import IncompatibleError, ManifestError
from .format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PARTS_DIR,
    READ_VERSIONS,
    DatasetInfo,
    check_shard_name,
    counted,
    min_format_version,
)
from .storage import Location


@dataclass(frozen=True)
class ShardEntry:
    """One committed shard as the manifest lists it."""

    file: str
    rows: int
    positions: int
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "rows": self.rows,
            "positions": self.positions,
            "bytes": self.bytes,
            "sha256": self.sha256,
        }

    @classmethod
    def from_json(cls, obj: Any, where: str) -> ShardEntry:
        try:
            entry = cls(
                file=obj["file"],
                rows=int(obj["rows"]),
                positions=int(obj["positions"]),
                bytes=int(obj["bytes"]),
                sha256=str(obj["sha256"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{where}: malformed shard entry {obj!r} ({e})") from None
        check_shard_name(entry.file, where)
        return entry


@dataclass
class Manifest:
    """The whole index: dataset info, committed shards, and capture bookkeeping."""

    info: DatasetInfo
    shards: list[ShardEntry] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form bookkeeping (skipped records, truncation counts), merged across writers."""
    format_version: int = FORMAT_VERSION
    """The version the dataset was written as: this module's for a new one, the file's when
    read. Shards keep their own encoding, so a dataset of an older version reads as it was."""
    finished: bool | None = None
    """Journals only: True once the writer has closed after its whole share, False while it
    writes or after it stopped early (a crash, a kill); None for a manifest, and for a journal
    written before the marker existed, which is taken as finished."""

    @property
    def num_examples(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def num_positions(self) -> int:
        return sum(s.positions for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        from . import __version__

        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            **self.info.to_json(),
            "num_examples": self.num_examples,
            "num_positions": self.num_positions,
            "num_bytes": self.num_bytes,
            "shards": [s.to_json() for s in self.shards],
            "extra": self.extra,
            **({} if self.finished is None else {"finished": self.finished}),
            "created_by": f"logitcache {__version__}",
        }

    def dumps(self) -> bytes:
        return (json.dumps(self.to_json(), indent=1, sort_keys=False) + "\n").encode()

    @classmethod
    def loads(cls, data: bytes, where: str) -> Manifest:
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ManifestError(f"{where}: not valid JSON ({e}); the file is damaged") from None
        if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
            raise ManifestError(f'{where}: not a logitcache manifest (no "format": "logitcache")')
        version = obj.get("format_version")
        if version not in READ_VERSIONS or isinstance(version, bool):
            raise ManifestError(
                f"{where}: format_version is {version!r} but this logitcache reads versions "
                f"{', '.join(map(str, READ_VERSIONS[:-1]))} and {READ_VERSIONS[-1]}; upgrade logitcache "
                "(pip install -U logitcache) to read it"
            )
        info = DatasetInfo.from_json(obj, where)
        if version < min_format_version(info.targets):
            raise ManifestError(
                f"{where}: format_version is {version} but its targets ({info.targets.label}) "
                f"need version {min_format_version(info.targets)} or later: positions hold a "
                "variable number of ids or draws from version 2 on; the manifest was edited by hand"
            )
        shards_obj = obj.get("shards")
        if not isinstance(shards_obj, list):
            raise ManifestError(
                f'{where}: "shards" must be a list, found {type(shards_obj).__name__}'
            )
        shards = [ShardEntry.from_json(s, f"{where} shards[{i}]") for i, s in enumerate(shards_obj)]
        names = [s.file for s in shards]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ManifestError(f"{where}: shard listed more than once: {dup}")
        finished = obj.get("finished")
        if finished is not None and not isinstance(finished, bool):
            raise ManifestError(f'{where}: "finished" must be true or false, found {finished!r}')
        m = cls(
            info=info,
            shards=shards,
            extra=dict(obj.get("extra", {})),
            format_version=version,
            finished=finished,
        )
        for key in ("num_examples", "num_positions"):
            if key in obj and obj[key] != getattr(m, key):
                raise ManifestError(
                    f"{where}: {key} is {obj[key]} but its shards add up to {getattr(m, key)}; "
                    "the manifest was edited or is out of step with its shards"
                )
        return m


def load_manifest(loc: Location) -> Manifest:
    """Read and validate ``manifest.json`` of the dataset at ``loc``."""
    where = f"{loc.path(MANIFEST_NAME)}"
    try:
        data = loc.read_bytes(MANIFEST_NAME)
    except NotADirectoryError:
        raise ManifestError(
            f"{loc} is a file, not a dataset folder: give the folder that holds {MANIFEST_NAME}"
        ) from None
    except FileNotFoundError:
        raise ManifestError(f"{where} not found; {_not_finalized_hint(loc)}") from None
    return Manifest.loads(data, where)


def _not_finalized_hint(loc: Location) -> str:
    """What to run for a folder without a manifest: finalize, or first finish the capture."""
    try:
        parts = load_parts(loc)
    except ManifestError as e:  # a damaged journal: say so rather than suggest finalize
        return f"a writer journal is unreadable: {e}"
    if not parts:
        return "is this a logitcache dataset folder?"
    pending = pending_parts(loc, parts)
    if pending is not None:
        return f"the dataset is not finalized: {pending}"
    return (
        f"{len(parts)} finished writer journal(s) are in {PARTS_DIR}/: run "
        f"`logitcache finalize {shlex.quote(str(loc))}`"
    )


def part_name(writer_id: str) -> str:
    return f"{writer_id}.json"


def load_parts(loc: Location) -> dict[str, Manifest]:
    """Every writer journal of the dataset, by file name."""
    return {
        name: Manifest.loads(loc.read_bytes(PARTS_DIR, name), loc.path(PARTS_DIR, name))
        for name in loc.listdir(PARTS_DIR)
        if name.endswith(".json") and not name.startswith(".")
    }


def writer_tmp_prefix(writer_id: str) -> str:
    """The prefix of a writer's temporary files (its shards' and its journal's)."""
    return f".tmp-{writer_id}-"


def write_journal(loc: Location, writer_id: str, journal: Manifest) -> None:
    """Replace writer ``writer_id``'s journal, ``_parts/<writer>.json``, atomically."""
    loc.write_atomic(
        journal.dumps(), PARTS_DIR, part_name(writer_id), tmp_prefix=writer_tmp_prefix(writer_id)
    )


def close_journals(loc: Location) -> None:
    """Mark every unfinished journal finished: for a capture that has just committed all of its
    prompts, an earlier run's journals (a run killed with another number of parts) hold some of
    them, and nothing is left for their writers to do."""
    for name, m in load_parts(loc).items():
        if m.finished is False:
            m.finished = True
            write_journal(loc, name.removesuffix(".json"), m)


def committed_manifests(loc: Location) -> list[tuple[str, Manifest]]:
    """(path, manifest) of everything committed to the folder: the finalized manifest, if any,
    then every writer journal. Resume, the writer's compatibility check and the ids already
    captured all read this one list."""
    out: list[tuple[str, Manifest]] = []
    if loc.exists(MANIFEST_NAME):
        out.append((loc.path(MANIFEST_NAME), load_manifest(loc)))
    out += [(loc.path(PARTS_DIR, n), m) for n, m in load_parts(loc).items()]
    return out


def check_compatible(
    a: DatasetInfo, b: DatasetInfo, where: str, *, allow_teachers: bool = False
) -> None:
    """Refuse to mix datasets whose targets do not mean the same thing, naming each difference."""
    diffs = []
    if a.tokenizer_fingerprint != b.tokenizer_fingerprint:
        diffs.append(
            f"tokenizer fingerprint {a.tokenizer_fingerprint[:16]}… vs {b.tokenizer_fingerprint[:16]}…"
        )
    if a.vocab_size != b.vocab_size:
        diffs.append(f"vocab_size {a.vocab_size} vs {b.vocab_size}")
    if a.targets != b.targets:
        shown = [a.targets.label, b.targets.label]
        if shown[0] == shown[1]:  # the label leaves out a field (the sampling scheme): name it
            differ = [
                f.name
                for f in fields(a.targets)
                if getattr(a.targets, f.name) != getattr(b.targets, f.name)
            ]
            shown = [
                ", ".join(f"{n}={getattr(t, n)}" for n in differ) for t in (a.targets, b.targets)
            ]
        diffs.append(f"targets {shown[0]} vs {shown[1]}")
    if a.capture.get("temperature") != b.capture.get("temperature"):
        diffs.append(
            f"capture temperature {a.capture.get('temperature')} vs {b.capture.get('temperature')}"
        )
    if a.teacher != b.teacher and not allow_teachers:
        diffs.append(
            f"teacher {a.teacher.get('name_or_path')!r} vs {b.teacher.get('name_or_path')!r} "
            "(pass --allow-different-teachers to merge anyway)"
        )
    if diffs:
        raise IncompatibleError(f"{where}: incompatible: " + "; ".join(diffs))


def merge_extra(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Combine bookkeeping: numbers add up, lists concatenate, anything else keeps the first."""
    out = dict(a)
    for key, val in b.items():
        if key not in out:
            out[key] = val
        elif isinstance(val, bool) or not isinstance(val, int | float | list | dict):
            continue
        elif isinstance(val, dict) and isinstance(out[key], dict):
            out[key] = merge_extra(out[key], val)
        elif (isinstance(val, list) and isinstance(out[key], list)) or (
            isinstance(val, int | float) and isinstance(out[key], int | float)
        ):
            out[key] = out[key] + val
    return out


def _layout(parts: dict[str, Manifest]) -> dict[str, int] | None:
    """The capture's ``extra.parts`` as its journals record it; None in journals before it."""
    return next(
        (m.extra["parts"] for m in parts.values() if isinstance(m.extra.get("parts"), dict)), None
    )


def pending_parts(loc: Location, parts: dict[str, Manifest]) -> str | None:
    """Why the journals do not yet hold the whole capture, with what to run; None when they do.

    A part is pending when its journal is missing (each capture journal records
    ``extra.parts`` = {"count": P, "ranks": W} and part p writes ``_parts/r<p:05d>.json``: a job
    array whose other tasks have not run) or unfinished (``finished`` false: its writer stopped
    before its whole share, e.g. a killed build). Journals written before either record carry
    neither and are not checked."""
    layout = _layout(parts) or {}
    count, ranks = int(layout.get("count", 1)), max(int(layout.get("ranks", 1)), 1)
    missing = [p for p in range(count) if layout and part_name(f"r{p:05d}") not in parts]
    stopped = {n: m for n, m in parts.items() if m.finished is False}
    if not missing and not stopped:
        return None
    q = shlex.quote(str(loc))
    out = []
    if missing:
        indices = sorted({p // ranks for p in missing})
        out.append(
            f"{len(missing)} of the capture's {count} parts have not written yet (missing "
            f"{', '.join(f'r{p:05d}' for p in missing[:10])}{' …' if len(missing) > 10 else ''}), "
            "so the dataset would hold only part of the prompts; run the same logitcache build "
            f"command with --shard-index {' / '.join(map(str, indices[:10]))}"
            f"{' …' if len(indices) > 10 else ''}, then `logitcache finalize {q}`"
        )
    for name, m in list(stopped.items())[:10]:
        out.append(
            f"{PARTS_DIR}/{name} holds {counted(m.num_examples, 'example')} but its writer has "
            "not finished its share (it was interrupted, or is still running); "
            + _resume_advice(name, m, loc)
        )
    if len(stopped) > 10:
        out.append(f"… and {len(stopped) - 10} more unfinished journals")
    committed = sum(m.num_examples for m in parts.values())
    out.append(
        f"or run `logitcache finalize {q} --partial` to publish the "
        f"{counted(committed, 'example')} committed so far"
    )
    return "; ".join(out)


def _resume_advice(name: str, m: Manifest, loc: Location) -> str:
    """What finishes the writer of journal ``name``: rerun the command that wrote it (for a
    capture's part, with the layout that journal itself records)."""
    q = shlex.quote(str(loc))
    layout = m.extra.get("parts")
    if isinstance(layout, dict):  # a capture's part
        ranks = max(int(layout.get("ranks", 1)), 1)
        num_shards = max(int(layout.get("count", 1)) // ranks, 1)
        if num_shards == 1:
            return (
                "rerun the `logitcache build` command that wrote it to resume (it continues "
                "where it stopped, then finalizes the dataset)"
            )
        index = int(name[1:6]) // ranks  # a capture's part p writes r<p:05d>.json
        return (
            f"rerun the `logitcache build` command with --num-shards {num_shards} --shard-index "
            f"{index} that wrote it to resume (it continues where it stopped), then "
            f"`logitcache finalize {q}`"
        )
    if "imported" in m.info.capture:  # `logitcache import` refuses a folder that is not empty
        return "rerun the `logitcache import` command with a new output folder"
    writer = name.removesuffix(".json")
    return (
        f"reopen DatasetWriter({str(loc)!r}, info, writer_id={writer!r}), add the examples it "
        "lacks and close() it"
    )


def finalize(loc: Location, *, partial: bool = False) -> Manifest:
    """Fold every writer journal into ``manifest.json`` (idempotent; safe to rerun).

    Shards are the union of the existing manifest's and the journals'; bookkeeping (``extra``)
    is the sum over journals, each of which is cumulative for its writer. Raises ManifestError
    while a part is missing or unfinished (:func:`pending_parts`), unless ``partial``: then
    what is committed is published as it is.
    """
    parts = load_parts(loc)
    pending = None if partial else pending_parts(loc, parts)
    if pending is not None:
        raise ManifestError(f"{loc}: not finalized: {pending}")
    base = load_manifest(loc) if loc.exists(MANIFEST_NAME) else None
    sources = ([(loc.path(MANIFEST_NAME), base)] if base else []) + [
        (loc.path(PARTS_DIR, n), m) for n, m in parts.items()
    ]
    if not sources:
        raise ManifestError(
            f"{loc}: nothing to finalize: no {MANIFEST_NAME} and no writer journals in {PARTS_DIR}/"
        )
    # The newest version among the manifest and the journals: what the shards may hold.
    newest = max(m.format_version for _, m in sources)
    merged = Manifest(info=sources[0][1].info, format_version=newest)
    seen: dict[str, ShardEntry] = {}
    for where, m in sources:
        check_compatible(merged.info, m.info, where)
        for s in m.shards:
            if s.file not in seen:
                seen[s.file] = s
                merged.shards.append(s)
            elif seen[s.file] != s:
                raise ManifestError(
                    f"{where}: shard {s.file} is listed elsewhere with another size or checksum"
                )
    merged.shards.sort(key=lambda s: s.file)
    layout = _layout(parts)
    if parts:
        for m in parts.values():
            own = {k: v for k, v in m.extra.items() if k != "parts"}  # the same in each
            merged.extra = merge_extra(merged.extra, own)
        if layout is not None:
            merged.extra["parts"] = layout
    elif base is not None:
        merged.extra = base.extra
    loc.write_atomic(merged.dumps(), MANIFEST_NAME, tmp_prefix=".tmp.manifest-", sole_writer=True)
    # After the manifest: the card describes a committed dataset and can never stand in for it.
    from .card import write_card

    write_card(loc, merged)
    return merged
