"""What a dataset holds, in words and numbers: its manifest described, and statistics of its
targets (how much teacher mass the stored targets hold, how peaked it is) and lengths.

`logitcache inspect` and `logitcache stats` print these (tools/cmd_inspect.py, cmd_stats.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .format import counted
from .paths import make_parents
from .reader import LogitDataset

# --------------------------------------------------------------------------- the manifest


def describe(ds: LogitDataset) -> str:
    """The manifest in words: teacher, tokenizer, targets, capture settings and size."""
    m, info = ds.manifest, ds.info
    targets = info.targets.in_words
    cap = info.capture
    lines = [
        f"dataset      {ds.loc}",
        f"teacher      {info.teacher.get('name_or_path')} (revision {info.teacher.get('revision')}, "
        f"config {str(info.teacher.get('config_hash'))[:12]})",
        f"tokenizer    {info.tokenizer_fingerprint[:23]}…, vocab {info.vocab_size}",
        f"targets      {targets}; ids as {info.id_bytes} byte plane(s) of sorted gaps"
        + (" (of ranks, in shards with a rank table)" if m.format_version >= 3 else ""),
        f"capture      temperature {cap.get('temperature')}, mode {cap.get('mode')}",
        f"size         {counted(m.num_examples, 'example')}, {counted(m.num_positions, 'position')}, "
        f"{counted(len(m.shards), 'shard')}, {m.num_bytes / 1e6:.2f} MB"
        + (f" ({m.num_bytes / m.num_positions:.1f} B/position)" if m.num_positions else ""),
    ]
    templates = cap.get("templates") or {}
    for view in ("teacher", "student"):
        if view in templates:
            text = str(templates[view]).replace("\n", "\\n")
            lines.append(f"{view:<12} {text[:150]}{'…' if len(text) > 150 else ''}")
    if m.extra:
        lines.append(f"extra        {', '.join(f'{k}={_short(v)}' for k, v in m.extra.items())}")
    return "\n".join(lines)


def _short(v: Any) -> str:
    return f"[{len(v)} items]" if isinstance(v, list) else str(v)


# --------------------------------------------------------------------------- statistics


@dataclass
class DatasetStats:
    """Per-position and per-example arrays over (up to ``max_positions`` of) a dataset."""

    kind: str
    prompt_lengths: np.ndarray
    response_lengths: np.ndarray
    coverage: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """top-k: the teacher mass inside the stored top-k, 1 − tail, per position."""
    entropy: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """top-k: entropy (nats) of the top-k plus the tail as one bucket, a lower bound on the
    teacher's full entropy; sampled: entropy of the empirical draw distribution."""
    target_hit: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    """Whether the response token itself is among the stored ids, per position."""
    unique: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Stored ids per position (k, plus distinct tail draws, for top-k; distinct draws for
    sampled)."""
    kept: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """top-k: ids kept per position (k, or k_j with adaptive top-k)."""
    draws: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """top-k with tail draws: draws per position (the sum of its counts: n, or n_j with
    ``n_rate``)."""


def collect_stats(ds: LogitDataset, max_positions: int = 1_000_000) -> DatasetStats:
    """Lengths of every example; coverage, entropy, hits and ids of the first
    ``max_positions`` positions (whole batches)."""
    prompt_len, resp_len, cov, ent, hit, uniq, kept_k, n_drawn = [], [], [], [], [], [], [], []
    seen = 0
    for b in ds.iter_batches():
        prompt_len.append(np.diff(b.prompt_offsets))
        resp_len.append(np.diff(b.response_offsets))
        if seen < max_positions:
            drawn = drawn_hit = None
            if b.sample_offsets is not None:  # sampled, or top-k tail draws
                assert b.sample_ids is not None and b.sample_counts is not None
                drawn = np.diff(b.sample_offsets)
                pos_of = np.repeat(np.arange(len(drawn)), drawn)
                is_resp = b.sample_ids == b.response_ids[pos_of]
                drawn_hit = np.bincount(pos_of, weights=is_resp, minlength=len(drawn)) > 0
            if b.topk_ids is not None:
                assert b.topk_logprobs is not None and b.tail_logmass is not None
                p = np.exp(np.concatenate([b.topk_logprobs, b.tail_logmass[:, None]], axis=1))
                cov.append(1.0 - p[:, -1])
                ent.append(-(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1))
                kept = b.topk_logprobs > -np.inf  # adaptive top-k: padding holds no id
                top_hit = ((b.topk_ids == b.response_ids[:, None]) & kept).any(axis=1)
                hit.append(top_hit if drawn_hit is None else top_hit | drawn_hit)
                k = np.full(len(p), b.topk_ids.shape[1])
                if b.topk_counts is not None:
                    k = b.topk_counts
                uniq.append(k if drawn is None else k + drawn)
                kept_k.append(k)
                if drawn is not None:
                    assert b.sample_counts is not None
                    n_drawn.append(
                        np.bincount(pos_of, b.sample_counts, len(drawn)).astype(np.int64)
                    )
            else:
                assert drawn is not None and drawn_hit is not None and b.sample_counts is not None
                q = (
                    b.sample_counts
                    / np.bincount(pos_of, weights=b.sample_counts, minlength=len(drawn))[pos_of]
                )
                ent.append(np.bincount(pos_of, weights=-q * np.log(q), minlength=len(drawn)))
                hit.append(drawn_hit)
                uniq.append(drawn)
            seen += b.num_positions

    def cat(xs: list[np.ndarray], dtype: type = float) -> np.ndarray:
        return np.concatenate(xs) if xs else np.zeros(0, dtype)

    return DatasetStats(
        ds.info.targets.kind,
        cat(prompt_len, int),
        cat(resp_len, int),
        cat(cov),
        cat(ent),
        cat(hit, bool),
        cat(uniq),
        cat(kept_k),
        cat(n_drawn),
    )


_LABEL_WIDTH = 19
"""Characters of :func:`format_stats`' labels: its values start in one column."""


def _q(x: np.ndarray) -> str:
    if x.size == 0:
        return "n/a"
    if np.issubdtype(x.dtype, np.integer):  # counts: percentiles that occur, no decimals
        p10, p50, p90 = np.percentile(x, [10, 50, 90], method="nearest")
        return f"mean {x.mean():.3f}  p10 {p10}  p50 {p50}  p90 {p90}  max {x.max()}"
    p10, p50, p90 = np.percentile(x, [10, 50, 90])
    return f"mean {x.mean():.3f}  p10 {p10:.3f}  p50 {p50:.3f}  p90 {p90:.3f}  max {x.max():.3f}"


def format_stats(s: DatasetStats) -> str:
    """The statistics as aligned lines: mean and percentiles of each."""
    rows = [
        ("examples", str(len(s.response_lengths))),
        ("positions", str(int(s.response_lengths.sum()))),
        ("prompt length", _q(s.prompt_lengths)),
        ("response length", _q(s.response_lengths)),
    ]
    if s.kind == "topk":
        rows.append(("top-k mass coverage", _q(s.coverage)))
        rows.append(("entropy (k + tail)", _q(s.entropy)))
        if s.kept.size and s.kept.min() != s.kept.max():  # adaptive top-k
            rows.append(("top-k ids kept", _q(s.kept)))
        if s.draws.size:
            rows.append(("tail draws", _q(s.draws)))
            rows.append(("ids (k + draws)", _q(s.unique)))  # k + distinct tail draws
    else:
        rows.append(("unique ids/position", _q(s.unique)))
        rows.append(("entropy of draws", _q(s.entropy)))
    lines = [f"{label:<{_LABEL_WIDTH}} {value}" for label, value in rows]
    if s.target_hit.size:
        lines.append(f"response token among stored ids: {s.target_hit.mean():.1%} of positions")
    return "\n".join(lines)


def plot_stats(s: DatasetStats, path: str | Path, title: str = "") -> None:
    """Histograms of coverage (top-k) or unique ids (sampled), entropy and response length."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'logitcache[plot]'") from None
    first = (
        (s.coverage, "top-k mass coverage")
        if s.kind == "topk"
        else (s.unique, "unique ids per position")
    )
    panels = [
        first,
        (s.entropy, "entropy (nats), " + ("top-k + tail bucket" if s.kind == "topk" else "draws")),
        (s.response_lengths, "response length (tokens)"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (data, label) in zip(axes, panels, strict=True):
        ax.hist(data, bins=50, color="#3b6ea5")
        ax.set_xlabel(label)
        ax.set_ylabel("count")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(make_parents(path), dpi=110)
    plt.close(fig)
