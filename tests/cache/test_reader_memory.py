"""keep_freed_memory: decoding stops faulting in fresh pages for every record batch (glibc)."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from logitcache.cache.writer import DatasetWriter
from tests.cache.synth import make_examples, make_info

SCRIPT = """
import resource, sys
from logitcache.cache.reader import decode_batch, keep_freed_memory, open_dataset

ds = open_dataset(sys.argv[1])
batch = ds.shard(0).record_batch(0)

def faults_per_decode():
    decode_batch(batch, ds.info)  # warm
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        decode_batch(batch, ds.info)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 20

before = faults_per_decode()
keep_freed_memory()
print(before, faults_per_decode())
"""


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt"
)
def test_decoding_reuses_freed_memory_once_kept(tmp_path: Path) -> None:
    # One record batch of ~6,000 positions of top-32 + tail draws: arrays of about 1 MB each.
    info = make_info(k=32, vocab=2000, tail_draws=32)
    with DatasetWriter(tmp_path / "ds", info, batch_rows=400) as w:
        for ex in make_examples(info, 400, max_len=30):
            w.add(ex)
    # Its own process: the setting cannot be undone, and a test before may have made it.
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "ds")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    before, after = map(float, out.split())
    assert before > 200 and after < before / 4, (before, after)
