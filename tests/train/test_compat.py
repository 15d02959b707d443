"""The run against its datasets: what a dataset was captured with must agree with the config."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from logitcache.cache.errors import IncompatibleError, InputError
from logitcache.cache.tokenizer import tokenizer_fingerprint
from logitcache.cache.writer import DatasetWriter
from logitcache.tools.cli import main as cli_main
from logitcache.train.config import Config, load_config
from logitcache.train.metrics import read_metrics
from logitcache.train.trainer import train
from tests.cache.synth import make_examples, make_info
from tests.train.helpers import capture_dataset, config_from


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("capture_temperatures")
    return {
        "t1": capture_dataset(tiny_teacher_dir, root / "t1", count=16),
        "t2": capture_dataset(tiny_teacher_dir, root / "t2", count=16, temperature=2.0),
        "eval2": capture_dataset(
            tiny_teacher_dir, root / "eval2", count=8, seed=1, prefix="ev", temperature=2.0
        ),
    }


def config(
    train_ds: Path, eval_ds: Path | None, student: Path, out: Path, **sets: object
) -> Config:
    overrides = {
        "data.train": train_ds,
        "data.shuffle_buffer": 8,
        "model.path": student,
        "train.output": out,
        "train.steps": 2,
        "log.progress": False,
        **({"data.eval": eval_ds} if eval_ds is not None else {}),
    }
    return config_from(overrides, **sets)


def test_a_capture_temperature_other_than_loss_temperature_is_refused(
    sets: dict[str, Path], tiny_student_dir: Path, tmp_path: Path
) -> None:
    cfg = config(sets["t2"], sets["eval2"], tiny_student_dir, tmp_path / "run")
    t2 = re.escape(repr(str(sets["t2"])))
    with pytest.raises(
        InputError,
        match=rf"^loss\.temperature=1\.0 but data\.train={t2} was captured at temperature 2\.0 "
        r"\(capture\.temperature in its manifest\.json\): the KD term would compare the teacher "
        r"softened by 2\.0 with the student softened by 1\.0\. Pass --loss\.temperature 2\.0, or "
        r"--loss\.allow_temperature_mismatch true if the mismatch is deliberate$",
    ):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_the_suggested_flags_work_as_typed(
    sets: dict[str, Path], tiny_student_dir: Path, tmp_path: Path
) -> None:
    base = [
        "train",
        "--data.train", str(sets["t2"]),
        "--data.eval", str(sets["eval2"]),
        "--model.path", str(tiny_student_dir),
        "--train.steps", "2",
        "--log.progress", "false",
    ]  # fmt: skip
    for name, fix in [
        ("matched", ["--loss.temperature", "2.0"]),
        ("deliberate", ["--loss.allow_temperature_mismatch", "true"]),
    ]:
        out = tmp_path / name
        assert cli_main([*base, "--train.output", str(out), *fix]) == 0
        evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval/kl" in r]
        assert evals and all(math.isfinite(r["eval/kl"]) for r in evals)
    resolved = load_config(tmp_path / "matched" / "resolved_config.yaml", [])
    assert resolved.loss.temperature == 2.0


def test_a_heldout_set_captured_at_another_temperature_is_refused(
    sets: dict[str, Path], tiny_student_dir: Path, tmp_path: Path
) -> None:
    cfg = config(sets["t1"], sets["eval2"], tiny_student_dir, tmp_path / "run")
    e2 = re.escape(repr(str(sets["eval2"])))
    with pytest.raises(
        InputError,
        match=rf"^data\.eval={e2} was captured at temperature 2\.0 \(capture\.temperature in its "
        r"manifest\.json\) but training runs at data\.train's 1\.0: its held-out KL would compare "
        r"the teacher at 2\.0 with the student at 1\.0\. Hold out a set captured with "
        r"`logitcache build` at --temperature 1\.0, or pass --loss\.allow_temperature_mismatch "
        r"true to score it anyway$",
    ):
        train(cfg)


def test_every_disagreement_with_the_datasets_is_reported_at_once(
    sets: dict[str, Path], tiny_student_dir: Path, tmp_path: Path
) -> None:
    # Another tokenizer's held-out set (captured at 1.0), a 2.0 training set without tail
    # draws, loss.tail=draws: four problems, one error.
    other = make_info(k=4, vocab=384, teacher="another")
    with DatasetWriter(tmp_path / "other", other) as w:
        for ex in make_examples(other, 4):
            w.add(ex)
    cfg = config(
        sets["t2"], tmp_path / "other", tiny_student_dir, tmp_path / "run", loss__tail="draws"
    )
    with pytest.raises(IncompatibleError) as err:
        train(cfg)
    msg = str(err.value)
    assert msg.startswith(
        "the run disagrees with its datasets (4 problems):\n  - tokenizer mismatch"
    )
    assert f"the dataset {tmp_path / 'other'} (data.eval) was captured with tokenizer" in msg
    assert "loss.temperature=1.0 but data.train=" in msg
    assert "data.eval=" in msg and "training runs at data.train's 2.0" in msg
    assert "loss.tail=draws, but" in msg
    assert not (tmp_path / "run").exists()


def test_a_heldout_vocab_the_student_does_not_cover_is_refused(
    sets: dict[str, Path], tiny_student_dir: Path, tmp_path: Path
) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_student_dir)
    wide = replace(make_info(k=4, vocab=500), tokenizer_fingerprint=tokenizer_fingerprint(tok))
    with DatasetWriter(tmp_path / "wide", wide) as w:
        for ex in make_examples(wide, 4):
            w.add(ex)
    cfg = config(sets["t1"], tmp_path / "wide", tiny_student_dir, tmp_path / "run")
    wide_url = re.escape(repr(str(tmp_path / "wide")))
    with pytest.raises(
        InputError,
        match=rf"the student's lm_head has 384 rows but data\.eval={wide_url} has vocab 500 "
        r"\(tokenizer\.vocab_size in its manifest\.json\); the student must cover every teacher id",
    ):
        train(cfg)
    assert not (tmp_path / "run").exists()
    # The training set alone: one problem, named as such.
    with pytest.raises(InputError) as err:
        train(config(tmp_path / "wide", None, tiny_student_dir, tmp_path / "run"))
    assert str(err.value).count("has vocab 500") == 1 and "data.train=" in str(err.value)


def test_an_empty_training_set_says_it_is_empty(
    tiny_tokenizer_dir: Path, tiny_student_dir: Path, tmp_path: Path
) -> None:
    """Every record dropped at capture: the error says so, not 'lower data.num_workers'."""
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    info = replace(
        make_info("topk", k=8, vocab=len(tok)), tokenizer_fingerprint=tokenizer_fingerprint(tok)
    )
    with DatasetWriter(tmp_path / "empty", info) as w:
        w.extra.update({"too_long": {"dropped": 23}, "skipped_count": 0})
    cfg = config(tmp_path / "empty", None, tiny_student_dir, tmp_path / "run")
    with pytest.raises(
        InputError,
        match=r"holds no examples; its capture left out 23 as too long and skipped 0 bad record",
    ):
        train(cfg)
