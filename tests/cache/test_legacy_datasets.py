"""Datasets written before read identically after: the committed fixtures in tests/data/format_v1
(written by the commit named in their README) decode bit for bit to what that commit decoded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from logitcache.cache.reader import open_dataset
from logitcache.cache.verify import verify_dataset

from .legacy_fixtures import LAYOUTS, decoded

ROOT = Path(__file__).parent.parent / "data" / "format_v1"


@pytest.mark.parametrize("name", [*LAYOUTS, "capture_chat_default"])
def test_dataset_written_before_reads_identically(name: str, tmp_path: Path) -> None:
    folder = shutil.copytree(ROOT / name, tmp_path / name)  # reading must not need to write
    want = dict(np.load(ROOT / f"{name}.npz"))
    got = decoded(folder)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    # The description reads back as stored: what a resume or merge compares against.
    stored = json.loads((ROOT / name / "manifest.json").read_text())
    info = open_dataset(folder).info.to_json()
    if stored["targets"]["kind"] == "topk" and stored["targets"]["n"] == 0:
        # docs/FORMAT.md: no draws, no "sampling"; these manifests said "multinomial" there
        del stored["targets"]["sampling"]
    for group in ("tokenizer", "targets", "teacher", "capture"):
        assert info[group] == stored[group], group
    assert verify_dataset(str(folder)).ok
