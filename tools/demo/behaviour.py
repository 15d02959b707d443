"""The demo's context and an automatic measure of the behaviour it induces.

Context distillation needs a context whose effect is visible and cheap to score. The demo context
(`data/demo_context.txt`) is a six-shot pirate block: a JSON list of chat messages, alternating
user/assistant, in which every answer starts with "Ahoy!" and talks like a pirate. It holds no
system message, so the teacher's input is the student's input with the block inserted before the
user's prompt, and both keep the model's default system prompt:

    teacher: apply_chat_template(load_demo_context() + [{"role": "user", "content": prompt}])
    student: apply_chat_template([{"role": "user", "content": prompt}])

With SmolLM2-135M-Instruct and greedy decoding, the block makes nearly every answer open with
"Ahoy!"; without it none does. `behaviour_score` measures exactly that; `pirate_word_rate` checks
the style reaches past the first token.

`data/demo_prompts.jsonl` holds ordinary user prompts, one `{"id": ..., "prompt": ...}` per line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

DATA_DIR = Path(__file__).with_name("data")
DEMO_CONTEXT = DATA_DIR / "demo_context.txt"
DEMO_PROMPTS = DATA_DIR / "demo_prompts.jsonl"

MARKER = "ahoy"
"""Every few-shot answer in the demo context starts with this word."""

PIRATE_WORDS = frozenset(
    {"arr", "matey", "hearty", "ye", "yer", "aye", "doubloon", "doubloons", "scurvy", "landlubber"}
)
"""Words ordinary answers essentially never use; "Ahoy" itself is excluded on purpose."""

_START = re.compile(rf"\s*[\"'*_(\[]*{MARKER}\b", re.IGNORECASE)
_WORD = re.compile(r"[a-z]+")


def starts_with_marker(text: str) -> bool:
    """True if `text` opens with "Ahoy" (any case, after whitespace, quotes or markdown)."""
    return _START.match(text) is not None


def behaviour_score(texts: Iterable[str]) -> float:
    """Fraction of answers that start with "Ahoy": the demo context's behaviour, in [0, 1].

    Measured on the first words only, so it is robust to the degenerate repetition small models
    fall into later in an answer. Returns 0.0 for no texts.
    """
    flags = [starts_with_marker(t) for t in texts]
    return sum(flags) / len(flags) if flags else 0.0


def pirate_word_rate(texts: Iterable[str]) -> float:
    """Fraction of answers containing at least one word of `PIRATE_WORDS`, in [0, 1].

    A student that only learned to emit "Ahoy" scores high on `behaviour_score` and low here.
    """
    flags = [not PIRATE_WORDS.isdisjoint(_WORD.findall(t.lower())) for t in texts]
    return sum(flags) / len(flags) if flags else 0.0


def load_demo_context(path: str | Path = DEMO_CONTEXT) -> list[dict[str, str]]:
    """The teacher-only context: a JSON list of `{"role", "content"}` chat messages."""
    path = Path(path)
    messages = json.loads(path.read_text(encoding="utf-8"))
    problems = []
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{path}: expected a non-empty JSON list of chat messages")
    for i, msg in enumerate(messages):
        if not (isinstance(msg, dict) and set(msg) == {"role", "content"}):
            problems.append(f"message {i} must have exactly the keys 'role' and 'content'")
        elif msg["role"] not in ("system", "user", "assistant"):
            problems.append(f"message {i} has role {msg['role']!r}")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return messages


def load_demo_prompts(path: str | Path = DEMO_PROMPTS) -> list[dict[str, str]]:
    """The demo's user prompts, in file order: `[{"id": ..., "prompt": ...}, ...]`."""
    path = Path(path)
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and "id" in row):
            raise ValueError(
                f"{path}:{line_no}: expected {{'id': ..., 'prompt': str}}, got {line!r}"
            )
        rows.append(row)
    return rows
