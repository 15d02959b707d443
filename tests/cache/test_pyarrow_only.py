"""Read a dataset following docs/FORMAT.md with pyarrow, numpy and json alone.

The reading code below must not import logitcache: it is what another team would write from
the spec. It is checked against the examples that were written.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from logitcache.cache.writer import DatasetWriter

from .synth import make_examples, make_info

READER = textwrap.dedent(
    """
    import hashlib, json, os, re, sys
    import numpy as np
    import pyarrow as pa

    root = sys.argv[1]
    manifest = json.load(open(os.path.join(root, "manifest.json")))
    assert manifest["format"] == "logitcache" and manifest["format_version"] == 1
    t = manifest["targets"]
    nbytes = t["id_bytes"]
    out = {}
    for shard in manifest["shards"]:
        assert re.fullmatch(r"shard-[A-Za-z0-9_]+-\\d{6}\\.arrow", shard["file"])
        data = open(os.path.join(root, shard["file"]), "rb").read()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        table = pa.ipc.open_file(pa.py_buffer(data)).read_all()
        for row in table.to_pylist():
            P = len(row["response_ids"])
            rec = {"prompt": row["prompt_ids"], "response": row["response_ids"]}

            def gaps_of(prefix):
                planes = [np.array(row[f"{prefix}_id_b{b}"], dtype=np.int64) for b in range(nbytes)]
                return sum(p << (8 * b) for b, p in enumerate(planes))

            if t["kind"] == "sampled" or t["n"] > 0:  # sampled, or top-k with tail draws
                gaps = gaps_of("sample")
                nun = row["sample_nunique"]
                starts = np.concatenate([[0], np.cumsum(nun)]).astype(int)
                rec["draw_ids"] = [np.cumsum(gaps[a:b]).tolist() for a, b in zip(starts[:-1], starts[1:])]
                c = row["sample_counts"]
                rec["counts"] = [c[a:b] for a, b in zip(starts[:-1], starts[1:])]
            if t["kind"] == "topk":
                gaps = gaps_of("topk")
                k = t["k"]
                ids = np.cumsum(gaps.reshape(P, k), axis=1)
                v = np.array(row["topk_logprobs"], dtype=np.float64).reshape(P, k)
                tail = np.array(row["tail_logmass"], dtype=np.float64)
                if t["codec"] in ("u8", "u16"):
                    Q = 255 if t["codec"] == "u8" else 65535
                    p, pt = (v / Q) ** 2, (tail / Q) ** 2
                    total = p.sum(axis=1) + pt
                    with np.errstate(divide="ignore"):
                        v, tail = np.log(p / total[:, None]), np.log(pt / total)
                rec.update(ids=ids.tolist(), logprobs=v.tolist(), tail=tail.tolist())
            out[row["id"]] = rec
    json.dump(out, sys.stdout)
    """
)


@pytest.mark.parametrize(
    ("kind", "codec", "vocab"),
    [
        ("topk", "u8", 1000),
        ("topk", "f16", 70_000),
        ("topk", "u16", 300),
        ("sampled", "u8", 70_000),
        ("topk+draws", "u8", 70_000),
    ],
)
def test_read_with_pyarrow_alone(tmp_path, kind, codec, vocab):
    tail_draws = 10 if kind == "topk+draws" else 0
    kind = kind.removesuffix("+draws")
    info = make_info(kind, k=6, n=10, codec=codec, vocab=vocab, tail_draws=tail_draws)
    examples = make_examples(info, 8, max_len=12)
    with DatasetWriter(tmp_path / "ds", info, shard_positions=30) as w:
        for ex in examples:
            w.add(ex)
    script = tmp_path / "reader.py"
    script.write_text(READER)
    # Importing logitcache in the reader would fail: the spec alone must suffice.
    code = f"import sys; sys.modules['logitcache'] = None; sys.argv = ['r', {str(tmp_path / 'ds')!r}]; exec(open({str(script)!r}).read())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(proc.stdout)
    assert sorted(got) == sorted(e.id for e in examples)
    for ex in examples:
        rec = got[ex.id]
        assert (
            rec["prompt"] == ex.prompt_ids.tolist() and rec["response"] == ex.response_ids.tolist()
        )
        t = ex.targets
        if kind == "topk":
            order = np.argsort(t.ids, axis=1)
            assert rec["ids"] == np.take_along_axis(t.ids, order, 1).tolist()
            want = np.take_along_axis(t.logprobs, order, 1)
            if ex.num_positions:
                tol = {"f16": 0.01, "u16": 1e-3, "u8": 0.5}[codec]
                big = want > -3  # log-space error grows for tiny p under sqrt codecs
                assert np.allclose(np.array(rec["logprobs"])[big], want[big], atol=tol)
        draws = t.tail_draws if kind == "topk" else t
        if draws is not None:
            starts = np.concatenate([[0], np.cumsum(draws.nunique)])
            pairs = list(itertools.pairwise(starts))
            assert rec["draw_ids"] == [draws.ids[a:b].tolist() for a, b in pairs]
            assert rec["counts"] == [draws.counts[a:b].tolist() for a, b in pairs]
        assert ("draw_ids" in rec) == (draws is not None)
