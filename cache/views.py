"""Teacher and student views: render records to text, tokenize them, and apply the length policy.

Alignment contract (docs/CAPTURE.md). For every example we build three id sequences:

- ``teacher_ids``: the teacher's full view before the response (shared context, the record's
  context, then its prompt), rendered with the chat template or as plain text;
- ``student_ids``: the student's view before the response (the record's prompt alone);
- ``response_ids``: appended to both views.

The tokenization rule: each view's ids followed by the response ids are exactly the tokens of
that view's whole conversation, rendered as text and tokenized in one piece, as the tokenizer
(and the model at inference time) sees it; ``response_ids`` are the whole's tokens after the
prompt's, and must be the same after both views. A record for which that split does not exist
(a token merges across the boundary, or the response tokenizes differently after the two views)
is refused, naming the tokens. The teacher is run on exactly ``teacher_ids + response_ids``;
target j is read from the logits at position ``len(teacher_ids) - 1 + j``, which predict
``response_ids[j]``. In chat views the response is the template's whole assistant turn after the
generation prompt (content and end-of-turn token), with the trailing whitespace between turns
removed, so a student learns to stop.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
import numpy as np

from .errors import InputError
from .prompts import BadRecord, Messages, PromptRecord, View, check_messages

Render = Literal["chat", "plain"]
Truncation = Literal["error", "left", "drop"]
_TOKENIZE_BATCH = 1024


@dataclass(frozen=True)
class Context:
    """The shared teacher-only context of ``--context``: text, or a few-shot list of messages."""

    file: str
    value: View

    @classmethod
    def load(cls, file: str, storage_options: dict[str, Any] | None = None) -> Context:
        """Read ``file``; a JSON list of {role, content} objects is a chat, anything else text."""
        try:
            with fsspec.open(file, "rb", **(storage_options or {})) as f:
                text = f.read().decode("utf-8")
        except FileNotFoundError:
            raise InputError(f"--context {file}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"--context {file}: is a folder; give one text or JSON file") from None
        except OSError as e:
            raise InputError(f"--context {file}: cannot be read ({e})") from None
        except UnicodeDecodeError as e:
            raise InputError(f"--context {file}: not UTF-8 text ({e})") from None
        value: View = text
        stripped = text.lstrip()
        if stripped.startswith("["):
            try:
                value = check_messages(json.loads(text), "context")
            except json.JSONDecodeError:
                pass  # text that happens to start with "[": kept as text
            except RecursionError:
                raise InputError(
                    f"--context {file}: looks like JSON but is nested deeper than the JSON "
                    "parser allows; give a flat list of {role, content} messages, or plain text"
                ) from None
            except BadRecord as e:
                raise InputError(
                    f"--context {file}: looks like a JSON list of messages but {e}"
                ) from None
        if not (value.strip() if isinstance(value, str) else value):
            raise InputError(
                f"--context {file}: the file is empty (or only whitespace); drop --context or "
                "fill it"
            )
        return cls(file, value)


@dataclass
class Rendered:
    """One example's token ids, ready for capture."""

    id: str
    where: str
    teacher_ids: np.ndarray
    """(Tt,) int64 teacher view before the response."""
    student_ids: np.ndarray
    """(Ts,) int64 student view before the response."""
    response_ids: np.ndarray | None
    """(R,) int64 response ids; None in generate mode."""


@dataclass
class LengthReport:
    """What the length policy did, saved in the manifest's ``extra.too_long``."""

    truncated_teacher: int = 0
    truncated_student: int = 0
    dropped: int = 0
    dropped_examples: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "truncated_teacher": self.truncated_teacher,
            "truncated_student": self.truncated_student,
            "dropped": self.dropped,
        }


class ViewRenderer:
    """Turns records into token ids with one tokenizer, render mode and shared context."""

    def __init__(self, tokenizer: Any, render: Render, context: Context | None, tokenizer_dir: str):
        self.tok = tokenizer
        self.render = render
        self.context = context
        self.tokenizer_dir = tokenizer_dir
        if render == "plain" and context is not None and not isinstance(context.value, str):
            raise InputError(
                f"--context {context.file} is a list of chat messages but --render is plain; "
                "pass --render chat, or give a plain-text context file"
            )

    # ------------------------------------------------------------------ description

    def describe(self) -> dict[str, Any]:
        """The views, as recorded in the manifest's ``capture.templates``."""
        template = getattr(self.tok, "chat_template", None)
        ctx = self.context
        return {
            "teacher": {
                "render": self.render,
                "context_file": ctx.file if ctx else None,
                "context": ctx.value if ctx else None,
                "record_context": "the record's 'context' field, when present, after --context",
            },
            "student": {"render": self.render, "context": None},
            # The template itself, so another team can recompute the views (docs/FORMAT.md).
            "chat_template": template if isinstance(template, str) else None,
            "chat_template_sha256": (
                hashlib.sha256(template.encode()).hexdigest() if isinstance(template, str) else None
            ),
            "response": (
                "the tokens of the whole conversation (the view, then the response) after the "
                "view's own tokens; chat: the template's assistant turn, trailing whitespace removed"
            ),
        }

    # ------------------------------------------------------------------ rendering

    def _needs_chat(self, view: View) -> bool:
        return not isinstance(view, str) or self.render == "chat"

    def _as_messages(self, view: View) -> Messages:
        return [{"role": "user", "content": view}] if isinstance(view, str) else view

    def _teacher_view(self, rec: PromptRecord) -> View:
        base = rec.teacher if rec.teacher is not None else rec.student
        contexts = [c for c in (self.context.value if self.context else None, rec.context) if c]
        if not self._needs_chat(base):
            for c in contexts:
                if not isinstance(c, str):
                    raise BadRecord("has a chat 'context' but a text prompt under --render plain")
            return "".join(contexts) + base  # type: ignore[operator]
        system = [c for c in contexts if isinstance(c, str)]
        msgs = [m for c in contexts if not isinstance(c, str) for m in c] + self._as_messages(base)
        if system:
            if msgs[0]["role"] == "system":
                system.append(msgs[0]["content"])
                msgs = msgs[1:]
            msgs = [{"role": "system", "content": "\n\n".join(system)}, *msgs]
        return msgs

    def _apply_template(self, msgs: Messages, generation_prompt: bool) -> str:
        """The chat template over ``msgs``; a template that refuses them (raise_exception, as
        Llama-2's and Mistral's do for roles out of order) makes the record bad."""
        from jinja2 import TemplateError

        try:
            return self.tok.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=generation_prompt
            )
        except TemplateError as e:
            roles = ", ".join(m["role"] for m in msgs)
            raise BadRecord(
                f"the chat template refuses the conversation (roles: {roles}): {e}"
            ) from None

    def _chat_prefix(self, msgs: Messages) -> str:
        return self._apply_template(msgs, generation_prompt=True)

    def _chat_response(self, msgs: Messages, prefix: str, response: str) -> str:
        full = self._apply_template([*msgs, {"role": "assistant", "content": response}], False)
        if not full.startswith(prefix):
            raise BadRecord(
                "the chat template renders the conversation with the response so that the "
                "prompt (with add_generation_prompt) is not its prefix; this template cannot "
                "score a given response: use --mode generate or --render plain"
            )
        turn = full[len(prefix) :]
        # Keep the content as is; drop only whitespace the template puts between turns.
        if turn.startswith(response):
            return response + turn[len(response) :].rstrip()
        return turn.rstrip()

    def _render_one(self, rec: PromptRecord) -> tuple[str, bool, str, bool, str | None]:
        """(teacher text, teacher is chat, student text, student is chat, response text)."""
        teacher = self._teacher_view(rec)
        student = rec.student
        t_chat, s_chat = self._needs_chat(teacher), self._needs_chat(student)
        if t_chat != s_chat:
            raise BadRecord(
                "the teacher view is a chat and the student view plain text (or the reverse); "
                "with --render plain both must be text, or both messages"
            )
        if (t_chat or s_chat) and not isinstance(getattr(self.tok, "chat_template", None), str):
            raise InputError(
                f"{rec.where}: this record needs a chat template (messages, or --render chat) "
                f"but the tokenizer in {self.tokenizer_dir} has none; pass --render plain with "
                "text prompts, or --tokenizer a folder whose tokenizer has a chat_template"
            )
        if not t_chat:
            return teacher, False, student, False, rec.response  # type: ignore[return-value]
        t_msgs, s_msgs = teacher, self._as_messages(student)
        t_text, s_text = self._chat_prefix(t_msgs), self._chat_prefix(s_msgs)  # type: ignore[arg-type]
        response = None
        if rec.response is not None:
            response = self._chat_response(t_msgs, t_text, rec.response)  # type: ignore[arg-type]
            if self._chat_response(s_msgs, s_text, rec.response) != response:
                raise BadRecord(
                    "the chat template renders the response differently after the teacher's and "
                    "the student's view, so the response ids would differ between the views"
                )
        return t_text, True, s_text, True, response

    def render_all(
        self, records: Sequence[PromptRecord]
    ) -> tuple[list[Rendered], list[tuple[PromptRecord, str]]]:
        """Render and tokenize records; returns (rendered, [(record, reason)] of the bad ones).

        With a response, each view is tokenized twice: the prompt alone and the whole
        conversation (prompt + response) in one piece; ``response_ids`` are the whole's tokens
        after the prompt's. A record where the prompt's tokens are not a prefix of the whole's
        (a token merged across the boundary), or where the response tokens differ after the
        teacher's and the student's view, is bad: no split of its ids is what the tokenizer
        makes of the text.
        """
        texts: list[tuple[PromptRecord, tuple[str, bool, str, bool, str | None]]] = []
        bad: list[tuple[PromptRecord, str]] = []
        for rec in records:
            try:
                texts.append((rec, self._render_one(rec)))
            except BadRecord as e:
                bad.append((rec, str(e)))
        t_ids = self._tokenize([(t[1][0], not t[1][1]) for t in texts])
        s_ids = self._tokenize([(t[1][2], not t[1][3]) for t in texts])
        scored = [i for i, t in enumerate(texts) if t[1][4] is not None]
        t_full = dict(
            zip(scored, self._tokenize([_whole(texts[i][1], 0) for i in scored]), strict=True)
        )
        s_full = dict(
            zip(scored, self._tokenize([_whole(texts[i][1], 2) for i in scored]), strict=True)
        )
        out = []
        for i, ((rec, _), t, s) in enumerate(zip(texts, t_ids, s_ids, strict=True)):
            empty = [n for n, ids in (("teacher view", t), ("student view", s)) if len(ids) == 0]
            if empty:
                bad.append((rec, f"the {' and '.join(empty)} tokenize(s) to no tokens"))
                continue
            response = None
            if i in t_full:
                try:
                    response = self._split(t, t_full[i], s, s_full[i])
                except BadRecord as e:
                    bad.append((rec, str(e)))
                    continue
            out.append(Rendered(rec.id, rec.where, t, s, response))
        return out, bad

    def _split(
        self, t_prompt: np.ndarray, t_whole: np.ndarray, s_prompt: np.ndarray, s_whole: np.ndarray
    ) -> np.ndarray:
        """The response ids: the tokens of each whole conversation after its prompt's tokens."""
        for name, prompt, whole in (("teacher", t_prompt, t_whole), ("student", s_prompt, s_whole)):
            n = len(prompt)
            if len(whole) >= n and np.array_equal(whole[:n], prompt):
                continue
            at = next(
                (j for j in range(min(n, len(whole))) if whole[j] != prompt[j]), min(n, len(whole))
            )
            if at == n - 1 and int(prompt[-1]) in self.tok.all_special_ids:
                raise BadRecord(
                    f"the tokenizer ends every text with the special token "
                    f"{self._show(prompt[-1:])} (e.g. add_eos_token), so the {name} prompt's "
                    "ids end with it but the whole conversation has the response there; use "
                    "--render chat, or a tokenizer that does not append it"
                )
            lo = max(at - 1, 0)
            alone, joint = self._show(prompt[lo : at + 2]), self._show(whole[lo : at + 2])
            raise BadRecord(
                f"the prompt and the response share a token across their boundary in the {name} "
                f"view: the prompt alone ends in tokens {alone} but the whole conversation has "
                f"{joint} there, so no prompt/response split of its ids is what the tokenizer "
                "writes; end the prompt with a newline, or start the response with a space"
            )
        t_resp, s_resp = t_whole[len(t_prompt) :], s_whole[len(s_prompt) :]
        if len(t_resp) == 0:
            raise BadRecord("the response tokenizes to no tokens")
        if not np.array_equal(t_resp, s_resp):
            raise BadRecord(
                "the response tokenizes differently after the teacher's view "
                f"({self._show(t_resp[:3])}…) and after the student's ({self._show(s_resp[:3])}…), "
                "so the teacher's targets would not describe the student's sequence; end both "
                "views with the same separator"
            )
        return t_resp

    def _show(self, ids: np.ndarray) -> str:
        return repr(self.tok.convert_ids_to_tokens([int(i) for i in ids]))

    def _tokenize(self, items: list[tuple[str, bool]]) -> list[np.ndarray]:
        """Token ids of each (text, add_special_tokens), batched through the fast tokenizer."""
        out: list[np.ndarray | None] = [None] * len(items)
        for flag in (False, True):
            idx = [i for i, (_, f) in enumerate(items) if f == flag]
            for j in range(0, len(idx), _TOKENIZE_BATCH):
                chunk = idx[j : j + _TOKENIZE_BATCH]
                enc = self.tok([items[i][0] for i in chunk], add_special_tokens=flag)["input_ids"]
                for i, ids in zip(chunk, enc, strict=True):
                    out[i] = np.asarray(ids, dtype=np.int64)
        return out  # type: ignore[return-value]


def _whole(parts: tuple[str, bool, str, bool, str | None], view: int) -> tuple[str, bool]:
    """(prompt text + response text, add_special_tokens) of the teacher (0) or student (2) view."""
    return parts[view] + (parts[4] or ""), not parts[view + 1]


def _cut_left(ids: np.ndarray, keep: int, bos: int | None) -> np.ndarray:
    """The last ``keep`` ids, keeping a leading BOS so the model still sees a sequence start."""
    if bos is not None and len(ids) and ids[0] == bos and keep > 1:
        return np.concatenate([ids[:1], ids[len(ids) - keep + 1 :]])
    return ids[len(ids) - keep :]


def apply_length_policy(
    examples: list[Rendered],
    *,
    max_length: int | None,
    policy: Truncation,
    reserve: int,
    bos_token_id: int | None,
) -> tuple[list[Rendered], LengthReport]:
    """Fit each view (prompt + response) into ``max_length`` tokens by ``policy``.

    ``reserve`` is the response length to plan for when there is no response yet (generate
    mode: max new tokens). "error" raises naming every over-long record; "left" cuts the oldest
    prompt tokens (context first) and drops an example whose response alone does not fit;
    "drop" leaves over-long examples out. Counts go to the report.
    """
    report = LengthReport(dropped_examples=[])
    if max_length is None:
        return examples, report
    kept: list[Rendered] = []
    too_long: list[str] = []
    for ex in examples:
        resp = len(ex.response_ids) if ex.response_ids is not None else reserve
        t_len, s_len = len(ex.teacher_ids) + resp, len(ex.student_ids) + resp
        if t_len <= max_length and s_len <= max_length:
            kept.append(ex)
            continue
        if policy == "error":
            too_long.append(
                f"  {ex.where} (id {ex.id!r}): teacher view {t_len}, student view {s_len} tokens"
            )
        elif policy == "drop" or resp + 1 > max_length:
            report.dropped += 1
            assert report.dropped_examples is not None
            report.dropped_examples.append(ex.id)
        else:
            if t_len > max_length:
                ex.teacher_ids = _cut_left(ex.teacher_ids, max_length - resp, bos_token_id)
                report.truncated_teacher += 1
            if s_len > max_length:
                ex.student_ids = _cut_left(ex.student_ids, max_length - resp, bos_token_id)
                report.truncated_student += 1
            kept.append(ex)
    if too_long:
        listed = "\n".join(too_long[:10]) + (
            f"\n  … and {len(too_long) - 10} more" if len(too_long) > 10 else ""
        )
        raise InputError(
            f"{len(too_long)} example(s) exceed --max-length {max_length} (prompt + response"
            f"{'' if reserve == 0 else f', planning {reserve} new tokens'}):\n{listed}\n"
            "raise --max-length, or pass --truncation left (cut the teacher context from the "
            "left) or --truncation drop (leave them out; counted in the manifest)"
        )
    return kept, report
