"""Peak RSS while streaming datasets 1×, 10× and 100× the shuffle buffer."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from logitcache.cache.writer import DatasetWriter

from ..synth import synth_examples, synth_info

# --------------------------------------------------------------------------- memory


def rss_child(url: str, buffer: int, iterate: bool) -> None:
    """Hidden subcommand: stream ``url`` through LogitStream and print peak RSS as JSON."""
    import resource

    from logitcache.train.stream import LogitStream

    stream = LogitStream(url, seed=0, shuffle_buffer=buffer, epochs=1)
    n = sum(1 for _ in stream.items(0, 1)) if iterate else 0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"examples": n, "peak_mib": peak_kib / 1024, "pending": stream.peak_pending}))


def measure_rss(url: str | Path, buffer: int, iterate: bool = True) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "logitcache.tools.reliability", "_rss", str(url), str(buffer)]
    out = subprocess.run(
        cmd + ([] if iterate else ["--no-iterate"]), check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def cmd_rss(args: argparse.Namespace) -> None:
    B = args.buffer
    info = synth_info("topk", k=args.k, vocab=32768)
    root = Path(tempfile.mkdtemp(prefix="lc-rss-"))
    try:
        print(
            f"LogitStream, shuffle_buffer={B}, top-{args.k} u8, responses of 1-{args.max_len} "
            f"tokens, shards of {args.shard_positions:,} positions; one reader, one epoch"
        )
        for mult in (1, 10, 100):
            ds = root / f"x{mult}"
            with DatasetWriter(ds, info, shard_positions=args.shard_positions) as w:
                for part in range(mult):  # generated in slices: the generator is not measured
                    for ex in synth_examples(
                        info, B, max_len=args.max_len, seed=part, prefix=f"p{part}-"
                    ):
                        w.add(ex)
            m = json.loads((ds / "manifest.json").read_text())
            base = measure_rss(ds, B, iterate=False)
            run = measure_rss(ds, B)
            assert run["examples"] == mult * B
            print(
                f"  {mult:3d}× buffer: {m['num_examples']:6,} examples, {m['num_positions']:9,} "
                f"positions, {len(m['shards']):3d} shards, {m['num_bytes'] / 2**20:7.1f} MiB "
                f"on disk | peak RSS {run['peak_mib']:6.0f} MiB (imports + open: "
                f"{base['peak_mib']:.0f} MiB; streaming adds {run['peak_mib'] - base['peak_mib']:.0f}"
                f" MiB); most buffered: {run['pending']}"
            )
            shutil.rmtree(ds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
