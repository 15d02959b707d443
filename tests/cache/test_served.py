"""A served teacher (--teacher-url) against a fake OpenAI-compatible server on 127.0.0.1.

The fake (tools/fake_server.py) computes log-probs with the tiny teacher in fp32 and answers in
vLLM's shapes; it can answer 503 or drop connections. The dataset must equal the Hugging Face
engine's top-k targets over the same records, whatever the server's failures, exactly once.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from logitcache.cache.capture import capture
from logitcache.cache.errors import IncompatibleError, InputError
from logitcache.cache.reader import committed_ids, open_dataset
from logitcache.cache.served import ServerError
from logitcache.tools.cli import main
from logitcache.tools.fake_server import FakeTeacherServer
from logitcache.tools.tiny import make_tiny_tokenizer

from .test_capture import by_id, make_cfg, records, write_jsonl

K = 8
TOPK = dict(k=K, n=0, codec="f32")  # what a served teacher stores; f32 to compare closely
# Same records, same views: the server's fp32 log-probs equal the local engine's to fp32
# rounding (different batch shapes: padded batches here, one sequence there).
ATOL = 1e-4


@pytest.fixture(scope="module")
def server(tiny_teacher_dir: Path):
    with FakeTeacherServer(str(tiny_teacher_dir)) as s:
        yield s


@pytest.fixture
def fresh(server: FakeTeacherServer):
    server.fail, server.dead, server.bodies = [], False, []
    return server


def served_cfg(prompts: str, folder: Path, out: Path, url: str, **groups: dict):
    teacher_group = {"url": url, "request_retries": 3, **groups.pop("teacher", {})}
    targets = {**TOPK, **groups.pop("targets", {})}
    cfg = make_cfg(prompts, folder, out, targets=targets, **groups)
    return replace(cfg, teacher=replace(cfg.teacher, **teacher_group))


def assert_same_targets(got: Path, ref: Path) -> None:
    a, b = by_id(got), by_id(ref)
    assert sorted(a) == sorted(b)
    for i in b:
        assert np.array_equal(a[i].response_ids, b[i].response_ids), i
        assert np.array_equal(a[i].targets.ids, b[i].targets.ids), i
        np.testing.assert_allclose(a[i].targets.logprobs, b[i].targets.logprobs, atol=ATOL)
        # The server's tail is 1 − Σ top-k; the local engine sums the tail directly.
        np.testing.assert_allclose(a[i].targets.tail_logmass, b[i].targets.tail_logmass, atol=1e-3)


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_served_targets_equal_the_hf_engine(tmp_path, tiny_teacher_dir, fresh, mode) -> None:
    recs = records(6, response=mode == "score")
    prompts = write_jsonl(tmp_path / "p.jsonl", recs)
    groups = dict(targets=dict(mode=mode), generate=dict(max_new_tokens=5))
    capture(served_cfg(prompts, tiny_teacher_dir, tmp_path / "served", fresh.url, **groups))
    capture(
        make_cfg(
            prompts,
            tiny_teacher_dir,
            tmp_path / "hf",
            targets={**TOPK, "mode": mode},
            generate=dict(max_new_tokens=5),
        )
    )
    assert_same_targets(tmp_path / "served", tmp_path / "hf")
    m = json.loads((tmp_path / "served" / "manifest.json").read_text())
    assert m["capture"]["engine"]["name"] == "served"
    assert "1 - sum exp(top-k)" in m["capture"]["targets_from"]
    assert m["teacher"]["name_or_path"] == "served:fake-teacher"
    # The requests: our token ids, top-k by id, one request per example.
    assert len(fresh.bodies) == 6
    body = fresh.bodies[0]
    assert all(isinstance(i, int) for i in body["prompt"])
    if mode == "score":
        assert body["prompt_logprobs"] == K and body["max_tokens"] == 1
    else:
        assert body["logprobs"] == K and body["return_tokens_as_token_ids"]
        assert body["temperature"] == 0.0 and body["max_tokens"] == 5


def test_retries_and_dropped_connections_lose_nothing(tmp_path, tiny_teacher_dir, fresh) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", records(8))
    fresh.fail = ["503", "drop", "503", "drop"]
    capture(served_cfg(prompts, tiny_teacher_dir, tmp_path / "ds", fresh.url))
    assert len(fresh.bodies) == 8 + 4  # every failure retried once more
    capture(make_cfg(prompts, tiny_teacher_dir, tmp_path / "hf", targets=TOPK))
    assert_same_targets(tmp_path / "ds", tmp_path / "hf")


def test_dead_server_then_rerun_is_exactly_once(tmp_path, tiny_teacher_dir, fresh) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", records(12))
    cfg = served_cfg(
        prompts,
        tiny_teacher_dir,
        tmp_path / "ds",
        fresh.url,
        teacher=dict(request_retries=1),
        run=dict(max_batch_tokens=96, shard_positions=40),
    )

    def die_after_2(n: int) -> None:
        if n == 2:
            fresh.dead = True  # the server goes down: every request now 503

    with pytest.raises(ServerError, match="rerun the same command to resume"):
        capture(cfg, on_batch=die_after_2)
    partial = committed_ids(tmp_path / "ds")
    assert 0 < len(partial) < 12
    assert not (tmp_path / "ds" / "manifest.json").exists()

    fresh.dead = False  # restarted
    summary = capture(cfg)
    assert summary.already_committed == len(partial)
    assert summary.examples == 12 - len(partial)
    ids = [e.id for e in open_dataset(tmp_path / "ds", verify=True).iter_examples()]
    assert sorted(ids) == sorted(f"q{i:02d}" for i in range(12)) and len(ids) == 12
    capture(make_cfg(prompts, tiny_teacher_dir, tmp_path / "hf", targets=TOPK))
    assert_same_targets(tmp_path / "ds", tmp_path / "hf")


def test_tokenizer_mismatch_is_refused_before_any_work(tmp_path, tiny_teacher_dir) -> None:
    other = make_tiny_tokenizer(tmp_path / "other_tok", vocab_size=300)
    assert other is not None
    prompts = write_jsonl(tmp_path / "p.jsonl", records(2))
    with FakeTeacherServer(str(tiny_teacher_dir), str(tmp_path / "other_tok")) as s:
        cfg = served_cfg(prompts, tiny_teacher_dir, tmp_path / "ds", s.url)
        with pytest.raises(IncompatibleError, match="tokenizes differently") as e:
            capture(cfg)
        assert not s.bodies  # nothing was captured
    assert "is [" in str(e.value) and "on the server" in str(e.value)
    assert not (tmp_path / "ds").exists() or not committed_ids(tmp_path / "ds")


def test_server_cap_on_logprobs_names_the_fix(tmp_path, tiny_teacher_dir) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", records(2))
    with FakeTeacherServer(str(tiny_teacher_dir), max_logprobs=4) as s:
        with pytest.raises(ServerError, match="--max-logprobs at least --k"):
            capture(served_cfg(prompts, tiny_teacher_dir, tmp_path / "ds", s.url))
        assert len(s.bodies) == 2  # one per example: a 400 is not retried


def test_unreachable_server_is_a_clear_error(tmp_path, tiny_teacher_dir) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", records(2))
    cfg = served_cfg(
        prompts,
        tiny_teacher_dir,
        tmp_path / "ds",
        "http://127.0.0.1:9",
        teacher=dict(request_retries=0),
    )
    with pytest.raises(ServerError, match=r"no answer after 1 tries"):
        capture(cfg)


def test_cli_refuses_tail_draws_and_other_temperatures(tmp_path, tiny_teacher_dir, capsys) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", records(2))
    base = [
        "build",
        "--teacher",
        str(tiny_teacher_dir),
        "--prompts",
        prompts,
        "--out",
        str(tmp_path / "ds"),
        "--teacher-url",
        "http://127.0.0.1:9",
    ]
    assert main([*base, "--temperature", "2"]) == 1
    err = capsys.readouterr().err
    assert "--n 32: --teacher-url gives top-k log-probs only" in err and "pass --n 0" in err
    assert "--temperature 2.0" in err and "pass --temperature 1" in err
    assert main([*base, "--n", "0", "--engine", "vllm"]) == 1
    assert "drop --engine" in capsys.readouterr().err
    assert main([*base, "--n", "0", "--k-mass", "0.9"]) == 1
    err = capsys.readouterr().err
    assert "--k-mass/--n-rate: adaptive targets are computed from the whole distribution" in err
    assert "use --engine hf" in err
    with pytest.raises(InputError, match="expected http://"):
        capture(served_cfg(prompts, tiny_teacher_dir, tmp_path / "ds", "localhost:8000"))


def test_engine_vllm_without_vllm_names_the_extra(tmp_path, tiny_teacher_dir, capsys) -> None:
    pytest.importorskip("transformers")
    try:
        import vllm  # noqa: F401

        pytest.skip("vLLM is installed here")
    except ModuleNotFoundError:
        pass
    prompts = write_jsonl(tmp_path / "p.jsonl", records(2))
    argv = ["build", "--teacher", str(tiny_teacher_dir), "--prompts", prompts,
            "--out", str(tmp_path / "ds"), "--engine", "vllm", "--n", "0"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "pip install 'logitcache[vllm]'" in err and "make test-vllm" in err
    assert not (tmp_path / "ds").exists() or not committed_ids(tmp_path / "ds")
