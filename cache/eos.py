"""Where a generated response ends: the eos ids generation stops at, and the chat template's
end-of-turn token, which must be one of them.

A chat model ends its assistant turn with the template's end-of-turn token (``</s>``,
``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``), and generation stops only at the eos ids.
A teacher folder whose generation_config.json names another id (a base model's
``<|endoftext|>``) writes every response on past its turn to --max-new-tokens, without an
error. :func:`check_turn_end` says so before the teacher loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .capture_config import CaptureConfig, TeacherConfig
from .errors import InputError

_PROBE = [
    {"role": "user", "content": "probe prompt"},
    {"role": "assistant", "content": "probe response"},
]


def generation_eos_ids(cfg: CaptureConfig, tokenizer: Any) -> tuple[list[int], str]:
    """The ids that end a generated response and where they come from: --eos-token-ids, else
    the teacher folder's (see :func:`folder_eos_ids`)."""
    given = cfg.generate.eos_token_ids
    if given is None:
        return folder_eos_ids(cfg.teacher, tokenizer)
    bad = [i for i in given if i >= len(tokenizer)]
    if bad:
        raise InputError(
            f"--eos-token-ids {' '.join(map(str, given))}: {bad} are not ids of the tokenizer "
            f"in {cfg.teacher.tokenizer or cfg.teacher.path} (it has {len(tokenizer)} tokens); "
            "pass ids below that"
        )
    return list(given), "--eos-token-ids"


def folder_eos_ids(teacher: TeacherConfig, tokenizer: Any) -> tuple[list[int], str]:
    """The teacher folder's eos ids and the file they come from: generation_config.json, else
    config.json (as transformers loads a model's generation config), else the tokenizer's eos
    token."""
    tok_dir = teacher.tokenizer or teacher.path
    folder = Path(teacher.path)
    path = folder / "generation_config.json"
    if not path.is_file():
        path = folder / "config.json"
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as e:
        raise InputError(f"--teacher {folder}: cannot read {path.name} ({e})") from None
    source = str(path)
    if eos is None:
        eos, source = tokenizer.eos_token_id, f"the eos token of the tokenizer in {tok_dir}"
    ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return ids, source


def turn_end(tokenizer: Any) -> tuple[str, list[int]] | None:
    """The text the chat template writes after an assistant message (whitespace stripped) and
    its token ids; None when the template writes nothing there or cannot be probed."""
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        return None
    try:
        text = tokenizer.apply_chat_template(_PROBE, tokenize=False)
    except Exception:  # a template that refuses the probe: nothing to compare
        return None
    at = text.rfind(_PROBE[-1]["content"]) if isinstance(text, str) else -1
    if at < 0:
        return None
    end = text[at + len(_PROBE[-1]["content"]) :].strip()
    ids = tokenizer(end, add_special_tokens=False)["input_ids"] if end else []
    return (end, [int(i) for i in ids]) if ids else None


def check_turn_end(cfg: CaptureConfig, tokenizer: Any, eos_ids: list[int], source: str) -> None:
    """Refuse generate mode under a chat template whose end-of-turn token is no eos id: the
    teacher would never stop at the end of its turn."""
    found = turn_end(tokenizer)
    if found is None:
        return
    text, ids = found
    if set(ids) & set(eos_ids):
        return
    tok_dir = cfg.teacher.tokenizer or cfg.teacher.path
    if not any(i in tokenizer.all_special_ids for i in ids):
        # The turn ends in ordinary text ('<|im_end|>' spelled in pieces): stopping at its
        # first piece would also stop at that character inside a response.
        raise InputError(
            f"--mode generate: the chat template of {tok_dir} ends the assistant's turn with "
            f"{text!r}, which this tokenizer writes as {len(ids)} ordinary token(s) "
            f"{tokenizer.convert_ids_to_tokens(ids)}, not one special token, so generation "
            "cannot stop there: use a tokenizer where the end-of-turn is a special token (the "
            "teacher's own), or capture in score mode with responses you give"
        )
    end = tokenizer.convert_ids_to_tokens(ids[0])
    if eos_ids:
        names = ", ".join(repr(t) for t in tokenizer.convert_ids_to_tokens(eos_ids))
        stops = f"only at eos id(s) {eos_ids} ({names}), from {source}"
    else:
        stops = f"at no eos id at all (none in {source})"
    fix = " ".join(str(i) for i in [ids[0], *(e for e in eos_ids if e != ids[0])])
    raise InputError(
        f"--mode generate: the chat template of {tok_dir} ends the assistant's turn with "
        f"{end!r} (id {ids[0]}{f'; the turn ends {text!r}' if len(ids) > 1 else ''}), but "
        f"generation stops {stops}: every response would run on past its turn to "
        f"--max-new-tokens {cfg.generate.max_new_tokens}. Pass --eos-token-ids {fix}, or list "
        f'{ids[0]} in "eos_token_id" of {Path(cfg.teacher.path) / "generation_config.json"}'
    )
