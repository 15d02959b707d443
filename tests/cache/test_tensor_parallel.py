"""`--tp`: ranks in tensor-parallel groups, and the errors when it does not fit the launch or
the teacher. The torchrun builds themselves are in tests/e2e/test_build_tp.py (slow)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from logitcache.cache.capture_config import CaptureConfig, InputConfig, RunConfig, TeacherConfig
from logitcache.cache.errors import InputError
from logitcache.cache.ranks import Ranks
from logitcache.cache.tensor_parallel import Groups, tp_groups
from logitcache.tools.cli import main


def test_groups_are_consecutive_ranks_and_their_first_rank_writes() -> None:
    groups = [Groups(tp=2, rank=r, world=8) for r in range(8)]
    assert {g.count for g in groups} == {4}
    assert [g.index for g in groups] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [g.writes for g in groups] == [True, False] * 4
    # --tp 1 (the default): every rank is its own group, as before --tp existed.
    one = tp_groups(TeacherConfig(path="unused"), Ranks(rank=3, world=4))
    assert (one.count, one.index, one.writes) == (4, 3, True)


def test_tp_in_one_process_names_the_torchrun_command(
    tmp_path: Path, tiny_teacher_dir: Path, monkeypatch, capsys
) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi", "response": "there"}) + "\n")
    argv = ["build", "--teacher", str(tiny_teacher_dir), "--prompts", str(prompts)]
    argv += ["--out", str(tmp_path / "ds"), "--tp", "2"]
    monkeypatch.setattr(sys, "argv", ["logitcache", *argv])
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "--tp 2 splits the teacher over 2 processes, but this is one process" in err
    # The same command under torchrun (tests/e2e/test_build_tp.py runs such a command).
    assert (
        "run: torchrun --standalone --nproc-per-node 2 -m logitcache.tools.cli build "
        f"--teacher {tiny_teacher_dir} --prompts {prompts} --out {tmp_path / 'ds'} --tp 2;"
    ) in err
    assert not (tmp_path / "ds").exists()  # refused before anything is written

    cfg = CaptureConfig(
        input=InputConfig(prompts=(str(prompts),)),
        teacher=TeacherConfig(path=str(tiny_teacher_dir), tp=2),
        run=RunConfig(out=str(tmp_path / "ds")),
    )
    monkeypatch.setattr(sys, "argv", ["python"])  # the library: no command line to repeat
    with pytest.raises(InputError, match=r"launch it with torchrun --nproc-per-node 2 \(or a"):
        tp_groups(cfg.teacher, Ranks())
    bad = replace(cfg, teacher=replace(cfg.teacher, tp=0))
    assert bad.validate() == ["--tp is 0; expected ≥ 1 (1: no tensor parallelism)"]


def test_tp_must_divide_the_processes(tiny_teacher_dir: Path) -> None:
    cfg = TeacherConfig(path=str(tiny_teacher_dir), tp=3)
    with pytest.raises(
        InputError,
        match=r"--tp 3 does not divide the 4 processes torchrun started \(WORLD_SIZE 4\).*"
        r"pass a --tp that divides 4 \(1, 2, 4\), or start a multiple of 3 processes",
    ):
        tp_groups(cfg, Ranks(rank=1, world=4))


def test_a_teacher_without_a_tp_plan_is_refused_naming_the_fix(tmp_path: Path) -> None:
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(
        InputError,
        match=r"--tp 2: the teacher .* \(gpt2\) has no tensor-parallel plan in transformers.*"
        r"drop --tp, so that each process loads the whole teacher",
    ):
        tp_groups(TeacherConfig(path=str(tmp_path), tp=2), Ranks(rank=0, world=2))


def test_heads_that_do_not_split_evenly_are_refused(tiny_teacher_dir: Path) -> None:
    # The tiny teacher: 4 attention heads, 2 key/value heads.
    assert tp_groups(TeacherConfig(path=str(tiny_teacher_dir), tp=2), Ranks(0, 4)).count == 2
    with pytest.raises(
        InputError,
        match=r"--tp 4: the teacher .* has 2 key/value heads, which tensor parallelism cannot "
        r"split 4 ways; pass a --tp that divides its head counts \(1, 2\)",
    ):
        tp_groups(TeacherConfig(path=str(tiny_teacher_dir), tp=4), Ranks(rank=0, world=4))
