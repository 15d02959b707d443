"""The capture's settings: flags generated from CaptureConfig, configs saved before, --config."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from dataclasses import replace
from pathlib import Path

import pytest

from logitcache.cache import capture_config as cc
from logitcache.cache.capture_config import CaptureConfig, TargetConfig, target_flags
from logitcache.cache.errors import InputError
from logitcache.cache.format import TargetSpec
from logitcache.cache.reader import open_dataset
from logitcache.cache.settings import settings
from logitcache.tools.cli import build_parser, main
from logitcache.tools.cmd_build import add_arguments, config_from_args

DATA = Path(__file__).parent.parent / "data"
SAVED = sorted((DATA / "capture_config_v1").glob("*.json"))
REQUIRED = ["--teacher", "t", "--prompts", "p.jsonl", "--out", "o"]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- flags


def test_build_flags_keep_their_spellings() -> None:
    """Every flag `logitcache build` had before its flags were generated, as it was."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    flags = {a.option_strings[0]: a for a in p._actions if a.option_strings[0] != "-h"}
    assert sorted(flags) == sorted([
        "--prompts", "--context", "--render", "--on-error", "--max-length", "--truncation",
        "--teacher", "--tokenizer", "--dtype", "--device", "--trust-remote-code", "--mode",
        "--targets", "--k", "--n", "--sampling", "--codec", "--temperature", "--max-new-tokens",
        "--k-mass", "--k-min", "--n-rate",
        "--gen-temperature", "--top-p", "--seed", "--eos-token-ids", "--out", "--max-batch-tokens",
        "--shard-positions", "--num-shards", "--shard-index", "--no-progress", "--config",
        "--license",
        "--engine", "--tp", "--teacher-url", "--gpu-memory-utilization", "--max-in-flight",
        "--request-timeout", "--request-retries",
    ])  # fmt: skip
    assert [f for f, a in flags.items() if a.required] == ["--prompts", "--teacher", "--out"]
    assert {f: a.nargs for f, a in flags.items() if a.nargs} == {
        "--prompts": "+",
        "--eos-token-ids": "+",
    }
    assert {f: a.choices for f, a in flags.items() if a.choices} == {
        "--render": ["chat", "plain"],
        "--on-error": ["raise", "skip"],
        "--truncation": ["error", "left", "drop"],
        "--dtype": ["auto", "float32", "bfloat16", "float16"],
        "--mode": ["score", "generate"],
        "--targets": ["topk", "sampled"],
        "--sampling": ["systematic", "multinomial"],
        "--codec": ["f32", "f16", "u8", "u16"],
        "--engine": ["hf", "vllm"],
    }
    typed = {f: a.type for f, a in flags.items() if a.type is not None}
    assert typed == {
        "--context": str, "--max-length": int, "--teacher": str, "--tokenizer": str,
        "--device": str, "--k": int, "--n": int, "--temperature": float,
        "--k-mass": float, "--k-min": int, "--n-rate": float,
        "--max-new-tokens": int, "--gen-temperature": float, "--top-p": float, "--seed": int,
        "--eos-token-ids": int, "--out": str, "--max-batch-tokens": int,
        "--shard-positions": int, "--num-shards": int, "--shard-index": int, "--prompts": str,
        "--license": str, "--tp": int, "--teacher-url": str, "--gpu-memory-utilization": float,
        "--max-in-flight": int, "--request-timeout": float, "--request-retries": int,
    }  # fmt: skip
    args = parse([*REQUIRED, "--no-progress", "--trust-remote-code", "--eos-token-ids", "2", "3"])
    assert (args.progress, args.trust_remote_code, args.eos_token_ids) == (False, True, [2, 3])
    assert target_flags() == {
        "kind": "--targets",
        "k": "--k",
        "n": "--n",
        "codec": "--codec",
        "sampling": "--sampling",
        "k_mass": "--k-mass",
        "k_min": "--k-min",
        "n_rate": "--n-rate",
    }


@pytest.mark.parametrize("command", ["build", "train"])
def test_every_setting_has_a_flag_and_a_help_line(command: str, capsys) -> None:
    from logitcache.train.config import Config

    with pytest.raises(SystemExit):
        main([command, "--help"])
    shown = capsys.readouterr().out
    flat = "".join(shown.split())  # argparse wraps lines, also after hyphens
    root = CaptureConfig if command == "build" else Config
    for s in settings(root):
        flag = s.flag if command == "build" else f"--{s.key}"
        assert s.doc and "\n" not in s.doc, s.key
        assert re.search(rf"^  {re.escape(flag)}\b", shown, re.M), s.key
        assert "".join(s.doc.split()) in flat, s.key


def test_flags_not_given_keep_the_defaults() -> None:
    cfg = config_from_args(parse(REQUIRED))
    defaults = CaptureConfig(
        input=cc.InputConfig(prompts=("p.jsonl",)),
        teacher=cc.TeacherConfig(path="t"),
        run=cc.RunConfig(out="o"),
    )
    assert cfg == defaults and cfg.targets.spec == cc.DEFAULT_TARGETS


def test_missing_required_flags_are_named_by_argparse(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser(["build"]).parse_args(["build", "--k", "3"])
    assert e.value.code == 2
    assert "the following arguments are required: --prompts, --teacher, --out" in (
        capsys.readouterr().err
    )


# --------------------------------------------------------------------------- one target spec


def test_target_validation_speaks_the_callers_names() -> None:
    bad = TargetSpec("topk", k=0, n=300, codec="u9", sampling="stratified")  # type: ignore[arg-type]
    assert bad.validate() == [
        "targets.k is 0; top-k targets need k ≥ 1",
        "targets.n is 300; top-k tail draws need 0 ≤ n ≤ 255 (0: none)",
        "targets.codec is 'u9'; expected one of f32, f16, u8, u16",
        "targets.sampling is 'stratified'; expected one of systematic, multinomial",
    ]
    assert [p.split(" is ")[0] for p in bad.validate(target_flags())] == [
        "--k",
        "--n",
        "--codec",
        "--sampling",
    ]
    cfg = CaptureConfig(
        input=cc.InputConfig(prompts=("p",)),
        teacher=cc.TeacherConfig(path="t"),
        run=cc.RunConfig(out="o"),
        targets=TargetConfig(spec=replace(cc.DEFAULT_TARGETS, kind="sampled", n=0)),  # type: ignore[arg-type]
    )
    assert cfg.validate() == ["--n is 0; sampled targets need 1 ≤ n ≤ 255"]
    wrong_kind = replace(cc.DEFAULT_TARGETS, kind="dense")  # type: ignore[arg-type]
    assert wrong_kind.validate(target_flags()) == ["--targets is 'dense'; expected topk or sampled"]


def test_the_config_keeps_the_flags_and_the_dataset_what_they_mean() -> None:
    """--n 0: capture_config.json keeps --sampling; the stored spec has no scheme. Sampled
    targets: --k stays in the config, the stored spec has k = 0."""
    plain = TargetConfig(spec=replace(cc.DEFAULT_TARGETS, n=0))
    assert plain.spec.sampling == "systematic" and plain.stored().sampling is None
    sampled = TargetConfig(spec=replace(cc.DEFAULT_TARGETS, kind="sampled", n=8))
    assert sampled.spec.k == 32 and sampled.stored() == TargetSpec(
        "sampled", k=0, n=8, codec="u8", sampling="systematic"
    )


# --------------------------------------------------------------------------- saved configs


@pytest.mark.parametrize("path", [*SAVED, DATA / "format_v1/capture_chat_default" / cc.CONFIG_NAME])
def test_configs_saved_before_load_unchanged(path: Path) -> None:
    """capture_config.json written by the code before this config mechanism (the fixtures'
    README names the commits) loads, saves back the same, and reads the same as --config."""
    stored = json.loads(path.read_text())
    cfg = CaptureConfig.from_json(stored, where=str(path))
    again = json.loads(cfg.dumps())
    stored["generate"].setdefault("eos_token_ids", None)  # configs older than the flag
    stored["run"].setdefault("license", None)  # configs older than the flag
    engine_flags = {  # configs older than issue 13's engine flags
        "engine": "hf", "tp": 1, "url": None, "gpu_memory_utilization": None,
        "max_in_flight": 64, "request_timeout": 600.0, "request_retries": 8,
    }  # fmt: skip
    for key, value in engine_flags.items():
        stored["teacher"].setdefault(key, value)
    for key in ("k_mass", "k_min", "n_rate"):  # configs older than adaptive targets
        stored["targets"].setdefault(key, None)
    assert again == stored
    assert config_from_args(parse(["--config", str(path)])) == cfg


def test_configs_saved_before_mean_what_their_flags_said() -> None:
    load = {p.stem: CaptureConfig.from_json(json.loads(p.read_text())) for p in SAVED}
    assert load["default"].targets.spec == cc.DEFAULT_TARGETS
    no_draws = load["topk_no_draws"].targets
    assert no_draws.spec == TargetSpec("topk", k=8, n=0, codec="f16", sampling="systematic")
    assert no_draws.stored().sampling is None
    sampled = load["sampled_multinomial"]
    assert sampled.targets.spec.kind == "sampled" and sampled.targets.temperature == 2.0
    assert sampled.targets.stored() == TargetSpec("sampled", n=8, sampling="multinomial")
    assert (sampled.teacher.dtype, sampled.input.render) == ("float32", "plain")
    gen = load["generate"]
    assert (gen.targets.mode, gen.generate.eos_token_ids, gen.generate.top_p) == (
        "generate",
        (2,),
        0.9,
    )
    assert (gen.input.on_error, gen.input.truncation, gen.input.max_length) == ("skip", "left", 64)


def test_repeated_list_flags_add_up() -> None:
    """`--prompts a --prompts b` reads both, in order, as `--prompts a b` does."""
    for argv in (
        ["--prompts", "a.jsonl", "--prompts", "b.jsonl"],
        ["--prompts", "a.jsonl", "b.jsonl"],
    ):
        cfg = config_from_args(parse(["--teacher", "t", "--out", "o", *argv]))
        assert cfg.input.prompts == ("a.jsonl", "b.jsonl")
    flags = ["--mode", "generate", "--eos-token-ids", "2", "--eos-token-ids", "5", "7"]
    assert config_from_args(parse([*REQUIRED, *flags])).generate.eos_token_ids == (2, 5, 7)
    path = next(p for p in SAVED if p.stem == "generate")  # a file's list is replaced, not added to
    cfg = config_from_args(parse(["--config", str(path), "--prompts", "x.jsonl", "--prompts", "y"]))
    assert cfg.input.prompts == ("x.jsonl", "y")


def test_flags_override_a_config_file() -> None:
    path = next(p for p in SAVED if p.stem == "sampled_multinomial")
    cfg = config_from_args(parse(["--config", str(path), "--n", "4", "--out", "elsewhere"]))
    assert cfg.targets.spec == replace(
        cc.DEFAULT_TARGETS, kind="sampled", n=4, sampling="multinomial"
    )
    assert cfg.run.out == "elsewhere" and cfg.targets.temperature == 2.0
    with pytest.raises(InputError, match=r"--k does not apply to sampled targets"):
        config_from_args(parse(["--config", str(path), "--k", "8"]))


def test_config_file_problems_name_file_line_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("targets:\n  k: 8\n  kk: 3\n  n: many\nrun:\n  out: o\nruns:\n  x: 1\n")
    with pytest.raises(InputError) as e:
        config_from_args(parse(["--config", str(path), "--teacher", "t", "--prompts", "p"]))
    msg = str(e.value)
    assert msg.startswith("invalid config (3 problems):")
    assert f"{path}:3: unknown key 'targets.kk'; valid keys of targets: mode, kind, k, n" in msg
    assert f"{path}:4: targets.n='many': expected an integer" in msg
    assert f"{path}:8: unknown key 'runs.x'; keys are section.field with sections input" in msg
    with pytest.raises(InputError, match=r"input.prompts is not set: pass --prompts"):
        config_from_args(parse(["--config", str(path), "--teacher", "t"]))
    with pytest.raises(InputError, match=r"capture config: unknown key 'targets.kk'"):
        CaptureConfig.from_json({"targets": {"kk": 1}})


# --------------------------------------------------------------------------- the resume advice


def test_the_resume_advice_works_as_printed(tmp_path: Path, tiny_teacher_dir: Path, capsys) -> None:
    prompts = tmp_path / "p.jsonl"
    recs = [{"id": f"q{i}", "prompt": f"the cat reads {i}", "response": "yes"} for i in range(6)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in recs[:4]))
    out = tmp_path / "ds"
    argv = ["build", "--teacher", str(tiny_teacher_dir), "--prompts", str(prompts), "--k", "8"]
    assert main([*argv, "--n", "4", "--no-progress", "--out", str(out)]) == 0
    prompts.write_text("".join(json.dumps(r) + "\n" for r in recs))  # two more records
    capsys.readouterr()

    assert main([*argv, "--out", str(out)]) == 1  # other settings: n = 32 now
    err = capsys.readouterr().err
    assert "targets.n: was 4, now 32" in err
    advice = re.search(
        r"original flags to resume, as: (logitcache build --config \S+ --out \S+);", err
    )
    assert advice is not None, err
    command = shlex.split(advice.group(1))
    assert command[0] == "logitcache"
    assert main(command[1:]) == 0
    assert "captured 2 examples" in capsys.readouterr().out
    ds = open_dataset(out, verify=True)
    assert ds.num_examples == 6 and ds.info.targets == TargetSpec(
        "topk", k=8, n=4, codec="u8", sampling="systematic"
    )


def test_a_moved_dataset_resumes_in_its_new_folder(
    tmp_path: Path, tiny_teacher_dir: Path, capsys, caplog
) -> None:
    """A dataset's own capture_config.json stores the --out it was built with; after the folder
    moved, the printed advice and a plain --config both resume it where it is now, never in
    the old place; an explicit --out still wins."""
    prompts = tmp_path / "p.jsonl"
    recs = [{"id": f"q{i}", "prompt": f"the cat reads {i}", "response": "yes"} for i in range(6)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in recs[:4]))
    argv = ["build", "--teacher", str(tiny_teacher_dir), "--prompts", str(prompts), "--k", "8"]
    assert main([*argv, "--n", "4", "--no-progress", "--out", str(tmp_path / "old")]) == 0
    (tmp_path / "old").rename(tmp_path / "new")
    new = tmp_path / "new"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in recs))  # two more records
    capsys.readouterr()

    assert main([*argv, "--out", str(new)]) == 1  # other settings: n = 32 now
    err = capsys.readouterr().err
    advice = re.search(r"original flags to resume, as: (logitcache build .*);", err)
    assert advice is not None, err
    command = shlex.split(advice.group(1))
    assert command[command.index("--out") + 1] == str(new)
    assert main([*command[1:], "--no-progress"]) == 0
    assert "captured 2 examples" in capsys.readouterr().out
    assert not (tmp_path / "old").exists() and open_dataset(new).num_examples == 6

    new.rename(tmp_path / "newer")
    config = str(tmp_path / "newer" / cc.CONFIG_NAME)
    assert config_from_args(parse(["--config", config])).run.out == str(tmp_path / "newer")
    assert f"writing to the dataset folder it is in, {tmp_path / 'newer'}" in caplog.text
    elsewhere = config_from_args(parse(["--config", config, "--out", str(tmp_path / "x")]))
    assert elsewhere.run.out == str(tmp_path / "x")


# --------------------------------------------------------------------------- adaptive targets


def test_adaptive_target_flags_reach_the_spec() -> None:
    cfg = config_from_args(
        parse([*REQUIRED, "--k-mass", "0.9", "--k-min", "2", "--k", "16", "--n-rate", "64"])
    )
    spec = cfg.targets.spec
    assert (spec.k_mass, spec.k_min, spec.k, spec.n, spec.n_rate) == (0.9, 2, 16, 32, 64.0)
    assert cfg.validate() == []
    assert spec.stored().variable and cfg.targets.stored().label == (
        "top-≤16 @0.9 u8 + ≤32 tail draws @64/mass"
    )


def problems_of(args: argparse.Namespace) -> list[str]:
    """The problems `logitcache build` lists (one error for all of them), one per line."""
    with pytest.raises(InputError) as e:
        config_from_args(args)
    head, *lines = str(e.value).split("\n  ")
    assert head == "invalid settings:"
    return lines


def test_bad_adaptive_flags_are_all_named_with_the_fix() -> None:
    bad = parse([*REQUIRED, "--k-mass", "1.5", "--k-min", "40", "--n-rate", "-1"])
    problems = problems_of(bad)
    assert problems == [
        "--k-mass is 1.5; expected a probability mass 0 < mass ≤ 1 (e.g. 0.9), or leave it out "
        "for a fixed k",
        "--k-min is 40; expected 1 ≤ --k-min ≤ --k (32)",
        "--n-rate is -1.0; expected a finite number of draws per unit of tail mass > 0 (e.g. "
        "64), or leave it out for --n draws at every position",
    ]
    for rate in ("inf", "nan"):  # JSON has no Infinity or NaN: the manifest would not parse
        with pytest.raises(InputError, match=f"--n-rate: targets.n_rate={rate}: expected a finite"):
            config_from_args(parse([*REQUIRED, "--n-rate", rate]))
        spec = TargetSpec("topk", k=8, n=8, sampling="systematic", n_rate=float(rate))
        assert spec.validate()[0].startswith(
            f"targets.n_rate is {float(rate)!r}; expected a finite"
        )
    floor_alone = problems_of(parse([*REQUIRED, "--k-min", "2"]))
    assert floor_alone == [
        "--k-min is 2 but --k-mass is not set; the floor applies to adaptive top-k only: add "
        "--k-mass (e.g. 0.9) or drop --k-min"
    ]
    no_draws = problems_of(parse([*REQUIRED, "--n", "0", "--n-rate", "8"]))
    assert no_draws == [
        "--n-rate is 8.0 but --n is 0 (no tail draws); --n caps the draws of a position: set "
        "it (e.g. --n 32) or drop --n-rate"
    ]
    sampled = parse([*REQUIRED, "--targets", "sampled", "--n", "8", "--k-mass", "0.9"])
    assert problems_of(sampled) == [
        "--k-mass applies to top-k targets only, not to sampled ones; drop it or use --targets topk"
    ]
    with pytest.raises(SystemExit):  # argparse: not a number
        parse([*REQUIRED, "--k-mass", "most"])


def test_the_resume_command_names_the_folder_and_the_part(tmp_path) -> None:
    """The printed command resumes the folder where it is now, and a job array's part k (the
    saved config is part 0's) with its own --shard-index."""
    from logitcache.cache.capture_info import resume_command
    from logitcache.cache.storage import Location

    loc = Location(str(tmp_path / "my ds"))
    config, out = shlex.quote(str(tmp_path / "my ds" / cc.CONFIG_NAME)), shlex.quote(str(loc))
    assert resume_command(loc) == f"logitcache build --config {config} --out {out}"
    assert resume_command(loc, 3).endswith(f"--out {out} --shard-index 3")
