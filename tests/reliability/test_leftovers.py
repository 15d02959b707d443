"""A writer killed mid-commit leaves temporary files; restarting it removes every one of them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from logitcache.cache.reader import committed_ids, open_dataset
from logitcache.cache.writer import DatasetWriter
from logitcache.tools.synth import synth_examples, synth_info

# Dies (like SIGKILL: no cleanup runs) right before the rename that commits a file in `where`.
DIE_BEFORE_RENAME = """
import os, sys
from logitcache.cache.writer import DatasetWriter
from logitcache.tools.synth import synth_examples, synth_info

real_replace, where = os.replace, sys.argv[2]
commits = []

def replace(src, dst):
    if os.path.basename(os.path.dirname(dst)) == where or os.path.basename(dst).startswith(where):
        commits.append(dst)
        if len(commits) == 3:
            os._exit(9)
    real_replace(src, dst)

os.replace = replace
info = synth_info("topk")
w = DatasetWriter(sys.argv[1], info, shard_positions=40)
for ex in synth_examples(info, 30):
    w.add(ex)
w.close()
"""


@pytest.mark.parametrize("where", ["_parts", "shard-"], ids=["journal", "shard"])
def test_restarted_writer_removes_its_temporary_files(tmp_path: Path, where: str) -> None:
    ds = tmp_path / "ds"
    p = subprocess.run([sys.executable, "-c", DIE_BEFORE_RENAME, str(ds), where], timeout=120)
    assert p.returncode == 9
    leftovers = sorted(str(f.relative_to(ds)) for f in ds.rglob(".tmp-*"))
    assert len(leftovers) == 1 and leftovers[0].startswith(
        "_parts/.tmp-w0-" if where == "_parts" else ".tmp-w0-"
    ), leftovers

    info = synth_info("topk")
    done = committed_ids(ds)
    with DatasetWriter(ds, info, shard_positions=40) as w:  # the rerun of the same writer
        for ex in synth_examples(info, 30):
            if ex.id not in done:
                w.add(ex)
    assert list(ds.rglob(".tmp-*")) == []
    ids = [e.id for e in open_dataset(ds, verify=True).iter_examples()]
    assert sorted(ids) == sorted(f"ex{i}" for i in range(30))
