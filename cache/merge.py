"""Combine logit datasets into one, refusing any whose targets do not mean the same thing."""

from __future__ import annotations

import hashlib
import os
from dataclasses import fields
from typing import Any

from .card import write_card
from .errors import IncompatibleError, InputError
from .format import MANIFEST_NAME, TargetSpec, shard_name
from .manifest import Manifest, ShardEntry, check_compatible, load_manifest, merge_extra
from .paths import output_problem
from .reader import ShardReader, repair_advice
from .storage import Location


def merge_datasets(
    out: str | os.PathLike[str],
    inputs: list[str | os.PathLike[str]],
    *,
    allow_different_teachers: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """Copy every shard of ``inputs`` into ``out`` and write one manifest.

    Compatible means: same tokenizer fingerprint and vocab, same target kind, k or n and codec,
    same capture temperature, and (unless allowed) the same teacher. Example ids must stay
    unique across the inputs. Shards are renamed ``shard-d<input>_<writer>-<seq>.arrow``;
    their bytes, and so their checksums, are unchanged.
    """
    if not inputs:
        raise IncompatibleError("merge: give at least one input dataset")
    problem = output_problem(out, f"OUT {os.fspath(out)}", folder=True)
    if problem is not None:
        raise InputError(problem)
    dst = Location(out, storage_options)
    if dst.exists(MANIFEST_NAME):
        raise IncompatibleError(f"merge: {dst} already holds a dataset; choose a new output folder")
    sources = [Location(u, storage_options) for u in inputs]
    named: dict[str, Location] = {}
    for loc in sources:  # the same folder twice would hold every id twice
        key = os.path.realpath(loc.path()) if loc.is_local else loc.url_of()
        if key in named:
            raise InputError(
                f"merge: {named[key]} and {loc} are the same dataset ({key}), named twice; "
                "give each input once"
            )
        named[key] = loc
    manifests = [load_manifest(loc) for loc in sources]
    for loc, m in zip(sources[1:], manifests[1:], strict=True):
        try:
            check_compatible(
                manifests[0].info,
                m.info,
                f"merge: {loc} against {sources[0]}",
                allow_teachers=allow_different_teachers,
            )
        except IncompatibleError as e:
            raise IncompatibleError(
                f"{e}. Datasets merge when their tokenizer, vocab_size, targets "
                f"({', '.join(f.name for f in fields(TargetSpec))}) and capture temperature are "
                "the same, and their teacher too unless --allow-different-teachers is given"
            ) from None
    _check_unique_ids(sources, manifests)
    # Shards are copied as they are: the newest input version says what they may hold.
    newest = max(m.format_version for m in manifests)
    merged = Manifest(info=manifests[0].info, format_version=newest)
    merged.extra["merged_from"] = []
    dst.makedirs()
    for d, (loc, m) in enumerate(zip(sources, manifests, strict=True)):
        for s in m.shards:
            data = loc.read_bytes(s.file)
            if hashlib.sha256(data).hexdigest() != s.sha256:
                raise IncompatibleError(
                    f"merge: shard {s.file} of {loc} fails its checksum: "
                    f"{repair_advice(loc, verify=True)}; then merge again"
                )
            writer, seq = s.file[len("shard-") : -len(".arrow")].rsplit("-", 1)
            name = shard_name(f"d{d}_{writer}", int(seq))
            dst.write_atomic(data, name)
            merged.shards.append(ShardEntry(name, s.rows, s.positions, s.bytes, s.sha256))
        merged.extra = merge_extra(
            merged.extra, {k: v for k, v in m.extra.items() if k not in ("merged_from", "parts")}
        )
        merged.extra["merged_from"].append(
            {
                "url": str(loc),
                "teacher": m.info.teacher,
                "capture": m.info.capture,
                "examples": m.num_examples,
            }
        )
    dst.write_atomic(merged.dumps(), MANIFEST_NAME, tmp_prefix=".tmp.manifest-", sole_writer=True)
    write_card(dst, merged)
    return merged


def _check_unique_ids(sources: list[Location], manifests: list[Manifest]) -> None:
    seen: dict[str, str] = {}
    for loc, m in zip(sources, manifests, strict=True):
        for s in m.shards:
            reader = ShardReader(loc, s, m.info)
            for i in range(reader.num_batches):
                for ex_id in reader.record_batch(i).column("id").to_pylist():
                    if ex_id in seen and seen[ex_id] != str(loc):
                        raise IncompatibleError(
                            f"merge: example id {ex_id!r} is in both {seen[ex_id]} and {loc}; "
                            "ids must be unique in a dataset: merge only one of them, or give "
                            'the prompts of one their own ids (the records\' "id" field) and '
                            "capture them again into a new folder"
                        )
                    seen[ex_id] = str(loc)
