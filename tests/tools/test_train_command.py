"""`logitcache train`: what it tells the user to run next works when typed as printed."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from logitcache.tools.cli import main as cli_main
from logitcache.tools.cmd_train import resume_command
from logitcache.train import trainer
from logitcache.train.config import Config, load_config
from logitcache.train.metrics import read_metrics
from logitcache.train.trainer import CONFIG_NAME
from tests.train.helpers import capture_dataset

KEYS = ("step", "loss", "kd", "ce", "grad_norm", "lr", "positions", "examples", "epoch")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path) -> Path:
    return capture_dataset(tiny_teacher_dir, tmp_path_factory.mktemp("logits") / "ds", count=24)


def argv(ds: Path, student: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--data.train", str(ds),
        "--model.path", str(student),
        "--train.output", str(out),
        "--train.epochs", "2",
        "--data.batch_size", "3",
        "--data.num_workers", "2",
        "--data.shuffle_buffer", "4",
        "--optim.lr", "3e-3",
        "--log.checkpoint_every", "3",
        "--log.progress", "false",
        *extra,
    ]  # fmt: skip


def losses(out: Path) -> list[dict]:
    return [{k: r[k] for k in KEYS} for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def follow(advice: str) -> int:
    """Run the command that ``advice`` ends with, exactly as printed."""
    command = shlex.split(advice.rsplit("to continue, run: ", 1)[1])
    assert command[:2] == ["logitcache", "train"], command
    return cli_main(command[1:])


@pytest.fixture(scope="module")
def straight(dataset: Path, tiny_student_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("straight") / "run"
    assert cli_main(argv(dataset, tiny_student_dir, out)) == 0
    return losses(out)


def test_the_advice_after_stop_after_finishes_the_run(
    dataset: Path, tiny_student_dir: Path, tmp_path: Path, straight: list[dict], capsys
) -> None:
    out = tmp_path / "run"
    first = argv(dataset, tiny_student_dir, out, "--train.stop_after", "5")
    assert cli_main(first) == 0
    advice = capsys.readouterr().out.strip().splitlines()[-1]
    steps = len(straight)
    config = out / CONFIG_NAME
    assert advice == (
        f"stopped at step 5 of {steps} (train.stop_after); to continue, run: "
        f"logitcache train --config {config} --resume"
    )
    # The saved config is the run's, which ends at its last step, not at this invocation's.
    assert load_config(config, []).train.stop_after == 0
    # The same command again is refused, naming --resume; with it, it stops where it was told.
    assert cli_main(first) == 1
    assert "already holds a run; pass --resume to continue it" in capsys.readouterr().err
    assert cli_main([*first, "--resume"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == advice
    assert follow(advice) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"done: {steps} steps; student saved to {out}/final"
    )
    assert losses(out) == straight  # bit for bit, as if never stopped


def test_the_advice_after_an_interruption_finishes_the_run(
    dataset: Path,
    tiny_student_dir: Path,
    tmp_path: Path,
    straight: list[dict],
    capsys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lr_at = trainer.lr_at

    def interrupted_at_step_4(step: int, cfg: Config, total: int) -> float:
        if step == 4:
            raise KeyboardInterrupt
        return lr_at(step, cfg, total)

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(trainer, "lr_at", interrupted_at_step_4)
        assert cli_main(argv(dataset, tiny_student_dir, out)) == 130
    advice = capsys.readouterr().err.strip().splitlines()[-1]
    assert advice == (
        f"logitcache train: interrupted; to continue, run: "
        f"logitcache train --config {out / CONFIG_NAME} --resume"
    )
    assert follow(advice) == 0
    assert losses(out) == straight


def test_an_interruption_before_the_run_is_set_up_says_to_rerun_the_command(
    dataset: Path, tiny_student_dir: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    out = tmp_path / "run"
    command = argv(dataset, tiny_student_dir, out, "--train.epochs", "0.25")
    assert cli_main([*command, "--resume"]) == 1  # nothing to resume: told to drop --resume
    assert "holds no run to resume; drop --resume to start" in capsys.readouterr().err
    with monkeypatch.context() as m:
        m.setattr(trainer, "load_student", interrupted)
        assert cli_main(command) == 130
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("interrupted; nothing was saved yet; rerun the same command to start the run")
    )
    assert cli_main(command) == 0
    assert "done: " in capsys.readouterr().out


def test_under_torchrun_the_advice_relaunches_as_many_processes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resume_command("runs/a b/resolved_config.yaml") == (
        "torchrun --standalone --nproc-per-node 4 -m logitcache.tools.cli train "
        "--config 'runs/a b/resolved_config.yaml' --resume"
    )
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two nodes: only the launcher knows the rest
    assert "on each of the 2 nodes" in resume_command("r/resolved_config.yaml")


def test_the_plot_folders_are_made_and_a_failed_plot_keeps_the_finished_run(
    dataset: Path, tiny_student_dir: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    plot = tmp_path / "new" / "dir" / "loss.png"
    command = argv(dataset, tiny_student_dir, tmp_path / "a", "--train.steps", "2")
    assert cli_main([*command, "--plot", str(plot)]) == 0
    assert plot.stat().st_size > 1000

    # Should writing it fail anyway, the run still ends well, saying how to plot it.
    def full_disk(*args: object) -> None:
        raise OSError(28, "No space left on device")

    out, plot = tmp_path / "b", tmp_path / "b.png"
    with monkeypatch.context() as m:
        m.setattr(trainer, "plot_metrics", full_disk)
        command = argv(dataset, tiny_student_dir, out, "--train.steps", "2")
        assert cli_main([*command, "--plot", str(plot)]) == 0
    printed = capsys.readouterr()
    assert f"student saved to {out}/final" in printed.out
    advice = printed.err.strip().splitlines()[-1]
    assert advice.startswith(f"log.plot={str(plot)!r}: the loss curves could not be written (")
    python, flag, code = shlex.split(advice.split("To plot them, run: ", 1)[1])
    assert (python, flag) == ("python", "-c")
    subprocess.run([sys.executable, "-c", code], check=True)  # the command as printed
    assert plot.stat().st_size > 1000


def test_bad_paths_are_refused_at_once_before_anything_loads(
    dataset: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trainer, "setup_dist", None)  # reaching it would be a TypeError
    monkeypatch.chdir(tmp_path)
    Path("score.jsonl").write_text("{}\n")
    command = argv(dataset, Path("nope"), Path("score.jsonl"), "--model.tokenizer", "tok")
    assert cli_main([*command, "--plot", "score.jsonl/loss.png"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("logitcache train: error: invalid config (4 problems):")
    for problem in (
        "model.path='nope': no such folder; pass a folder saved with save_pretrained (e.g. a "
        "training run's <train.output>/final); students are loaded from local folders only, "
        "never downloaded",
        "model.tokenizer='tok': no such folder; point it at the student's tokenizer folder",
        "train.output='score.jsonl' is an existing file, not a folder; choose a new folder name",
        "log.plot='score.jsonl/loss.png': score.jsonl is a file, not a folder",
    ):
        assert f"  - {problem}" in err
    Path("empty").mkdir()
    config = argv(dataset, Path("empty"), Path("run"), "--model.path", "null")
    assert cli_main([*config, "--model.config", "cfg.json", "--model.tokenizer", "empty"]) == 1
    assert "model.config='cfg.json': no such file (nor a folder holding config.json)" in (
        capsys.readouterr().err
    )
    assert cli_main(argv(dataset, Path("empty"), Path("run"))) == 1
    assert "model.path='empty': no config.json (or adapter_config.json) in the folder" in (
        capsys.readouterr().err
    )


def test_the_eval_line_on_sampled_targets_names_kl_plus_the_teachers_entropy(
    dataset: Path, tiny_teacher_dir: Path, tiny_student_dir: Path, tmp_path: Path, capsys
) -> None:
    sampled = capture_dataset(tiny_teacher_dir, tmp_path / "sampled", count=6, kind="sampled")
    for data, label in ((sampled, "KL + teacher entropy"), (dataset, "KL")):
        out = tmp_path / f"run-{data.name}"
        extra = ("--train.steps", "1", "--data.eval", str(data))
        assert cli_main(argv(dataset, tiny_student_dir, out, *extra)) == 0
        line = rf"^step 0: eval {re.escape(label)} \d+\.\d{{4}}  CE "
        assert re.search(line, capsys.readouterr().out, re.M)
