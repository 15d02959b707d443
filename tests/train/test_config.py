"""Training config: file + overrides, and errors that name the key, the place and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from logitcache.cache.errors import InputError
from logitcache.cache.settings import field_docs
from logitcache.tools.cli import build_parser
from logitcache.tools.cmd_train import overrides_from_args
from logitcache.train.config import Config, DataConfig, load_config

REQUIRED = [
    ("data.train", "ds", "--set"),
    ("train.output", "out", "--set"),
    ("model.path", "student", "--set"),
]


def test_every_field_has_a_one_line_docstring() -> None:
    from dataclasses import fields

    from logitcache.train.config import SECTIONS

    for cls in SECTIONS.values():
        docs = field_docs(cls)
        for f in fields(cls):
            assert f.name in docs and "\n" not in docs[f.name], f"{cls.__name__}.{f.name}"


def test_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 0.001\n  grad_accum: 2\ndata:\n  train: ds\n  eval: null\n")
    cfg = load_config(path, [("optim.lr", "3e-4", "--set"), *REQUIRED[1:]])
    assert cfg.optim.lr == 3e-4 and cfg.optim.grad_accum == 2
    assert cfg.data == DataConfig(train="ds")
    json_path = tmp_path / "run.json"
    json_path.write_text('{"data": {"train": "ds", "batch_size": 2}, "train": {"output": "o"}}')
    assert load_config(json_path, [REQUIRED[2]]).data.batch_size == 2


def test_unknown_key_in_a_file_names_the_line_and_the_valid_keys(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 0.001\n  learning_rate: 0.1\n")
    with pytest.raises(
        InputError,
        match=r"run.yaml:3: unknown key 'optim.learning_rate'; valid keys of optim: lr, ",
    ):
        load_config(path, REQUIRED)


def test_unknown_key_on_the_command_line() -> None:
    with pytest.raises(
        InputError, match=r"--set optim.lrr: unknown key 'optim.lrr'; valid keys of optim"
    ):
        load_config(None, [*REQUIRED, ("optim.lrr", "1", "--set optim.lrr")])
    with pytest.raises(
        InputError,
        match=r"unknown key 'optimizer.lr'; keys are section.field with sections data, model",
    ):
        load_config(None, [*REQUIRED, ("optimizer.lr", "1", "--set optimizer.lr")])


def test_every_problem_is_reported_at_once() -> None:
    overrides = [
        ("data.batch_size", "eight", "--data.batch_size"),
        ("loss.divergence", "kl", "--loss.divergence"),
        ("optim.lr", "1", "--set optim.lr"),
    ]
    with pytest.raises(InputError) as err:
        load_config(None, overrides)
    msg = str(err.value)
    assert "--data.batch_size: data.batch_size='eight': expected an integer" in msg
    # inf and nan are refused as settings (a saved config would hold non-JSON Infinity/NaN)
    with pytest.raises(InputError) as err:
        load_config(None, [("optim.lr", "inf", "--optim.lr"), ("loss.alpha", "nan", "--set")])
    assert "--optim.lr: optim.lr='inf': expected a finite number" in str(err.value)
    assert "loss.alpha='nan': expected a finite number" in str(err.value)
    assert "loss.divergence='kl': expected one of 'forward_kl' | 'reverse_kl' | 'jsd'" in msg
    with pytest.raises(InputError) as err:
        load_config(None, [("optim.lr", "-1", "--set")])
    msg = str(err.value)
    assert "data.train is not set: pass --data.train PATH" in msg
    assert "train.output is not set" in msg and "optim.lr=-1.0 must be > 0" in msg
    assert "set exactly one of model.path" in msg
    # Mistyped values and wrong ones are reported together; a mistyped key only once.
    with pytest.raises(InputError) as err:
        load_config(
            None,
            [
                *REQUIRED,
                ("optim.lr", "nan", "--optim.lr"),
                ("train.steps", "-1", "--train.steps"),
                ("loss.alpha", "2", "--loss.alpha"),
                ("data.max_tokens", "many", "--data.max_tokens"),
                ("data.batch_size", "0", "--data.batch_size"),
            ],
        )
    msg = str(err.value)
    assert msg.startswith("invalid config (4 problems):")
    assert "optim.lr='nan': expected a finite number" in msg
    assert "data.max_tokens='many': expected an integer" in msg
    assert "train.steps=-1 must be ≥ 0" in msg and "loss.alpha=2.0 must be in [0, 1]" in msg


def test_cli_flags_mirror_the_fields() -> None:
    argv = [
        "train",
        "--data.train",
        "ds",
        "--set",
        "optim.lr=0.5",
        "--optim.grad_accum",
        "3",
        "--plot",
        "x.png",
    ]
    args = build_parser(argv).parse_args(argv)
    cfg = load_config(None, [*REQUIRED[1:], *overrides_from_args(args)])
    assert (cfg.data.train, cfg.optim.lr, cfg.optim.grad_accum, cfg.log.plot) == (
        "ds",
        0.5,
        3,
        "x.png",
    )
    bad = build_parser(["train", "--set", "optim.lr"]).parse_args(["train", "--set", "optim.lr"])
    with pytest.raises(InputError, match="expected KEY=VALUE"):
        overrides_from_args(bad)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(
        None, [*REQUIRED, ("data.eval", "ev", "--set"), ("loss.alpha", "0.5", "--set")]
    )
    cfg.dump(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert isinstance(cfg, Config)
