"""Capture on the tiny random teacher, checked against a reference forward on the full view."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from logitcache.cache.capture import capture
from logitcache.cache.capture_config import (
    CONFIG_NAME,
    DEFAULT_TARGETS,
    CaptureConfig,
    GenerateConfig,
    InputConfig,
    RunConfig,
    TargetConfig,
    TeacherConfig,
)
from logitcache.cache.errors import IncompatibleError, InputError
from logitcache.cache.format import Example
from logitcache.cache.reader import committed_ids, open_dataset
from logitcache.tools.tiny import tiny_corpus

CONTEXT = "Answer like a pirate, matey."
TEACHER_CTX = [{"role": "system", "content": CONTEXT}]


def records(n: int = 16, response: bool = True) -> list[dict[str, Any]]:
    corpus = tiny_corpus()
    out = []
    for i in range(n):
        rec: dict[str, Any] = {"id": f"q{i:02d}", "prompt": corpus[(7 * i) % len(corpus)]}
        if response:
            rec["response"] = " ".join(corpus[(3 * i + j) % len(corpus)] for j in range(1 + i % 3))
        out.append(rec)
    return out


def write_jsonl(path: Path, recs: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def make_cfg(
    prompts: str, teacher: Path, out: Path, *, context: str | None = None, **groups: dict
) -> CaptureConfig:
    return CaptureConfig(
        input=InputConfig(prompts=(prompts,), context=context, **groups.get("input", {})),
        teacher=TeacherConfig(path=str(teacher), **groups.get("teacher", {})),
        run=RunConfig(
            out=str(out), **{"max_batch_tokens": 256, "progress": False, **groups.get("run", {})}
        ),
        # The library's default targets (top-32 + 32 tail draws) unless a test asks otherwise.
        targets=target_config(**groups.get("targets", {})),
        generate=GenerateConfig(**groups.get("generate", {})),
    )


def target_config(mode: str = "score", temperature: float = 1.0, **spec: Any) -> TargetConfig:
    """The capture's targets: the default ones with ``spec``'s changes (kind, k, n, ...)."""
    return TargetConfig(mode, replace(DEFAULT_TARGETS, **spec), temperature)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ctx_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ctx") / "context.txt"
    path.write_text(CONTEXT)
    return str(path)


@pytest.fixture(scope="module")
def model(tiny_teacher_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()


@pytest.fixture(scope="module")
def tok(tiny_teacher_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_teacher_dir)


def by_id(out: Path) -> dict[str, Example]:
    return {e.id: e.by_id() for e in open_dataset(out, verify=True).iter_examples()}


def teacher_prefix(tok: Any, prompt: str) -> list[int]:
    """The teacher's full view, rendered here independently of cache/views.py."""
    msgs = [*TEACHER_CTX, {"role": "user", "content": prompt}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def reference_logp(
    model: Any, prefix: list[int], response: np.ndarray, temperature: float = 1.0
) -> torch.Tensor:
    """log_softmax(logits / T) of one unpadded forward, at the positions predicting the response."""
    ids = torch.tensor([[*prefix, *response.tolist()]])
    logits = model(ids).logits[0].float()  # (T, V)
    logp = torch.log_softmax(logits / temperature, -1)
    return logp[len(prefix) - 1 : len(prefix) - 1 + len(response)]  # (R, V)


# --------------------------------------------------------------------------- score mode


def test_topk_equals_reference_forward(tmp_path, tiny_teacher_dir, ctx_file, model, tok) -> None:
    recs = records(10)
    cfg = make_cfg(
        write_jsonl(tmp_path / "p.jsonl", recs),
        tiny_teacher_dir,
        tmp_path / "ds",
        context=ctx_file,
        targets=dict(k=16, codec="f32", temperature=1.5),
    )
    summary = capture(cfg)
    assert summary.examples == len(recs) and summary.finalized
    got = by_id(tmp_path / "ds")
    assert sorted(got) == [r["id"] for r in recs]
    for rec in recs:
        ex = got[rec["id"]]
        ref = reference_logp(model, teacher_prefix(tok, rec["prompt"]), ex.response_ids, 1.5)
        vals, idx = ref.topk(16, -1)
        t = ex.targets
        order = np.argsort(-t.logprobs, axis=1, kind="stable")
        assert np.array_equal(np.take_along_axis(t.ids, order, 1), idx.numpy())
        np.testing.assert_allclose(
            np.take_along_axis(t.logprobs, order, 1), vals.numpy(), atol=2e-5
        )
        ref_tail = torch.log1p(-vals.exp().sum(-1)).numpy()
        np.testing.assert_allclose(t.tail_logmass, ref_tail, atol=1e-4)
        # Each position's stored mass, top-k plus tail, is one.
        total = np.exp(t.logprobs).sum(1) + np.exp(t.tail_logmass)
        np.testing.assert_allclose(total, 1.0, atol=1e-5)


def test_full_vocab_f32_is_the_reference_distribution_at_exactly_those_positions(
    tmp_path, tiny_teacher_dir, ctx_file, model, tok
) -> None:
    V = model.config.vocab_size
    recs = records(6)
    cfg = make_cfg(
        write_jsonl(tmp_path / "p.jsonl", recs),
        tiny_teacher_dir,
        tmp_path / "ds",
        context=ctx_file,
        targets=dict(k=V, codec="f32"),
    )
    capture(cfg)
    got = by_id(tmp_path / "ds")
    for rec in recs:
        ex = got[rec["id"]]
        # Both views end with the same response ids: the template's assistant turn, alone.
        turn = tok.apply_chat_template(
            [
                {"role": "user", "content": rec["prompt"]},
                {"role": "assistant", "content": rec["response"]},
            ],
            tokenize=False,
        )
        student_prefix = tok.apply_chat_template(
            [{"role": "user", "content": rec["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        response_text = turn[len(student_prefix) :].rstrip()
        assert response_text == rec["response"] + tok.eos_token
        assert ex.response_ids.tolist() == tok(response_text, add_special_tokens=False)["input_ids"]
        assert ex.prompt_ids.tolist() == tok(student_prefix, add_special_tokens=False)["input_ids"]
        prefix = teacher_prefix(tok, rec["prompt"])
        ref = reference_logp(model, prefix, ex.response_ids)  # (R, V)
        dense = np.full((len(ex.response_ids), V), -np.inf, dtype=np.float32)
        np.put_along_axis(dense, ex.targets.ids.astype(np.int64), ex.targets.logprobs, 1)
        np.testing.assert_allclose(dense, ref.numpy(), atol=2e-5)
        assert np.all(ex.targets.tail_logmass == -np.inf)
        # One position off, it no longer matches: the check has teeth.
        shifted = reference_logp(model, prefix[:-1], ex.response_ids)
        assert np.abs(dense - shifted.numpy()).max() > 0.1


def test_u8_codec_within_its_bound(tmp_path, tiny_teacher_dir, ctx_file, model, tok) -> None:
    recs = records(6)
    cfg = make_cfg(
        write_jsonl(tmp_path / "p.jsonl", recs),
        tiny_teacher_dir,
        tmp_path / "ds",
        context=ctx_file,
        targets=dict(k=8, codec="u8"),
    )
    capture(cfg)
    for rec_id, ex in by_id(tmp_path / "ds").items():
        rec = next(r for r in recs if r["id"] == rec_id)
        ref = reference_logp(model, teacher_prefix(tok, rec["prompt"]), ex.response_ids)
        ref_p = ref.exp().numpy()
        p = np.exp(ex.targets.logprobs)
        ref_at = np.take_along_axis(ref_p, ex.targets.ids.astype(np.int64), 1)
        # u8 stores sqrt(p) to 1/510; renormalizing with the tail adds at most as much again.
        assert np.abs(np.sqrt(p) - np.sqrt(ref_at)).max() <= 2 / 510
        assert set(ex.targets.ids[0].tolist()) == set(ref[0].topk(8).indices.tolist())


@pytest.mark.parametrize("sampling", ["multinomial", "systematic"])
def test_sampled_counts_sum_to_n_and_follow_the_teacher(
    tmp_path, tiny_teacher_dir, ctx_file, model, tok, sampling
) -> None:
    recs = records(8)
    n = 255
    cfg = make_cfg(
        write_jsonl(tmp_path / "p.jsonl", recs),
        tiny_teacher_dir,
        tmp_path / "ds",
        context=ctx_file,
        targets=dict(kind="sampled", n=n, sampling=sampling),
    )
    capture(cfg)
    assert open_dataset(tmp_path / "ds").info.targets.sampling == sampling
    emp, ref_p = [], []
    for rec_id, ex in by_id(tmp_path / "ds").items():
        t = ex.targets
        assert len(t.nunique) == len(ex.response_ids)
        bounds = np.concatenate([[0], np.cumsum(t.nunique)])
        rec = next(r for r in recs if r["id"] == rec_id)
        ref = reference_logp(model, teacher_prefix(tok, rec["prompt"]), ex.response_ids).exp()
        for j in range(len(t.nunique)):
            ids, counts = t.ids[bounds[j] : bounds[j + 1]], t.counts[bounds[j] : bounds[j + 1]]
            assert counts.sum() == n and np.all(np.diff(ids) > 0)
            dense = np.zeros(ref.shape[1])
            dense[ids] = counts / n
            if sampling == "systematic":  # every id drawn floor(n·p) or ceil(n·p) times
                assert np.abs(dense - ref[j].numpy()).max() * n < 1 + 1e-3
            emp.append(dense)
            ref_p.append(ref[j].numpy())
    emp_a, ref_a = np.array(emp), np.array(ref_p)
    # Unbiased: averaged over positions, draw frequencies match the teacher's probabilities.
    assert np.abs(emp_a.mean(0) - ref_a.mean(0)).max() < 0.02
    assert np.abs((emp_a * ref_a).sum(1).mean() - (ref_a**2).sum(1).mean()) < 0.02


def test_topk_tail_draws_come_from_the_teacher_tail(
    tmp_path, tiny_teacher_dir, ctx_file, model, tok
) -> None:
    recs, k, n = records(8), 4, 255
    cfg = make_cfg(
        write_jsonl(tmp_path / "p.jsonl", recs),
        tiny_teacher_dir,
        tmp_path / "ds",
        context=ctx_file,
        targets=dict(k=k, n=n, codec="f32"),
    )
    capture(cfg)
    assert open_dataset(tmp_path / "ds", verify=True).info.targets.n == n
    emp, ref_p = [], []
    for rec_id, ex in by_id(tmp_path / "ds").items():
        t, d = ex.targets, ex.targets.tail_draws
        rec = next(r for r in recs if r["id"] == rec_id)
        ref = reference_logp(model, teacher_prefix(tok, rec["prompt"]), ex.response_ids).exp()
        bounds = np.concatenate([[0], np.cumsum(d.nunique)])
        for j in range(len(d.nunique)):
            ids, counts = d.ids[bounds[j] : bounds[j + 1]], d.counts[bounds[j] : bounds[j + 1]]
            assert counts.sum() == n and not set(ids.tolist()) & set(t.ids[j].tolist())
            # Head exact, tail estimated: together one distribution over the vocabulary.
            dense = np.zeros(ref.shape[1])
            dense[t.ids[j]] = np.exp(t.logprobs[j])
            dense[ids] = np.exp(t.tail_logmass[j]) * counts / n
            assert abs(dense.sum() - 1) < 1e-5
            emp.append(dense)
            ref_p.append(ref[j].numpy())
    emp_a, ref_a = np.array(emp), np.array(ref_p)
    assert np.abs(emp_a.mean(0) - ref_a.mean(0)).max() < 0.01  # unbiased


def test_batching_does_not_change_targets(tmp_path, tiny_teacher_dir, ctx_file) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", records(10))
    runs = {}
    for budget in (64, 4096):
        out = tmp_path / f"ds{budget}"
        capture(
            make_cfg(
                prompts,
                tiny_teacher_dir,
                out,
                context=ctx_file,
                run=dict(max_batch_tokens=budget),
                targets=dict(kind="sampled", n=32),
            )
        )
        runs[budget] = by_id(out)
    for i, a in runs[64].items():
        b = runs[4096][i]
        assert np.array_equal(a.targets.ids, b.targets.ids) and np.array_equal(
            a.targets.counts, b.targets.counts
        )


# --------------------------------------------------------------------------- generate mode


def test_greedy_generation_is_the_argmax_chain(
    tmp_path, tiny_teacher_dir, ctx_file, model, tok
) -> None:
    recs = records(8, response=False)
    cfg = make_cfg(
        write_jsonl(tmp_path / "p.jsonl", recs),
        tiny_teacher_dir,
        tmp_path / "ds",
        context=ctx_file,
        targets=dict(mode="generate", k=8, codec="f32"),
        generate=dict(max_new_tokens=10),
    )
    capture(cfg)
    got = by_id(tmp_path / "ds")
    assert len(got) == 8
    for rec in recs:
        ex = got[rec["id"]]
        assert 1 <= len(ex.response_ids) <= 10
        if len(ex.response_ids) < 10:
            assert ex.response_ids[-1] == tok.eos_token_id
        assert tok.eos_token_id not in ex.response_ids[:-1].tolist()
        ref = reference_logp(model, teacher_prefix(tok, rec["prompt"]), ex.response_ids)
        assert ex.response_ids.tolist() == ref.argmax(-1).tolist()
        vals, idx = ref.topk(8, -1)
        order = np.argsort(-ex.targets.logprobs, axis=1, kind="stable")
        assert np.array_equal(np.take_along_axis(ex.targets.ids, order, 1), idx.numpy())
        np.testing.assert_allclose(
            np.take_along_axis(ex.targets.logprobs, order, 1), vals.numpy(), atol=2e-5
        )


def test_sampled_generation_is_reproducible_with_a_seed(
    tmp_path, tiny_teacher_dir, ctx_file
) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", records(6, response=False))

    def run(name: str, seed: int, budget: int) -> dict[str, Example]:
        capture(
            make_cfg(
                prompts,
                tiny_teacher_dir,
                tmp_path / name,
                context=ctx_file,
                targets=dict(mode="generate", kind="sampled", n=16),
                generate=dict(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=seed),
                run=dict(max_batch_tokens=budget),
            )
        )
        return by_id(tmp_path / name)

    a, b = run("a", 3, 512), run("b", 3, 100)  # other batches: same draws (per-example streams)
    c = run("c", 4, 512)
    for i in a:
        assert np.array_equal(a[i].response_ids, b[i].response_ids)
        assert np.array_equal(a[i].targets.ids, b[i].targets.ids)
        assert np.array_equal(a[i].targets.counts, b[i].targets.counts)
    assert any(not np.array_equal(a[i].response_ids, c[i].response_ids) for i in a)


# --------------------------------------------------------------------------- resume


class Crash(Exception):
    pass


def test_resume_after_a_crash_is_exactly_once(tmp_path, tiny_teacher_dir, ctx_file) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", records(16))
    cfg = make_cfg(
        prompts,
        tiny_teacher_dir,
        tmp_path / "ds",
        context=ctx_file,
        run=dict(max_batch_tokens=96, shard_positions=40),
        targets=dict(k=4),
    )

    def crash_after_3(n: int) -> None:
        if n == 3:
            raise Crash

    with pytest.raises(Crash):
        capture(cfg, on_batch=crash_after_3)
    partial = committed_ids(tmp_path / "ds")
    assert 0 < len(partial) < 16
    assert not (tmp_path / "ds" / "manifest.json").exists()  # a failed run is not finalized

    summary = capture(cfg)
    assert summary.already_committed == len(partial)
    assert summary.examples == 16 - len(partial)
    ds = open_dataset(tmp_path / "ds", verify=True)
    ids = [e.id for e in ds.iter_examples()]
    assert sorted(ids) == sorted(f"q{i:02d}" for i in range(16)) and len(ids) == 16

    clean = tmp_path / "clean"
    capture(make_cfg(prompts, tiny_teacher_dir, clean, context=ctx_file, targets=dict(k=4)))
    resumed, ref = by_id(tmp_path / "ds"), by_id(clean)
    for i in ref:
        assert np.array_equal(resumed[i].response_ids, ref[i].response_ids)
        assert np.array_equal(resumed[i].targets.ids, ref[i].targets.ids)
        np.testing.assert_allclose(resumed[i].targets.logprobs, ref[i].targets.logprobs, atol=0.02)

    again = capture(cfg)  # nothing left: a no-op that keeps the manifest
    assert again.examples == 0 and again.already_committed == 16
    assert open_dataset(tmp_path / "ds").num_examples == 16
    assert json.loads((tmp_path / "ds" / CONFIG_NAME).read_text())["targets"]["k"] == 4


def test_an_interrupted_capture_says_resume_not_finalize(
    tmp_path, tiny_teacher_dir, ctx_file, capsys
) -> None:
    """A killed build's journal is unfinished: finalize refuses it and every command says to
    rerun the build (or to publish on purpose with --partial); the rerun finishes it."""
    from logitcache.tools.cli import main

    prompts = write_jsonl(tmp_path / "p.jsonl", records(16))
    out = tmp_path / "ds"
    run = dict(max_batch_tokens=96, shard_positions=40)
    cfg = make_cfg(prompts, tiny_teacher_dir, out, context=ctx_file, run=run, targets=dict(k=4))

    def crash_after_3(n: int) -> None:
        if n == 3:
            raise Crash

    with pytest.raises(Crash):
        capture(cfg, on_batch=crash_after_3)
    held = len(committed_ids(out))
    advice = (
        f"_parts/r00000.json holds {held} examples but its writer has not finished its share "
        "(it was interrupted, or is still running); rerun the `logitcache build` command that "
        "wrote it to resume (it continues where it stopped, then finalizes the dataset); or run "
        f"`logitcache finalize {out} --partial` to publish the {held} examples committed so far"
    )
    for command in ("finalize", "verify", "inspect"):
        assert main([command, str(out)]) == 1
        printed = capsys.readouterr()
        assert advice in printed.out + printed.err, command
    assert not (out / "manifest.json").exists()

    summary = capture(cfg)  # the build command again
    assert summary.finalized and summary.already_committed == held
    assert main(["verify", str(out)]) == 0
    assert "warning" not in capsys.readouterr().out
    assert open_dataset(out).num_examples == 16


def test_a_job_array_part_that_stopped_early_is_named_with_its_index(
    tmp_path, tiny_teacher_dir, ctx_file, capsys
) -> None:
    from logitcache.tools.cli import main

    prompts = write_jsonl(tmp_path / "p.jsonl", records(9))
    out = tmp_path / "ds"

    def part(index: int, shards: int = 2, on_batch: Any = None) -> None:
        run = dict(num_shards=shards, shard_index=index, max_batch_tokens=64, shard_positions=1)
        cfg = make_cfg(prompts, tiny_teacher_dir, out, context=ctx_file, run=run)
        capture(cfg, on_batch=on_batch)

    def crash_after_2(n: int) -> None:
        if n == 2:
            raise Crash

    part(0)
    with pytest.raises(Crash):
        part(1, on_batch=crash_after_2)
    assert main(["finalize", str(out)]) == 1
    err = capsys.readouterr().err
    assert "_parts/r00001.json holds 1 example but its writer has not finished" in err
    assert (
        "rerun the `logitcache build` command with --num-shards 2 --shard-index 1 that wrote it "
        f"to resume (it continues where it stopped), then `logitcache finalize {out}`"
    ) in err
    saved = tmp_path / "saved"
    shutil.copytree(out, saved)

    part(1)
    assert main(["finalize", str(out)]) == 0
    assert open_dataset(out, verify=True).num_examples == 9

    # The whole set in one run instead: it finalizes over the part's unfinished journal, whose
    # examples are of the same prompts.
    summary = capture(make_cfg(prompts, tiny_teacher_dir, saved, context=ctx_file))
    assert summary.finalized and summary.dataset_examples == 9
    # That journal is finished now: verify has nothing to warn of, finalize reruns cleanly.
    capsys.readouterr()
    assert main(["verify", str(saved)]) == 0
    assert "warning" not in capsys.readouterr().out
    assert main(["finalize", str(saved)]) == 0


def test_a_missing_shard_names_what_mends_it(tmp_path, tiny_teacher_dir, capsys) -> None:
    """A rerun into the folder cannot replace a lost shard (it stops at it): the error says
    so, and the command it prints captures everything into a new folder."""
    import shlex

    from logitcache.cache.errors import ShardError
    from logitcache.tools.cli import main

    prompts = write_jsonl(tmp_path / "p.jsonl", records(4))
    cfg = make_cfg(prompts, tiny_teacher_dir, tmp_path / "ds", run=dict(shard_positions=1))
    capture(cfg)
    next((tmp_path / "ds").glob("shard-*.arrow")).unlink()
    with pytest.raises(ShardError) as e:
        capture(cfg)
    msg = str(e.value)
    assert "missing from storage; restore the shard from a copy of the dataset, or capture " in msg
    assert f"(rerunning the build into {tmp_path / 'ds'} does not replace it)" in msg
    command = re.search(r"(logitcache build --config \S+ --out NEW_DIR)", msg).group(1)
    argv = shlex.split(command.replace("NEW_DIR", str(tmp_path / "new")))
    assert main([*argv[1:], "--no-progress"]) == 0
    assert open_dataset(tmp_path / "new", verify=True).num_examples == 4


def test_a_job_arrays_lost_shard_is_mended_by_one_run_of_every_part(
    tmp_path, tiny_teacher_dir
) -> None:
    """The saved config is part 0's (--num-shards 2): the printed command captures every part."""
    import shlex

    from logitcache.cache.errors import ShardError
    from logitcache.cache.manifest import finalize
    from logitcache.cache.storage import Location
    from logitcache.tools.cli import main

    prompts = write_jsonl(tmp_path / "p.jsonl", records(4))
    for index in (0, 1):
        run = dict(num_shards=2, shard_index=index, shard_positions=1)
        capture(make_cfg(prompts, tiny_teacher_dir, tmp_path / "ds", run=run))
    finalize(Location(str(tmp_path / "ds")))
    next((tmp_path / "ds").glob("shard-*.arrow")).unlink()
    with pytest.raises(ShardError) as e:
        list(open_dataset(tmp_path / "ds").iter_examples())
    command = re.search(r"(logitcache build --config \S+ --out NEW_DIR[^(]*) \(", str(e.value))
    argv = shlex.split(command.group(1).replace("NEW_DIR", str(tmp_path / "new")))
    assert argv[-4:] == ["--num-shards", "1", "--shard-index", "0"]
    assert main([*argv[1:], "--no-progress"]) == 0
    assert open_dataset(tmp_path / "new", verify=True).num_examples == 4


def test_resume_with_other_settings_is_refused(tmp_path, tiny_teacher_dir, ctx_file) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", records(4))
    capture(make_cfg(prompts, tiny_teacher_dir, tmp_path / "ds", context=ctx_file))
    with pytest.raises(
        IncompatibleError,
        match=r"(?s)other settings.*capture\.truncation: was \"error\", now \"drop\".*original flags",
    ):
        capture(
            make_cfg(
                prompts,
                tiny_teacher_dir,
                tmp_path / "ds",
                context=ctx_file,
                input=dict(truncation="drop"),
            )
        )


# --------------------------------------------------------------------------- bad input


def test_skip_records_malformed_records_in_the_manifest(tmp_path, tiny_teacher_dir) -> None:
    lines = [json.dumps(r) for r in records(4)]
    lines.insert(2, "{not json")
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    cfg = make_cfg(
        str(tmp_path / "p.jsonl"), tiny_teacher_dir, tmp_path / "ds", input=dict(on_error="skip")
    )
    summary = capture(cfg)
    assert summary.examples == 4 and summary.skipped == 1
    extra = json.loads((tmp_path / "ds" / "manifest.json").read_text())["extra"]
    assert extra["skipped_count"] == 1
    assert extra["skipped"] == [
        {"file": str(tmp_path / "p.jsonl"), "line": 3, "reason": extra["skipped"][0]["reason"]}
    ]
    assert "not valid JSON" in extra["skipped"][0]["reason"]
    capture(cfg)  # a rerun recounts, it does not add up again
    assert (
        json.loads((tmp_path / "ds" / "manifest.json").read_text())["extra"]["skipped_count"] == 1
    )


def test_length_policies(tmp_path, tiny_teacher_dir, ctx_file, tok) -> None:
    recs = records(6)
    prompts = write_jsonl(tmp_path / "p.jsonl", recs)
    lengths = [len(teacher_prefix(tok, r["prompt"])) for r in recs]
    limit = sorted(lengths)[3] + 8
    with pytest.raises(
        InputError,
        match=rf"(?s)exceed --max-length {limit}.*\n.*p\.jsonl:\d+ \(id 'q\d\d'\).*--truncation left",
    ):
        capture(
            make_cfg(
                prompts,
                tiny_teacher_dir,
                tmp_path / "err",
                context=ctx_file,
                input=dict(max_length=limit),
            )
        )

    s = capture(
        make_cfg(
            prompts,
            tiny_teacher_dir,
            tmp_path / "drop",
            context=ctx_file,
            input=dict(max_length=limit, truncation="drop"),
        )
    )
    extra = json.loads((tmp_path / "drop" / "manifest.json").read_text())["extra"]
    assert s.dropped_too_long == extra["too_long"]["dropped"] > 0
    assert s.examples + s.dropped_too_long == 6
    assert len(extra["dropped_too_long_examples"]) == s.dropped_too_long

    s = capture(
        make_cfg(
            prompts,
            tiny_teacher_dir,
            tmp_path / "left",
            context=ctx_file,
            input=dict(max_length=limit, truncation="left"),
            targets=dict(k=4),
        )
    )
    extra = json.loads((tmp_path / "left" / "manifest.json").read_text())["extra"]
    kept = by_id(tmp_path / "left")
    too_long = [
        r
        for r, n in zip(recs, lengths, strict=True)
        if n + len(kept[r["id"]].response_ids) > limit
        if r["id"] in kept
    ]
    assert extra["too_long"]["truncated_teacher"] == len(too_long) > 0
    assert s.examples + s.dropped_too_long == 6


def test_messages_without_a_chat_template(tmp_path, tiny_teacher_dir) -> None:
    plain = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    cfg_file = plain / "tokenizer_config.json"
    tc = json.loads(cfg_file.read_text())
    tc.pop("chat_template", None)
    cfg_file.write_text(json.dumps(tc))
    recs = [{"id": "m", "messages": [{"role": "user", "content": "Hi"}], "response": "Hello"}]
    with pytest.raises(
        InputError,
        match=r"p\.jsonl:1: this record needs a chat template.*has none; pass --render plain",
    ):
        capture(make_cfg(write_jsonl(tmp_path / "p.jsonl", recs), plain, tmp_path / "ds"))
    # Text prompts still work as plain text.
    recs = [{"id": "t", "prompt": "Q: hi\nA:", "response": " hello"}]
    capture(
        make_cfg(
            write_jsonl(tmp_path / "t.jsonl", recs),
            plain,
            tmp_path / "ok",
            input=dict(render="plain"),
        )
    )
    assert list(by_id(tmp_path / "ok")) == ["t"]


def test_missing_model_folder(tmp_path) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", records(2))
    with pytest.raises(
        InputError, match=r"--teacher .*nowhere: no such folder; pass --teacher a local folder"
    ):
        capture(make_cfg(prompts, tmp_path / "nowhere", tmp_path / "ds"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no config\.json in the folder"):
        capture(make_cfg(prompts, tmp_path / "empty", tmp_path / "ds"))


def test_out_is_an_existing_file(tmp_path, capsys) -> None:
    from logitcache.tools.cli import main

    prompts = write_jsonl(tmp_path / "p.jsonl", records(2))
    assert main(["build", "--teacher", "nowhere", "--prompts", prompts, "--out", prompts]) == 1
    assert (
        f"logitcache build: error: --out {prompts} is an existing file, not a folder; choose a "
        "new folder name (or move the file away)"
    ) in capsys.readouterr().err
    assert (tmp_path / "p.jsonl").read_text().count("\n") == 2  # left as it was


def test_empty_prompt_set(tmp_path, tiny_teacher_dir) -> None:
    (tmp_path / "p.jsonl").write_text("")
    with pytest.raises(InputError, match=r"empty prompt set"):
        capture(make_cfg(str(tmp_path / "p.jsonl"), tiny_teacher_dir, tmp_path / "ds"))


def test_invalid_settings_are_reported_together(tmp_path, tiny_teacher_dir) -> None:
    cfg = make_cfg(
        "p.jsonl",
        tiny_teacher_dir,
        tmp_path / "ds",
        targets=dict(kind="sampled", n=300, temperature=0, sampling="stratified"),
        run=dict(num_shards=2, shard_index=2),
    )
    with pytest.raises(
        InputError,
        match=r"(?s)--n is 300.*--sampling is 'stratified'.*--temperature is 0.*--shard-index is 2",
    ):
        capture(cfg)


def test_k_above_vocab(tmp_path, tiny_teacher_dir) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", records(2))
    with pytest.raises(InputError, match=r"--k is 100000 but the teacher's vocabulary has \d+ ids"):
        capture(make_cfg(prompts, tiny_teacher_dir, tmp_path / "ds", targets=dict(k=100000)))


def test_plain_render_with_context(tmp_path, tiny_teacher_dir, model, tok) -> None:
    (tmp_path / "ctx.txt").write_text("Q: What is the capital of France?\nA: Paris.\n")
    recs = [{"id": "p", "prompt": "Q: 1 + 1 = ?\nA:", "response": " 2"}]
    cfg = make_cfg(
        write_jsonl(tmp_path / "p.jsonl", recs),
        tiny_teacher_dir,
        tmp_path / "ds",
        context=str(tmp_path / "ctx.txt"),
        input=dict(render="plain"),
        targets=dict(k=8, codec="f32"),
    )
    capture(cfg)
    ex = by_id(tmp_path / "ds")["p"]
    assert ex.prompt_ids.tolist() == tok(recs[0]["prompt"])["input_ids"]
    assert ex.response_ids.tolist() == tok(" 2", add_special_tokens=False)["input_ids"]
    prefix = tok((tmp_path / "ctx.txt").read_text() + recs[0]["prompt"])["input_ids"]
    ref = reference_logp(model, prefix, ex.response_ids)
    order = np.argsort(-ex.targets.logprobs, axis=1, kind="stable")
    assert np.array_equal(np.take_along_axis(ex.targets.ids, order, 1), ref.topk(8).indices.numpy())


def test_cli_build(tmp_path, tiny_teacher_dir, ctx_file, capsys) -> None:
    from logitcache.tools.cli import main

    prompts = write_jsonl(tmp_path / "p.jsonl", records(4))
    out = tmp_path / "ds"
    rc = main(
        [
            "build",
            "--teacher",
            str(tiny_teacher_dir),
            "--prompts",
            prompts,
            "--context",
            ctx_file,
            "--out",
            str(out),
            "--k",
            "8",
            "--no-progress",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "captured 4 examples" in printed and "bytes/position" in printed
    saved = CaptureConfig.from_json(json.loads((out / CONFIG_NAME).read_text()))
    assert saved.targets.spec.k == 8 and saved.input.context == ctx_file
    assert saved.targets.spec.kind == "topk" and saved.targets.spec.n == 32  # top-8 + 32 draws
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["teacher"]["config_hash"].startswith("sha256:")
    assert manifest["capture"]["templates"]["teacher"]["context"] == CONTEXT
    assert (
        manifest["tokenizer"]["vocab_size"]
        == AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).config.vocab_size
    )
    rc = main(
        ["build", "--teacher", str(tmp_path / "nope"), "--prompts", prompts, "--out", str(out)]
    )
    assert rc == 1
    assert "--teacher" in capsys.readouterr().err


def test_job_array_parts_then_finalize_equal_one_run(tmp_path, tiny_teacher_dir, ctx_file) -> None:
    from logitcache.cache.manifest import finalize
    from logitcache.cache.storage import Location

    prompts = write_jsonl(tmp_path / "p.jsonl", records(10))
    for index in range(3):
        s = capture(
            make_cfg(
                prompts,
                tiny_teacher_dir,
                tmp_path / "parts",
                context=ctx_file,
                run=dict(num_shards=3, shard_index=index),
                targets=dict(k=4),
            )
        )
        assert not s.finalized
    assert sorted(p.name for p in (tmp_path / "parts" / "_parts").iterdir()) == [
        "r00000.json",
        "r00001.json",
        "r00002.json",
    ]
    finalize(Location(tmp_path / "parts"))  # what `logitcache finalize` runs
    capture(
        make_cfg(prompts, tiny_teacher_dir, tmp_path / "one", context=ctx_file, targets=dict(k=4))
    )
    parts, one = by_id(tmp_path / "parts"), by_id(tmp_path / "one")
    assert sorted(parts) == sorted(one)
    for i in one:
        assert np.array_equal(parts[i].targets.ids, one[i].targets.ids)


@pytest.mark.parametrize("support", ["window", "none"])
def test_lm_head_fallbacks_store_the_same_targets(
    tmp_path, tiny_teacher_dir, ctx_file, monkeypatch, support
) -> None:
    """The boolean keep mask (default), the integer window, and full logits agree."""
    from logitcache.cache import teacher

    prompts = write_jsonl(tmp_path / "p.jsonl", records(6))
    capture(
        make_cfg(
            prompts,
            tiny_teacher_dir,
            tmp_path / "rows",
            context=ctx_file,
            targets=dict(k=8, codec="f32"),
        )
    )
    monkeypatch.setattr(teacher, "logits_to_keep_support", lambda model: support)
    capture(
        make_cfg(
            prompts,
            tiny_teacher_dir,
            tmp_path / "other",
            context=ctx_file,
            targets=dict(k=8, codec="f32"),
        )
    )
    a, b = by_id(tmp_path / "rows"), by_id(tmp_path / "other")
    for i in a:
        assert np.array_equal(a[i].targets.ids, b[i].targets.ids)
        np.testing.assert_allclose(a[i].targets.logprobs, b[i].targets.logprobs, atol=2e-5)


def test_fsspec_urls_in_and_out(tiny_teacher_dir) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/capture_in/p.jsonl", "".join(json.dumps(r) + "\n" for r in records(4)).encode())
    cfg = make_cfg("memory://capture_in/p.jsonl", tiny_teacher_dir, "memory://capture_out/ds")
    try:
        assert capture(cfg).examples == 4
        assert open_dataset("memory://capture_out/ds", verify=True).num_examples == 4
        again = capture(cfg)
        assert again.examples == 0 and again.already_committed == 4
    finally:
        for path in ("/capture_in", "/capture_out"):
            fs.rm(path, recursive=True)


@pytest.mark.parametrize(
    ("flags", "want", "error"),
    [
        ([], ("topk", 32, 32), None),  # the default: top-32 + 32 tail draws
        (["--k", "64"], ("topk", 64, 32), None),
        (["--n", "0"], ("topk", 32, 0), None),  # plain top-k, tail as its mass only
        (["--targets", "sampled", "--n", "8"], ("sampled", 32, 8), None),
        (["--targets", "sampled", "--k", "8"], None, r"--k does not apply to sampled targets"),
        (
            ["--targets", "sampled", "--k", "8", "--codec", "f16"],
            None,
            r"--k and --codec do not apply to sampled targets .* --n counts draws from the tail",
        ),
        (  # every problem in one error, the flags that do not apply among them
            ["--targets", "sampled", "--k", "16", "--k-mass", "0.9", "--max-batch-tokens", "0"],
            None,
            r"(?s)invalid settings:\n  --k does not apply to sampled targets.*\n  --k-mass "
            r"applies to top-k targets only.*\n  --max-batch-tokens is 0",
        ),
    ],
)
def test_cli_target_flags(flags, want, error) -> None:
    import argparse

    from logitcache.tools.cmd_build import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--teacher", "t", "--prompts", "p.jsonl", "--out", "o", *flags])
    if error:
        with pytest.raises(InputError, match=error):
            config_from_args(args)
        return
    t = config_from_args(args).targets.spec
    assert (t.kind, t.k, t.n) == want
    assert t.sampling == "systematic"


def test_finalize_refuses_a_job_array_with_a_part_missing(
    tmp_path, tiny_teacher_dir, ctx_file, capsys
) -> None:
    """Finalizing after parts 0 and 2 of 3 would give a dataset of two thirds of the prompts:
    refused, naming the --shard-index to run; following that, finalize completes."""
    from logitcache.tools.cli import main

    prompts = write_jsonl(tmp_path / "p.jsonl", records(9))

    def part(index: int) -> None:
        cfg = make_cfg(
            prompts,
            tiny_teacher_dir,
            tmp_path / "ds",
            context=ctx_file,
            run=dict(num_shards=3, shard_index=index),
            targets=dict(k=4),
        )
        capture(cfg)

    part(0)
    part(2)
    assert main(["finalize", str(tmp_path / "ds")]) != 0
    err = capsys.readouterr().err
    assert "1 of the capture's 3 parts have not written yet (missing r00001)" in err
    assert "--shard-index 1" in err and not (tmp_path / "ds" / "manifest.json").exists()
    part(1)
    assert main(["finalize", str(tmp_path / "ds")]) == 0
    ds = open_dataset(tmp_path / "ds", verify=True)
    assert ds.manifest.num_examples == 9 and ds.manifest.extra["parts"] == {"count": 3, "ranks": 1}


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_adaptive_targets_through_the_capture(tmp_path, tiny_teacher_dir, ctx_file, mode) -> None:
    """--k-mass / --n-rate through `capture`: a version-2 dataset whose targets do not depend
    on batching (scored in one pass or generated step by step)."""
    prompts = write_jsonl(tmp_path / "p.jsonl", records(6, response=mode == "score"))
    spec = dict(k=48, n=16, k_mass=0.1, k_min=2, n_rate=24.0)
    runs = {}
    for budget in (64, 4096):
        out = tmp_path / f"ds{budget}"
        capture(
            make_cfg(prompts, tiny_teacher_dir, out, context=ctx_file,
                     run=dict(max_batch_tokens=budget), targets=dict(mode=mode, **spec),
                     generate=dict(max_new_tokens=6))
        )  # fmt: skip
        runs[budget] = by_id(out)
    assert json.loads((tmp_path / "ds64" / "manifest.json").read_text())["format_version"] == 3
    kept = np.concatenate([e.targets.counts for e in runs[64].values()])  # type: ignore[union-attr]
    assert kept.min() >= 2 and kept.max() <= 48 and len(set(kept.tolist())) > 1
    for i, a in runs[64].items():
        b = runs[4096][i]
        assert np.array_equal(a.targets.counts, b.targets.counts)  # type: ignore[union-attr]
        assert np.array_equal(a.targets.ids, b.targets.ids)
        assert np.array_equal(a.targets.tail_draws.ids, b.targets.tail_draws.ids)  # type: ignore[union-attr]
