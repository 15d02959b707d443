"""Write the committed format fixtures in tests/data/format_v1 (run once, by the commit named in
their README): small datasets of every target layout, and what the reader of that commit
decoded from them. tests/cache/test_legacy_datasets.py checks that today's reader still decodes
them bit for bit, so a refactor cannot silently change how datasets written before read.

    python -m tests.cache.legacy_fixtures tests/data/format_v1
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from logitcache.cache.format import Sampled, TopK
from logitcache.cache.reader import open_dataset
from logitcache.cache.writer import DatasetWriter

from .synth import make_examples, make_info

LAYOUTS = {
    # name: (kind, k, n, codec, vocab)
    "topk_u8_draws": ("topk", 8, 8, "u8", 300),
    "topk_u16_bigvocab": ("topk", 8, 0, "u16", 70_000),
    "topk_f16": ("topk", 4, 0, "f16", 300),
    "topk_f32_draws": ("topk", 4, 4, "f32", 300),
    "sampled": ("sampled", 0, 16, "u8", 300),
}


def decoded(path: Path) -> dict[str, np.ndarray]:
    """Every array the reader returns, keyed ``<id>/<field>``."""
    out: dict[str, np.ndarray] = {}
    for ex in open_dataset(path, verify=True).iter_examples():
        t = ex.targets
        fields = {"prompt_ids": ex.prompt_ids, "response_ids": ex.response_ids}
        if isinstance(t, TopK):
            fields |= {"ids": t.ids, "logprobs": t.logprobs, "tail_logmass": t.tail_logmass}
        draws: Sampled | None = t.tail_draws if isinstance(t, TopK) else t
        if draws is not None:
            fields |= {"draw_ids": draws.ids, "counts": draws.counts, "nunique": draws.nunique}
        out |= {f"{ex.id}/{name}": np.asarray(a) for name, a in fields.items()}
    return out


def _capture(out: Path) -> None:
    """A real capture by the tiny teacher: chat views, a context, the default targets."""
    import json
    import tempfile

    from logitcache.cache.capture import capture
    from logitcache.cache.capture_config import CaptureConfig, InputConfig, RunConfig, TeacherConfig
    from logitcache.tools.tiny import make_tiny_model, make_tiny_tokenizer, tiny_corpus

    with tempfile.TemporaryDirectory() as tmp:
        teacher = make_tiny_model(Path(tmp) / "t", make_tiny_tokenizer(Path(tmp) / "tok"))
        corpus = tiny_corpus()
        recs = [{"prompt": corpus[i], "response": corpus[i + 40]} for i in range(4)]
        (Path(tmp) / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        (Path(tmp) / "ctx.txt").write_text("Answer like a pirate, matey.")
        capture(
            CaptureConfig(
                input=InputConfig(prompts=(f"{tmp}/p.jsonl",), context=f"{tmp}/ctx.txt"),
                teacher=TeacherConfig(path=str(teacher)),
                run=RunConfig(out=str(out), progress=False),
            )
        )


def main(root: Path) -> None:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    for name, (kind, k, n, codec, vocab) in LAYOUTS.items():
        kw = {"k": k, "tail_draws": n} if kind == "topk" else {"n": n}
        info = make_info(kind, codec=codec, vocab=vocab, **kw)
        with DatasetWriter(root / name, info, shard_positions=40, batch_rows=3) as w:
            for ex in make_examples(info, 7, seed=len(name), max_len=12):
                w.add(ex)
        np.savez_compressed(root / f"{name}.npz", **decoded(root / name))
    _capture(root / "capture_chat_default")
    np.savez_compressed(root / "capture_chat_default.npz", **decoded(root / "capture_chat_default"))
    (root / "README.md").write_text(
        f"Format fixtures written by commit {commit} with `python -m tests.cache.legacy_fixtures "
        f"{root}`;\neach `<name>.npz` holds what that commit's reader decoded from `<name>/`. "
        "Do not regenerate them:\nthey stand for datasets users wrote before.\n"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
