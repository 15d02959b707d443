"""The dataset card: README.md beside manifest.json, in the Hugging Face dataset-card shape.

``finalize`` writes it after the manifest, so a folder pushed to a hub explains itself: YAML
front matter (license when the capture gave ``--license``, tags, size, the shards as data
files), then the teacher, tokenizer, targets, sizes, capture settings and how to read it. It is
derived from the manifest (and ``capture_config.json`` when a build wrote one) and is
rewritten by every finalize; readers and ``verify`` ignore it. `logitcache inspect` and
`logitcache stats` stay the detailed views.
"""

from __future__ import annotations

import json
from typing import Any

from .capture_config import CONFIG_NAME
from .format import counted
from .manifest import Manifest
from .storage import Location

CARD_NAME = "README.md"
MARK = "<!-- written by logitcache finalize: edits are replaced; delete this line to keep them -->"

_SIZES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")]
_SIZES += [(10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]


def size_category(n: int) -> str:
    """The Hub's size_categories tag for ``n`` examples."""
    return next((tag for limit, tag in _SIZES if n < limit), "n>1B")


def _capture_config(loc: Location) -> dict[str, Any] | None:
    """The build's saved settings, or None (a Python writer's dataset, or a damaged file: the
    card leaves them out rather than fail a finalize whose manifest is already written)."""
    try:
        if not loc.exists(CONFIG_NAME):
            return None
        obj = json.loads(loc.read_bytes(CONFIG_NAME))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a YAML string


def dataset_card(m: Manifest, config: dict[str, Any] | None = None) -> str:
    """The card's text for manifest ``m`` (and the build's ``capture_config.json``, if any)."""
    info, t = m.info, m.info.targets
    run = (config or {}).get("run") or {}
    license_id = run.get("license")
    front = ["---"]
    if license_id:
        front.append(f"license: {_yaml_str(str(license_id))}")
    front += [
        "task_categories:\n- text-generation",
        "tags:\n- distillation\n- knowledge-distillation\n- logits\n- logitcache",
        f"size_categories:\n- {size_category(m.num_examples)}",
        "configs:\n- config_name: default\n  data_files:\n  - split: train\n"
        "    path: shard-*.arrow",
        "---",
    ]
    teacher = info.teacher
    cap = info.capture
    name = teacher.get("name_or_path") or "unknown teacher"
    rows = [
        ("teacher", f"`{name}` (revision {teacher.get('revision')}, config.json sha256 "
                    f"`{str(teacher.get('config_hash'))[:19]}`)"),
        ("tokenizer", f"fingerprint `{info.tokenizer_fingerprint}`, vocabulary {info.vocab_size}"),
        ("targets", f"per response token: {t.in_words}"),
        ("size", f"{counted(m.num_examples, 'example')}, {m.num_positions} response positions, "
                 f"{counted(len(m.shards), 'shard')}, {m.num_bytes} bytes"
                 + (f" ({m.num_bytes / m.num_positions:.1f} B/position)" if m.num_positions else "")),
        ("capture", ", ".join(f"{k} {cap[k]}" for k in (
            "mode", "temperature", "dtype", "max_length", "truncation", "seed") if k in cap)),
    ]  # fmt: skip
    templates = cap.get("templates") or {}
    for view in ("teacher", "student"):
        if view in templates:
            v = templates[view]
            ctx = v.get("context_file") or ("a shared context" if v.get("context") else "none")
            rows.append((f"{view} view", f"{v.get('render')} rendering, context: {ctx}"))
    imported = cap.get("imported")
    if isinstance(imported, dict):
        rows.append(("imported from", ", ".join(map(str, imported.get("sources", [])))))
        rows.append(("tail mass", str(imported.get("tail"))))
    skipped = m.extra.get("skipped_count")
    if skipped:
        rows.append(("skipped records", f"{skipped} (listed in manifest.json extra.skipped)"))
    if license_id:
        rows.append(("license", str(license_id)))
    table = "\n".join(f"| {k} | {v.replace('|', '/')} |" for k, v in rows)
    build = (
        "The capture's settings are in `capture_config.json`; rerun or resume it with "
        "`logitcache build --config capture_config.json`"
        + (f" (prompts: {', '.join(config['input'].get('prompts', []))})" if config else "")
        + ".\n\n"
        if config and isinstance(config.get("input"), dict)
        else ""
    )
    return f"""{chr(10).join(front)}

{MARK}

# Teacher logits of {name}: {t.label}

A logit dataset for distilling a student from `{name}`, written by {m.to_json()["created_by"]}
(format version {m.format_version}). Each row is an example: the student's prompt ids, the response
ids, and for each response token the teacher's distribution over it.

| | |
|---|---|
{table}

{build}## Reading it

With logitcache (`pip install logitcache`):

```python
from logitcache.cache.reader import open_dataset

for ex in open_dataset("PATH").iter_examples():
    print(ex.id, ex.response_ids, ex.targets)
```

With pyarrow alone: `manifest.json` lists the committed shards (only those count); each
`shard-*.arrow` is an Arrow IPC file with token ids stored as byte planes of sorted gaps (of
their rank in the shard's table, from format version 3) and probabilities in the `{t.codec}`
codec, decoded as logitcache's docs/FORMAT.md describes.
`logitcache export PATH OUT` writes plain columns (`topk_ids`, `topk_logprobs`, ...) that
polars, DuckDB and `datasets` read directly.
"""


def write_card(loc: Location, m: Manifest) -> None:
    """Replace README.md atomically with the card of manifest ``m``, unless someone wrote
    their own card there (one without :data:`MARK`): that one is kept."""
    if loc.exists(CARD_NAME) and MARK.encode() not in loc.read_bytes(CARD_NAME):
        return
    text = dataset_card(m, _capture_config(loc))
    loc.write_atomic(text.encode(), CARD_NAME, tmp_prefix=".tmp.card-", sole_writer=True)
