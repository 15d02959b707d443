"""Tokenizer fingerprint: the teacher's and the student's token ids must mean the same thing.

The fingerprint is a sha256 over the vocabulary (token → id), the BPE merges when there are any,
and the special/added tokens. It deliberately ignores the chat template and other settings that
change how text is rendered but not what an id means.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """``sha256:<hex>`` of a Hugging Face tokenizer's vocab, merges and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    merges: list[Any] = []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str()).get("model", {})
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", []) or []]
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials = sorted(
        (int(i), str(getattr(t, "content", t)), bool(getattr(t, "special", True)))
        for i, t in added.items()
    )
    payload = json.dumps(
        {
            "vocab": vocab,
            "merges": merges,
            "added": specials,
            "special": sorted(getattr(tokenizer, "all_special_tokens", [])),
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()


def load_local_tokenizer(
    folder: str, name: str, fix: str, *, trust_remote_code: bool = False
) -> Any:
    """``AutoTokenizer.from_pretrained(folder)`` from a local folder only (never downloaded, so
    a missing folder fails at once instead of after the Hub's retries). Raises InputError
    naming the folder as ``name`` (the flag as typed, e.g. ``--tokenizer DIR``), what
    transformers said, and ``fix``."""
    from transformers import AutoTokenizer

    from .errors import InputError

    try:
        return AutoTokenizer.from_pretrained(
            folder, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise InputError(f"{name}: no tokenizer could be loaded ({e}); {fix}") from None
