"""Read a dataset following docs/FORMAT.md with pyarrow, numpy and json alone.

The reading code below (READER, VIEWS) must not import logitcache: it is what another team
would write from the spec. It is checked against the examples that were written, and the
spec's error bounds, views and manifest fields against what it reads.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from logitcache.cache import codecs
from logitcache.cache.codecs import tail_logmass
from logitcache.cache.format import Example, TopK
from logitcache.cache.merge import merge_datasets
from logitcache.cache.reader import open_dataset
from logitcache.cache.writer import DatasetWriter

from .synth import make_examples, make_info

READER = textwrap.dedent(
    """
    import base64, hashlib, json, os, re, sys
    import numpy as np
    import pyarrow as pa

    def ids_by_rank(meta, kind, vocab):
        # FORMAT.md, Id ranks (version 3): the id of each rank, or None where ids are stored as is
        value = (meta or {}).get(f"logitcache.{kind}_id_ranks".encode())
        if value is None:
            return None
        obj = json.loads(value)
        raw = pa.decompress(base64.b64decode(obj["zstd"]), decompressed_size=4 * obj["count"],
                            codec="zstd", asbytes=True)
        table = np.frombuffer(raw, dtype="<i4")
        return np.concatenate([table, np.setdiff1d(np.arange(vocab), table)])

    def columns(t):
        # FORMAT.md, Shards: exactly these columns, in this order
        planes = lambda prefix: [f"{prefix}_id_b{b}" for b in range(t["id_bytes"])]
        cols = ["id", "prompt_ids", "response_ids"]
        if t["kind"] == "topk":
            cols += planes("topk") + ["topk_logprobs", "tail_logmass"]
            cols += ["topk_count"] if "k_mass" in t else []  # version 2: variable k
        if t["kind"] == "sampled" or t["n"] > 0:
            cols += planes("sample") + ["sample_counts", "sample_nunique"]
        return cols

    def read(root):
        manifest = json.load(open(os.path.join(root, "manifest.json")))
        t = manifest["targets"]
        variable = "k_mass" in t or "n_rate" in t  # FORMAT.md: version 2 or later then
        assert manifest["format"] == "logitcache"
        assert manifest["format_version"] in ((2, 3) if variable else (1, 2, 3))
        nbytes, vocab = t["id_bytes"], manifest["tokenizer"]["vocab_size"]
        out = {}
        for shard in manifest["shards"]:
            assert re.fullmatch(r"shard-[A-Za-z0-9_]+-\\d{6}\\.arrow", shard["file"])
            data = open(os.path.join(root, shard["file"]), "rb").read()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
            table = pa.ipc.open_file(pa.py_buffer(data)).read_all()
            assert table.schema.names == columns(t), table.schema.names
            by_rank = {k: ids_by_rank(table.schema.metadata, k, vocab) for k in ("topk", "sample")}
            for row in table.to_pylist():
                P = len(row["response_ids"])
                rec = {"prompt": row["prompt_ids"], "response": row["response_ids"]}

                def gaps_of(prefix):
                    planes = [np.array(row[f"{prefix}_id_b{b}"], dtype=np.int64) for b in range(nbytes)]
                    return sum(p << (8 * b) for b, p in enumerate(planes))

                def ids_of(prefix, gaps, values):
                    # the summed gaps are ids, or ranks (version 3): then ids, sorted, values with them
                    ids = np.cumsum(gaps)
                    if by_rank[prefix] is None:
                        return ids.tolist(), list(values)
                    ids = by_rank[prefix][ids]
                    order = np.argsort(ids)
                    return ids[order].tolist(), [values[i] for i in order]

                if t["kind"] == "sampled" or t["n"] > 0:  # sampled, or top-k with tail draws
                    gaps = gaps_of("sample")
                    nun = row["sample_nunique"]
                    starts = np.concatenate([[0], np.cumsum(nun)]).astype(int)
                    c = row["sample_counts"]
                    both = [ids_of("sample", gaps[a:b], c[a:b]) for a, b in zip(starts[:-1], starts[1:])]
                    rec["draw_ids"], rec["counts"] = [i for i, _ in both], [n for _, n in both]
                if t["kind"] == "topk":
                    # k ids per position, or topk_count[p] of them (version 2, k_mass set)
                    kp = row["topk_count"] if "k_mass" in t else [t["k"]] * P
                    starts = np.concatenate([[0], np.cumsum(kp)]).astype(int)
                    gaps = gaps_of("topk")
                    vals = np.array(row["topk_logprobs"], dtype=np.float64)
                    tail = np.array(row["tail_logmass"], dtype=np.float64)
                    ids, lps, sums = [], [], []
                    for j, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
                        pos_ids, v = ids_of("topk", gaps[a:b], vals[a:b])
                        ids.append(pos_ids)
                        v = np.array(v, dtype=np.float64)
                        if t["codec"] in ("u8", "u16"):  # codes of sqrt(p): decode, renormalize
                            Q = 255 if t["codec"] == "u8" else 65535
                            p, pt = (v / Q) ** 2, (tail[j] / Q) ** 2
                            total = p.sum() + pt
                            with np.errstate(divide="ignore"):
                                v, tail[j] = np.log(p / total), np.log(pt / total)
                        else:  # f32, f16: log p and log p_tail, used as stored
                            total = np.exp(v).sum() + np.exp(tail[j])
                        lps.append(v.tolist())
                        sums.append(float(total))
                    rec.update(ids=ids, logprobs=lps, tail=tail.tolist(), raw_sum=sums)
                out[row["id"]] = rec
        return {"targets": t, "examples": out}

    json.dump({root: read(root) for root in sys.argv[2:]}, open(sys.argv[1], "w"))
    """
)


def run_spec_reader(script: str, tmp_path: Path, *args: str) -> Any:
    """Run ``script`` with ``args`` in a fresh interpreter where importing logitcache fails:
    the spec alone must suffice. The script writes its JSON answer to its first argument."""
    path, answer = tmp_path / "spec_reader.py", tmp_path / "answer.json"
    path.write_text(script)
    argv = ["r", str(answer), *args]
    code = f"import sys; sys.modules['logitcache'] = None; sys.argv = {argv!r}; exec(open({str(path)!r}).read())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(answer.read_text())


def by_id_order(t: TopK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The written top-k sorted by id as stored: ids, log-probs (float32 → float64), and tail."""
    order = np.argsort(t.ids, axis=1)
    lp = np.take_along_axis(t.logprobs, order, 1).astype(np.float64)
    return np.take_along_axis(t.ids, order, 1), lp, t.tail_logmass.astype(np.float64)


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
@pytest.mark.parametrize("rank_min_count", [1, 10**9])  # version 3: every id ranked; none
def test_read_with_pyarrow_alone(tmp_path, monkeypatch, kind, codec, vocab, rank_min_count):
    monkeypatch.setattr(codecs, "RANK_MIN_COUNT", rank_min_count)
    tail_draws = 10 if kind == "topk+draws" else 0
    kind = kind.removesuffix("+draws")
    info = make_info(kind, k=6, n=10, codec=codec, vocab=vocab, tail_draws=tail_draws)
    examples = make_examples(info, 8, max_len=12)
    with DatasetWriter(tmp_path / "ds", info, shard_positions=30) as w:
        for ex in examples:
            w.add(ex)
    shards = sorted((tmp_path / "ds").glob("shard-*.arrow"))
    tables = [
        key
        for shard in shards
        for key in pa.ipc.open_file(shard).schema.metadata
        if key.endswith(b"_id_ranks")
    ]
    assert len(tables) == (len(shards) * (1 + bool(tail_draws)) if rank_min_count == 1 else 0)
    got = run_spec_reader(READER, tmp_path, str(tmp_path / "ds"))[str(tmp_path / "ds")]
    if kind == "sampled":  # FORMAT.md: k is 0 and codec means nothing
        assert got["targets"]["k"] == 0
    got = got["examples"]
    assert sorted(got) == sorted(e.id for e in examples)
    for ex in examples:
        rec = got[ex.id]
        assert (
            rec["prompt"] == ex.prompt_ids.tolist() and rec["response"] == ex.response_ids.tolist()
        )
        t = ex.targets
        if kind == "topk":
            assert isinstance(t, TopK)
            ids, want, _ = by_id_order(t)
            assert rec["ids"] == ids.tolist()
            if ex.num_positions:
                tol = {"f16": 0.01, "u16": 1e-3, "u8": 0.5}[codec]
                big = want > -3  # log-space error grows for tiny p under sqrt codecs
                assert np.allclose(np.array(rec["logprobs"])[big], want[big], atol=tol)
        draws = t.tail_draws if isinstance(t, TopK) else t
        if draws is not None:
            starts = np.concatenate([[0], np.cumsum(draws.nunique)])
            pairs = list(itertools.pairwise(starts))
            assert rec["draw_ids"] == [draws.ids[a:b].tolist() for a, b in pairs]
            assert rec["counts"] == [draws.counts[a:b].tolist() for a, b in pairs]
        assert ("draw_ids" in rec) == (draws is not None)
        assert ("logprobs" in rec) == (kind == "topk")


# --------------------------------------------------------------------------- error bounds


def peaked_logprobs(rng: np.random.Generator, positions: int, vocab: int) -> np.ndarray:
    """Peaked, long-tailed rows, as FORMAT.md's measurement: Zipf-like logits at a random
    sharpness per row, 30% of rows near-certain (one id far above the rest)."""
    base = rng.normal(size=(positions, vocab)) * 2.0 - 1.5 * np.log1p(rng.permutation(vocab))
    logits = base * np.exp(rng.uniform(np.log(0.2), np.log(6.0), size=(positions, 1)))
    sure = rng.random(positions) < 0.3
    logits[sure, rng.integers(0, vocab, sure.sum())] += rng.uniform(5, 25, sure.sum())
    return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)


def peaked_examples(k: int, vocab: int, rows: int, seed: int) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(rows):
        lp = peaked_logprobs(rng, 50, vocab)
        ids = np.argpartition(-lp, k - 1, axis=1)[:, :k]
        top = np.take_along_axis(lp, ids, axis=1).astype(np.float32)
        targets = TopK(ids, top, tail_logmass(top))
        resp = rng.integers(0, vocab, size=50)
        out.append(Example(f"e{i}", rng.integers(0, vocab, size=3), resp, targets))
    return out


def test_codec_error_bounds_as_documented(tmp_path):
    """FORMAT.md's error bounds, on what a pyarrow-only reader decodes: the proven ones on
    every value, and the measured ones (with margin) on realistic distributions."""
    vocab, rows = 4096, 20  # 1,000 positions per dataset
    written: dict[str, list[Example]] = {}
    for k in (8, 32, 64):
        examples = peaked_examples(k, vocab, rows, seed=k)
        for codec in ("f32", "f16", "u8", "u16"):
            root = tmp_path / f"k{k}-{codec}"
            with DatasetWriter(root, make_info("topk", k=k, codec=codec, vocab=vocab)) as w:
                for ex in examples:
                    w.add(ex)
            written[str(root)] = examples
    got = run_spec_reader(READER, tmp_path, *written)
    for root, examples in written.items():
        k, codec = got[root]["targets"]["k"], got[root]["targets"]["codec"]
        truth, dec, raw_sum = [], [], []
        for ex in examples:
            rec = got[root]["examples"][ex.id]
            assert isinstance(ex.targets, TopK)
            ids, lp, tail = by_id_order(ex.targets)
            assert rec["ids"] == ids.tolist()
            truth.append(np.concatenate([lp, tail[:, None]], axis=1))
            dec.append(np.concatenate([rec["logprobs"], np.array(rec["tail"])[:, None]], axis=1))
            raw_sum.append(rec["raw_sum"])
        lp, got_lp, sums = np.concatenate(truth), np.concatenate(dec), np.concatenate(raw_sum)
        where = f"{codec} k={k}"
        zero = np.isneginf(lp)  # the near-certain rows' tail: no mass left in float32
        assert zero.any() and np.array_equal(np.isneginf(got_lp), zero), where
        lp[zero] = got_lp[zero] = -1000.0  # exp → 0; for the comparisons below
        if codec == "f32":  # exact
            np.testing.assert_array_equal(got_lp, lp, err_msg=where)
            assert np.abs(sums - 1).max() <= 1e-6, where
        elif codec == "f16":
            err = np.abs(got_lp - lp)
            assert np.all(err <= np.maximum(2**-11 * np.abs(lp), 2**-25)), where
            assert np.abs(sums - 1).max() <= (k + 1) ** 2**-11 - 1 + 1e-7, where
        else:
            q = 255 if codec == "u8" else 65535
            e = math.sqrt(k + 1) / q + (k + 1) / q**2
            p, p_new = np.exp(lp), np.exp(got_lp)
            err = np.abs(np.sqrt(p_new) - np.sqrt(p))
            rounded = p >= 1 / (4 * q**2)  # else raised to code 1
            raw = np.where(rounded, 0.5 / q, 1 / q)
            # proven: the sums as decoded, each value after renormalizing, the new sums
            assert np.abs(sums - 1).max() <= e, where
            assert np.all(err <= raw + np.sqrt(p_new) * e / (2 - e) + 2e-7), where
            assert np.abs(p_new.sum(axis=1) - 1).max() <= 1e-6, where
            # measured (FORMAT.md: 0.82/Q and 2.2/Q at worst over 200,000 positions per k)
            assert err[rounded].max() <= 1 / q, where
            assert np.abs(sums - 1).max() <= 3 / q, where


# --------------------------------------------------------------------------- views

VIEWS = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import pyarrow as pa
    from transformers import AutoTokenizer

    root = sys.argv[2]
    manifest = json.load(open(os.path.join(root, "manifest.json")))
    config = json.load(open(os.path.join(root, "capture_config.json")))
    tpl = manifest["capture"]["templates"]
    tok = AutoTokenizer.from_pretrained(config["teacher"]["tokenizer"] or config["teacher"]["path"])
    if tpl.get("chat_template") is not None:
        tok.chat_template = tpl["chat_template"]
    assert hashlib.sha256(tok.chat_template.encode()).hexdigest() == tpl["chat_template_sha256"]

    def as_messages(view):
        return [{"role": "user", "content": view}] if isinstance(view, str) else view

    def teacher_view(rec, chat):
        base = rec.get("teacher", rec.get("student", rec.get("prompt", rec.get("messages"))))
        contexts = [c for c in (tpl["teacher"]["context"], rec.get("context")) if c]
        if not chat:
            return "".join(contexts) + base
        system = [c for c in contexts if isinstance(c, str)]
        msgs = [m for c in contexts if not isinstance(c, str) for m in c] + as_messages(base)
        if system:
            if msgs[0]["role"] == "system":
                system.append(msgs[0]["content"])
                msgs = msgs[1:]
            msgs = [{"role": "system", "content": "\\n\\n".join(system)}] + msgs
        return msgs

    def tokens(view, chat, r):
        if chat:
            msgs = as_messages(view)
            prompt_text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            conv = tok.apply_chat_template(msgs + [{"role": "assistant", "content": r}], tokenize=False)
            assert conv.startswith(prompt_text)
            turn = conv[len(prompt_text):]
            turn = r + turn[len(r):].rstrip() if turn.startswith(r) else turn.rstrip()
            prompt = tok(prompt_text, add_special_tokens=False)["input_ids"]
            whole = tok(prompt_text + turn, add_special_tokens=False)["input_ids"]
        else:
            prompt = tok(view, add_special_tokens=True)["input_ids"]
            whole = tok(view + r, add_special_tokens=True)["input_ids"]
        assert whole[: len(prompt)] == prompt
        return prompt, whole[len(prompt):]

    out = {"stored": {}, "recomputed": {}, "targets": manifest["targets"],
           "config_targets": config["targets"]}
    for shard in manifest["shards"]:
        table = pa.ipc.open_file(os.path.join(root, shard["file"])).read_all()
        for row in table.to_pylist():
            out["stored"][row["id"]] = [row["prompt_ids"], row["response_ids"]]
    for path in config["input"]["prompts"]:
        for line in open(path):
            rec = json.loads(line)
            student = rec.get("student", rec.get("prompt", rec.get("messages")))
            chat = tpl["student"]["render"] == "chat" or not isinstance(student, str)
            s_prompt, s_resp = tokens(student, chat, rec["response"])
            t_prompt, t_resp = tokens(teacher_view(rec, chat), chat, rec["response"])
            assert s_resp == t_resp
            out["recomputed"][rec["id"]] = {"student": s_prompt, "teacher": t_prompt, "response": s_resp}
    json.dump(out, open(sys.argv[1], "w"))
    """
)


def test_views_recomputed_from_the_manifest(tmp_path, tiny_teacher_dir):
    """A chat capture in score mode: from the manifest's view description, capture_config.json,
    the records and the tokenizer, a pyarrow-only reader recomputes the stored prompt and
    response ids and the teacher's view; each response ends with the end-of-turn id."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from logitcache.cache.capture import capture
    from logitcache.cache.capture_config import (
        DEFAULT_TARGETS,
        CaptureConfig,
        InputConfig,
        RunConfig,
        TargetConfig,
        TeacherConfig,
    )
    from logitcache.tools.tiny import tiny_corpus

    c = tiny_corpus()
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    recs = [
        {"id": "text", "prompt": c[0], "response": c[5]},
        {"id": "system", "messages": [{"role": "system", "content": "Be brief."}, user(c[1])],
         "response": c[6]},
        {"id": "own-context", "prompt": c[2], "context": "Speak like a sailor.",
         "response": c[7] + " "},  # the response's own trailing space is kept
        {"id": "multi-turn", "messages": [user(c[3]), {"role": "assistant", "content": c[4]},
                                          user(c[8])], "response": c[9]},
        {"id": "two-views", "teacher": c[10] + " " + c[11], "student": c[10], "response": c[12]},
    ]  # fmt: skip
    prompts, ctx = tmp_path / "p.jsonl", tmp_path / "ctx.txt"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in recs))
    ctx.write_text("Answer like a pirate.")
    ds = tmp_path / "ds"
    capture(
        CaptureConfig(
            input=InputConfig(prompts=(str(prompts),), context=str(ctx), render="chat"),
            teacher=TeacherConfig(path=str(tiny_teacher_dir)),
            run=RunConfig(out=str(ds), progress=False),
            # --sampling keeps its default
            targets=TargetConfig(spec=replace(DEFAULT_TARGETS, k=8, n=0, codec="f32")),
        )
    )
    got = run_spec_reader(VIEWS, tmp_path, str(ds))
    assert sorted(got["stored"]) == sorted(r["id"] for r in recs)
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    newline = {i for t in ("\n", "x\n") for i in tok(t, add_special_tokens=False)["input_ids"]}
    newline -= set(tok("x", add_special_tokens=False)["input_ids"])
    for rid, (prompt_ids, response_ids) in got["stored"].items():
        want = got["recomputed"][rid]
        assert prompt_ids == want["student"], rid  # (1) the student's view, recomputed
        assert response_ids == want["response"], rid
        assert response_ids[-1] == tok.eos_token_id, rid  # (2) ends with the end of turn,
        assert response_ids[-2] not in newline, rid  # with no newline before or after it

    # The teacher's view, recomputed, is what the teacher was run on: its targets match.
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    stored = {e.id: e for e in open_dataset(ds).iter_examples()}
    for rid, want in got["recomputed"].items():
        ids = torch.tensor([want["teacher"] + want["response"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        at = logp[len(want["teacher"]) - 1 : -1]  # (R, V): the rows predicting the response
        t = stored[rid].targets
        assert isinstance(t, TopK)
        ref = torch.gather(at, 1, torch.as_tensor(t.ids, dtype=torch.long)).numpy()
        np.testing.assert_allclose(t.logprobs, ref, atol=1e-4, err_msg=rid)

    # (5) no draws: the manifest has no sampling scheme; capture_config.json keeps the flag
    assert got["targets"]["n"] == 0 and "sampling" not in got["targets"]
    assert got["config_targets"]["sampling"] == "systematic"


# --------------------------------------------------------------------------- sampling


LEGACY = Path(__file__).parent.parent / "data" / "format_v1"


def test_sampling_without_draws_and_datasets_written_before(tmp_path):
    """FORMAT.md: a top-k dataset without draws records no sampling scheme. One written
    before, which says "multinomial" there, still reads, resumes and merges with a new one."""
    old = Path(shutil.copytree(LEGACY / "topk_f16", tmp_path / "old"))
    assert json.loads((old / "manifest.json").read_text())["targets"]["sampling"] == "multinomial"
    info = make_info("topk", k=4, codec="f16", vocab=300)  # as the fixture was written
    assert info.targets.sampling is None
    assert "sampling" not in info.to_json()["targets"]
    assert open_dataset(old).info.targets == info.targets

    with DatasetWriter(tmp_path / "new", info) as w:  # a dataset written now
        for ex in make_examples(info, 3, prefix="new"):
            w.add(ex)
    assert "sampling" not in json.loads((tmp_path / "new" / "manifest.json").read_text())["targets"]

    with DatasetWriter(old, info, writer_id="w1") as w:  # resume the old one
        for ex in make_examples(info, 2, seed=1, prefix="more"):
            w.add(ex)
    merged = merge_datasets(tmp_path / "merged", [old, tmp_path / "new"])
    assert merged.num_examples == 7 + 2 + 3
    assert len(list(open_dataset(old, verify=True).iter_examples())) == 7 + 2
    assert len(list(open_dataset(tmp_path / "merged", verify=True).iter_examples())) == 12
    got = run_spec_reader(READER, tmp_path, str(old), str(tmp_path / "merged"))
    assert len(got[str(tmp_path / "merged")]["examples"]) == 12
    assert got[str(old)]["targets"].get("sampling") is None
