"""Benchmark export to plain columns and import back, beside the native format, in one run.

Prints, per target layout, bytes/position of the native dataset and of its Parquet and Arrow
exports, and positions/s of a native read (decode to numpy), an export and an import. Synthetic
peaked targets (tools/synth.py) over a 49,152-id vocabulary, so ids spread as a real tokenizer's.

    python -m logitcache.tools.bench.interchange                  # 2,000 examples
    python -m logitcache.tools.bench.interchange --examples 500
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from logitcache.cache.export import export_dataset
from logitcache.cache.importer import ImportConfig, ImportRunConfig, ValuesConfig, import_plain
from logitcache.cache.reader import open_dataset
from logitcache.tools.synth import synth_examples, synth_info, write_synth
from logitcache.tools.tiny import make_tiny_tokenizer

VOCAB = 49_152
LAYOUTS = [("top-8", 8, "u8"), ("top-32", 32, "u8"), ("top-32", 32, "f16")]


def _size(folder: Path, suffix: str) -> int:
    return sum(p.stat().st_size for p in folder.rglob(f"*{suffix}"))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--max-len", type=int, default=256, help="response lengths are 1..max-len")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-interchange-"))
    tok = root / "tok"
    make_tiny_tokenizer(tok)  # only its fingerprint is used; --vocab-size gives the width
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tok)  # import transformers outside the timed import
    head = "| targets | codec | native B/pos | Parquet B/pos | Arrow B/pos | native read pos/s | "
    print(head + "export Parquet pos/s | export Arrow pos/s | import Parquet pos/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, k, codec in LAYOUTS:
        info = synth_info("topk", k=k, codec=codec, vocab=VOCAB)
        base = root / f"{name}-{codec}"
        examples = synth_examples(info, args.examples, max_len=args.max_len, seed=1)
        write_synth(base / "native", info, examples, shard_positions=1 << 16)
        del examples
        ds = open_dataset(base / "native")
        P = ds.num_positions
        read = _timed(lambda ds=ds: [b for b in ds.iter_batches()])
        exp_pq = _timed(lambda b=base: export_dataset(b / "native", b / "pq", "parquet"))
        exp_ar = _timed(lambda b=base: export_dataset(b / "native", b / "ar", "arrow"))
        cfg = ImportConfig(
            run=ImportRunConfig(tokenizer=str(tok), vocab_size=VOCAB),
            values=ValuesConfig(codec=codec),  # type: ignore[arg-type]
        )
        imp = _timed(lambda b=base, c=cfg: import_plain([str(b / "pq" / "data")], b / "back", c))
        print(
            f"| {name} | {codec} | {ds.manifest.num_bytes / P:.1f} | "
            f"{_size(base / 'pq', '.parquet') / P:.1f} | {_size(base / 'ar', '.arrow') / P:.1f} | "
            f"{P / read / 1e6:.2f} M | {P / exp_pq / 1e6:.2f} M | {P / exp_ar / 1e6:.2f} M | "
            f"{P / imp / 1e3:.0f} k |"
        )
    print(f"({args.examples} examples per layout, {P} positions in the last; files under {root})")


if __name__ == "__main__":
    main()
