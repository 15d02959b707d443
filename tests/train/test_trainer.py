"""The trainer on tiny models: it learns, resumes exactly, refuses what it must."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from logitcache.cache.errors import IncompatibleError, InputError
from logitcache.cache.writer import DatasetWriter
from logitcache.tools.cli import main as cli_main
from logitcache.train.config import Config, load_config
from logitcache.train.metrics import read_metrics
from logitcache.train.trainer import CONFIG_NAME, train
from tests.cache.synth import make_examples, make_info
from tests.train.helpers import capture_dataset, config_from

MISSING_TEACHER = "/nonexistent/teacher"  # training must never need the teacher


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("logits")
    return {
        "train": capture_dataset(
            tiny_teacher_dir, root / "train", count=48, teacher_name=MISSING_TEACHER
        ),
        "eval": capture_dataset(
            tiny_teacher_dir,
            root / "eval",
            count=16,
            seed=1,
            prefix="ev",
            teacher_name=MISSING_TEACHER,
        ),
        "sampled": capture_dataset(
            tiny_teacher_dir,
            root / "sampled",
            count=24,
            kind="sampled",
            seed=2,
            teacher_name=MISSING_TEACHER,
        ),
        "tail_draws": capture_dataset(
            tiny_teacher_dir,
            root / "tail_draws",
            count=24,
            k=4,
            tail_draws=12,
            seed=3,
            teacher_name=MISSING_TEACHER,
        ),
    }


def config(datasets: dict[str, Path], student: Path, out: Path, **sets: object) -> Config:
    overrides = {
        "data.train": datasets["train"],
        "data.eval": datasets["eval"],
        "data.shuffle_buffer": 16,
        "model.path": student,
        "train.output": out,
        "optim.lr": 3e-3,
        "log.progress": False,
    }
    return config_from(overrides, **sets)


def test_training_reduces_heldout_kl_and_saves_a_loadable_student(
    datasets: dict[str, Path], tiny_student_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, png = tmp_path / "run", tmp_path / "loss.png"
    argv = [
        "train",
        "--data.train", str(datasets["train"]),
        "--data.eval", str(datasets["eval"]),
        "--model.path", str(tiny_student_dir),
        "--train.output", str(out),
        "--set", "train.steps=24",
        "--set", "optim.lr=3e-3",
        "--set", "optim.warmup_steps=2",
        "--log.eval_every", "12",
        "--log.progress", "false",
        "--plot", str(png),
    ]  # fmt: skip
    assert cli_main(argv) == 0
    rows = read_metrics(out / "metrics.jsonl")
    evals = [r for r in rows if "eval/kl" in r]
    assert [r["step"] for r in evals] == [0, 12, 24]
    first, last = evals[0]["eval/kl"], evals[-1]["eval/kl"]
    assert last < 0.75 * first, (first, last)
    assert evals[-1]["eval/top1"] > evals[0]["eval/top1"]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 25))
    assert all(math.isfinite(r["loss"]) and r["positions"] > 0 for r in steps)
    assert png.stat().st_size > 1000
    assert (out / "resolved_config.yaml").exists()

    student = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    ids = torch.tensor([tok.encode("the cat reads")])
    assert student(ids).logits.shape == (1, ids.shape[1], len(tok))
    before = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    assert not torch.equal(student.lm_head.weight, before.lm_head.weight)


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_reproduces_the_uninterrupted_losses(
    datasets: dict[str, Path], tiny_student_dir: Path, tmp_path: Path, workers: int
) -> None:
    common = dict(
        train__steps=6,
        optim__grad_accum=2,
        data__batch_size=3,
        data__num_workers=workers,
        log__checkpoint_every=3,
        log__eval_every=3,
    )
    straight = train(config(datasets, tiny_student_dir, tmp_path / "a", **common))
    assert straight["finished"]
    cut = train(config(datasets, tiny_student_dir, tmp_path / "b", train__stop_after=5, **common))
    assert cut == {"step": 5, "steps": 6, "finished": False, "output": str(tmp_path / "b")}
    assert not (tmp_path / "b" / "final").exists()
    # Steps 4 and 5 were logged, then lost with the interruption: resume redoes them from 3.
    resumed = train(config(datasets, tiny_student_dir, tmp_path / "b", **common), resume=True)
    assert resumed["finished"]
    keys = ("step", "loss", "kd", "ce", "grad_norm", "lr", "positions", "epoch", "eval/kl")
    a = [{k: r[k] for k in keys if k in r} for r in read_metrics(tmp_path / "a" / "metrics.jsonl")]
    b = [{k: r[k] for k in keys if k in r} for r in read_metrics(tmp_path / "b" / "metrics.jsonl")]
    assert a == b  # bit for bit


def test_tokenizer_mismatch_is_refused_before_training(
    tiny_student_dir: Path, tmp_path: Path
) -> None:
    info = make_info(k=4, vocab=384, teacher=MISSING_TEACHER)  # another tokenizer's fingerprint
    with DatasetWriter(tmp_path / "ds", info) as w:
        for ex in make_examples(info, 4):
            w.add(ex)
    cfg = load_config(
        None,
        [
            ("data.train", str(tmp_path / "ds"), "--set"),
            ("model.path", str(tiny_student_dir), "--set"),
            ("train.output", str(tmp_path / "run"), "--set"),
        ],
    )
    with pytest.raises(
        IncompatibleError,
        match=rf"captured with tokenizer sha256:(ab)+, but the student's tokenizer \({tiny_student_dir}\) is sha256:[0-9a-f]{{64}}",
    ):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_sampled_targets_token_budget_fresh_student_bf16_and_checkpointing(
    datasets: dict[str, Path], tiny_student_dir: Path, tmp_path: Path
) -> None:
    cfg = config(
        # Sampled targets only estimate KL + H(teacher); a top-k held-out set gives KL itself.
        {"train": datasets["sampled"], "eval": datasets["eval"]},
        tiny_student_dir,
        tmp_path / "run",
        model__path="none",
        model__config=tiny_student_dir / "config.json",
        model__tokenizer=tiny_student_dir,
        data__batch_size=0,
        data__max_tokens=96,
        data__max_seq_len=32,
        train__steps=3,
        loss__alpha=0.5,
        train__precision="bf16",  # autocast on CPU too
        model__gradient_checkpointing=True,
        log__eval_every=3,
    )
    assert train(cfg)["finished"]
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    assert all(r["tokens"] <= 96 for r in rows)
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval/kl" in r]
    assert evals and all(0 <= r["eval/kl"] < math.inf for r in evals)


def test_topk_with_tail_draws_trains_on_the_draws_by_default(
    datasets: dict[str, Path], tiny_student_dir: Path, tmp_path: Path
) -> None:
    data = {"train": datasets["tail_draws"], "eval": datasets["eval"]}
    common = dict(train__steps=8, log__eval_every=8, optim__warmup_steps=1)
    assert train(config(data, tiny_student_dir, tmp_path / "auto", **common))["finished"]
    # auto resolved to draws, and recorded so that a resume trains the same way.
    assert load_config(tmp_path / "auto" / CONFIG_NAME, []).loss.tail == "draws"
    evals = [r for r in read_metrics(tmp_path / "auto" / "metrics.jsonl") if "eval/kl" in r]
    assert evals[-1]["eval/kl"] < evals[0]["eval/kl"]
    # Same data read as plain top-k with a tail bucket: a different training signal.
    bucket = tmp_path / "bucket"
    assert train(config(data, tiny_student_dir, bucket, loss__tail="bucket", **common))["finished"]
    loss = [r["loss"] for r in read_metrics(tmp_path / "auto" / "metrics.jsonl") if "loss" in r]
    other = [r["loss"] for r in read_metrics(bucket / "metrics.jsonl") if "loss" in r]
    assert len(loss) == len(other) == 8 and loss != other
    # reverse KL has no estimator from draws: auto falls back to the bucket.
    rev = config(data, tiny_student_dir, tmp_path / "rev", loss__divergence="reverse_kl", **common)
    assert train(rev)["finished"]
    assert load_config(tmp_path / "rev" / CONFIG_NAME, []).loss.tail == "bucket"


def test_tail_draws_on_a_dataset_without_them_is_refused(
    datasets: dict[str, Path], tiny_student_dir: Path, tmp_path: Path
) -> None:
    cfg = config(datasets, tiny_student_dir, tmp_path / "run", loss__tail="draws")
    with pytest.raises(InputError, match=r"loss.tail=draws, but .*train holds top-16 f16"):
        train(cfg)
    assert not (tmp_path / "run").exists()
    with pytest.raises(InputError, match=r"loss\.tail=draws needs loss\.divergence=forward_kl"):
        config(
            datasets, tiny_student_dir, tmp_path / "r", loss__tail="draws", loss__divergence="jsd"
        )


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_the_start(
    datasets: dict[str, Path], tiny_student_dir: Path, tmp_path: Path, capsys
) -> None:
    common = dict(train__steps=4, data__batch_size=3, log__checkpoint_every=100)
    straight = train(config(datasets, tiny_student_dir, tmp_path / "a", **common))
    cut = train(config(datasets, tiny_student_dir, tmp_path / "b", train__stop_after=2, **common))
    assert cut["step"] == 2 and not (tmp_path / "b" / "checkpoints").exists()
    # A killed run leaves a checkpoint's temp folder behind; the next checkpoint removes it.
    stale = tmp_path / "b" / "checkpoints" / ".tmp-step-00000001-99999"
    stale.mkdir(parents=True)
    capsys.readouterr()
    resumed = train(config(datasets, tiny_student_dir, tmp_path / "b", **common), resume=True)
    assert "no checkpoint in" in capsys.readouterr().err
    assert straight["finished"] and resumed["finished"]
    assert not stale.exists()
    keys = ("step", "loss", "grad_norm", "eval/kl")
    a = [{k: r[k] for k in keys if k in r} for r in read_metrics(tmp_path / "a" / "metrics.jsonl")]
    b = [{k: r[k] for k in keys if k in r} for r in read_metrics(tmp_path / "b" / "metrics.jsonl")]
    assert a == b


def test_resume_and_output_guards(
    datasets: dict[str, Path], tiny_student_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    with pytest.raises(InputError, match=r"--resume: train.output=.* holds no run .*drop --resume"):
        train(config(datasets, tiny_student_dir, out, train__steps=2), resume=True)
    train(config(datasets, tiny_student_dir, out, train__steps=2, data__eval="none"))
    with pytest.raises(InputError, match=r"already holds a run; pass --resume"):
        train(config(datasets, tiny_student_dir, out, train__steps=2, data__eval="none"))
    with pytest.raises(
        InputError, match=r"config differs from the checkpoint's .* optim.lr: 0.003 → 0.1"
    ):
        train(
            config(
                datasets, tiny_student_dir, out, train__steps=2, optim__lr=0.1, data__eval="none"
            ),
            resume=True,
        )
    shutil.rmtree(out)


@pytest.mark.gpu
def test_training_on_cuda_in_bf16_learns_logs_its_memory_and_resumes(
    datasets: dict[str, Path], tiny_student_dir: Path, tmp_path: Path
) -> None:
    """The defaults on a GPU: bf16 autocast, pinned host batches; losses on resume equal the
    uninterrupted run's within bf16 kernels' run-to-run tolerance."""
    common = dict(train__steps=8, log__checkpoint_every=4, log__eval_every=8)
    a = config(datasets, tiny_student_dir, tmp_path / "a", **common)
    b = config(datasets, tiny_student_dir, tmp_path / "b", **common)
    assert train(a)["finished"]
    lines = read_metrics(tmp_path / "a" / "metrics.jsonl")
    evals = [r["eval/kl"] for r in lines if "eval/kl" in r]
    assert evals[-1] < evals[0], evals
    peaks = [r["peak_memory_alloc_gib"] for r in lines if "loss" in r]
    assert len(peaks) == 8 and all(p > 0 for p in peaks) and peaks == sorted(peaks)
    cut = config(datasets, tiny_student_dir, tmp_path / "b", train__stop_after=6, **common)
    assert not train(cut)["finished"]
    assert train(b, resume=True)["finished"]
    losses = [[r["loss"] for r in read_metrics(c.train.output + "/metrics.jsonl") if "loss" in r]
              for c in (a, b)]  # fmt: skip
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
