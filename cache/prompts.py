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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import InputError
from .sources import BadRecord, default_id_names, expand_sources, iter_raw, printable

Messages = list[dict[str, str]]
"""A chat: ``[{"role": "user", "content": "..."}, ...]``."""
View = str | Messages
"""What one side sees: plain text or a chat."""
OnError = Literal["raise", "skip"]

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
    default_id: bool = False
    """The record has no id of its own: ``id`` is ``<name>:<line>`` (or ``:row<N>``)."""

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
        default_id="id" not in o,
    )


def renamed_default_ids(records: Iterable[PromptRecord], done: set[str]) -> list[tuple[str, str]]:
    """(new id, committed id) of records whose default id names their file by another part of
    its path than the committed one did: the set of --prompts files changed, so the same record
    would be captured a second time under a new id."""
    longer: dict[str, str] = {}  # "train.jsonl:3" -> "en/train.jsonl:3"
    for d in done:
        for i, ch in enumerate(d):
            if ch == "/":
                longer.setdefault(d[i + 1 :], d)
    out = []
    for r in records:
        if not r.default_id or r.id in done:
            continue
        shorter = (r.id[i + 1 :] for i, ch in enumerate(r.id) if ch == "/")
        old = longer.get(r.id) or next((s for s in shorter if s in done), None)
        if old is not None:
            out.append((r.id, old))
    return out


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
        shown = printable(source)
        for line, row, obj in iter_raw(source, storage_options):
            default_id = f"{name}:{line}" if line is not None else f"{name}:row{row}"
            try:
                rec = parse_record(
                    obj, (shown, line, row), default_id, require_response=require_response
                )
                if rec.id in seen:
                    raise BadRecord(
                        f"id {rec.id!r} is already used at {seen[rec.id]}; ids must be unique"
                    )
                seen[rec.id] = rec.where
                out.records.append((index, rec))
            except BadRecord as e:
                out.skipped.append((index, Skipped(shown, line, row, str(e))))
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
