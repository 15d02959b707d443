"""Generate mode stops at the chat turn's end: its end-of-turn token must be an eos id."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from logitcache.cache import capture as capture_mod
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
from logitcache.cache.errors import InputError
from logitcache.cache.reader import open_dataset
from logitcache.tools.cli import main

EOT, OTHER = 2, 3  # the tiny template ends turns with </s> (2); <|system|> (3) is another id


@pytest.fixture
def base_teacher(tmp_path: Path, tiny_teacher_dir: Path) -> Path:
    """The tiny teacher with a base model's generation config: eos is not the turn's end."""
    folder = Path(shutil.copytree(tiny_teacher_dir, tmp_path / "base_teacher"))
    gen = folder / "generation_config.json"
    gen.write_text(json.dumps({**json.loads(gen.read_text()), "eos_token_id": OTHER}))
    return folder


@pytest.fixture
def prompts(tmp_path: Path) -> str:
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"the cat reads {i}"}) + "\n" for i in range(3)))
    return str(path)


def cfg(prompts: str, teacher: Path, out: Path, render: str = "chat", **gen: Any) -> CaptureConfig:
    return CaptureConfig(
        input=InputConfig(prompts=(prompts,), render=render),  # type: ignore[arg-type]
        teacher=TeacherConfig(path=str(teacher)),
        run=RunConfig(out=str(out), progress=False),
        targets=TargetConfig(mode="generate", spec=replace(DEFAULT_TARGETS, k=4, n=0)),
        generate=GenerateConfig(max_new_tokens=8, **gen),
    )


def test_a_turn_end_that_is_no_eos_id_is_refused_before_the_teacher_loads(
    base_teacher: Path, prompts: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_teacher(*a: Any, **k: Any) -> Any:
        raise AssertionError("the teacher was loaded before the eos ids were checked")

    monkeypatch.setattr(capture_mod, "load_teacher", no_teacher)
    gen = re.escape(str(base_teacher / "generation_config.json"))
    with pytest.raises(
        InputError,
        match=rf"^--mode generate: the chat template of {re.escape(str(base_teacher))} ends the "
        rf"assistant's turn with '</s>' \(id 2\), but generation stops only at eos id\(s\) \[3\] "
        rf"\('<\|system\|>'\), from {gen}: every response would run on past its turn to "
        rf"--max-new-tokens 8\. Pass --eos-token-ids 2 3, or list 2 in \"eos_token_id\" of {gen}$",
    ):
        capture(cfg(prompts, base_teacher, tmp_path / "ds"))
    assert not (tmp_path / "ds").exists()


def test_the_suggested_fixes_work_as_typed(
    base_teacher: Path, prompts: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["build", "--teacher", str(base_teacher), "--prompts", prompts, "--mode", "generate",
            "--max-new-tokens", "8", "--k", "4", "--n", "0", "--no-progress"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "refused")]) == 1
    err = capsys.readouterr().err
    flags = re.search(r"Pass (--eos-token-ids [0-9 ]+), or", err)
    assert flags is not None, err
    # The flag, added to the command as printed.
    out = tmp_path / "flag"
    assert main([*argv, "--out", str(out), *shlex.split(flags.group(1))]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["capture"]["generation"]["eos_token_ids"] == [EOT, OTHER]
    saved = CaptureConfig.from_json(json.loads((out / CONFIG_NAME).read_text()))
    assert saved.generate.eos_token_ids == (EOT, OTHER)
    for ex in open_dataset(out).iter_examples():
        ended = ex.response_ids[-1] in (EOT, OTHER)
        assert ended or len(ex.response_ids) == 8
        assert not {EOT, OTHER} & set(ex.response_ids[:-1].tolist())
    # Or the id listed in the folder's generation_config.json.
    gen = base_teacher / "generation_config.json"
    gen.write_text(json.dumps({**json.loads(gen.read_text()), "eos_token_id": [OTHER, EOT]}))
    assert main([*argv, "--out", str(tmp_path / "file")]) == 0
    manifest = json.loads((tmp_path / "file" / "manifest.json").read_text())
    assert manifest["capture"]["generation"]["eos_token_ids"] == [OTHER, EOT]


def test_plain_views_have_no_turn_to_end(base_teacher: Path, prompts: str, tmp_path: Path) -> None:
    capture(cfg(prompts, base_teacher, tmp_path / "ds", render="plain"))
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["capture"]["generation"]["eos_token_ids"] == [OTHER]


def test_eos_token_ids_are_checked(tiny_teacher_dir: Path, prompts: str, tmp_path: Path) -> None:
    score = replace_targets(cfg(prompts, tiny_teacher_dir, tmp_path / "a", eos_token_ids=(2,)))
    with pytest.raises(InputError, match=r"--eos-token-ids 2 applies to --mode generate only"):
        capture(score)
    with pytest.raises(InputError, match=r"--eos-token-ids is '-1'; expected one or more token"):
        capture(cfg(prompts, tiny_teacher_dir, tmp_path / "b", eos_token_ids=(-1,)))
    with pytest.raises(
        InputError,
        match=rf"--eos-token-ids 2 999: \[999\] are not ids of the tokenizer in "
        rf"{re.escape(str(tiny_teacher_dir))} \(it has 384 tokens\); pass ids below that",
    ):
        capture(cfg(prompts, tiny_teacher_dir, tmp_path / "c", eos_token_ids=(2, 999)))


def replace_targets(c: CaptureConfig) -> CaptureConfig:
    return replace(c, targets=replace(c.targets, mode="score"))


def test_a_turn_end_in_ordinary_tokens_is_refused_without_a_one_byte_eos(
    tiny_teacher_dir: Path, prompts: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ChatML spelled as text on a tokenizer without <|im_end|>: stopping at its first piece
    ('<') would cut responses at any '<', so no --eos-token-ids is suggested."""
    folder = Path(shutil.copytree(tiny_teacher_dir, tmp_path / "chatml"))
    config = folder / "tokenizer_config.json"
    chatml = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
        "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    (folder / "chat_template.jinja").write_text(chatml)
    data = json.loads(config.read_text())
    data.pop("chat_template", None)
    config.write_text(json.dumps(data))
    monkeypatch.setattr(capture_mod, "load_teacher", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(
        InputError,
        match=r"'<\|im_end\|>', which this tokenizer writes as \d+ "
        r"ordinary token\(s\).*generation cannot stop there",
    ) as e:
        capture(cfg(prompts, folder, tmp_path / "ds"))
    assert "--eos-token-ids" not in str(e.value)
