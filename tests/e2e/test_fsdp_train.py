"""`torchrun --nproc-per-node 2 ... --train.parallel fsdp` on CPU (gloo): FSDP2 trains to DDP's
losses, and an interrupted FSDP run resumes onto the uninterrupted run's losses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from logitcache.cache.errors import InputError
from logitcache.train.config import load_config
from logitcache.train.metrics import read_metrics
from logitcache.train.trainer import train
from tests.e2e.test_ddp_train import torchrun_train
from tests.train.helpers import capture_dataset

KEYS = ("step", "loss", "kd", "ce", "grad_norm", "lr", "positions", "epoch", "eval/kl")


def losses(out: Path) -> list[dict]:
    return [{k: r[k] for k in KEYS if k in r} for r in read_metrics(out / "metrics.jsonl")]


def test_two_process_fsdp_trains_to_ddps_losses_and_resumes_exactly(
    tiny_teacher_dir: Path, tiny_student_dir: Path, tmp_path: Path
) -> None:
    ds = capture_dataset(tiny_teacher_dir, tmp_path / "ds", count=40, shard_positions=120)
    # grad_accum 2: the first micro-batch of a step skips the gradient reduce-scatter.
    every = ("--log.checkpoint_every", "3", "--log.eval_every", "3", "--optim.grad_accum", "2")
    fsdp = ("--train.parallel", "fsdp")
    torchrun_train(ds, tiny_student_dir, tmp_path / "ddp", *every)
    torchrun_train(ds, tiny_student_dir, tmp_path / "a", *every, *fsdp)
    ddp, a = losses(tmp_path / "ddp"), losses(tmp_path / "a")
    assert [r["step"] for r in a if "loss" in r] == list(range(1, 8))
    # Same data, same sums. Measured (torch 2.13, gloo, 2 CPU ranks, fp32): losses, KD, CE and
    # eval KL/CE equal to the last bit, the final weights too; grad_norm (summed from the
    # ranks' shards) within 1.3e-7 relative. Asserted with margin: 1e-6 relative.
    assert [sorted(r) for r in a] == [sorted(r) for r in ddp]
    for x, y in zip(a, ddp, strict=True):
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-6), (k, x, y)
    assert (tmp_path / "a" / "final" / "config.json").exists()
    # Stopped after step 5, mid-epoch; the (sharded) checkpoint is step 3.
    torchrun_train(ds, tiny_student_dir, tmp_path / "b", *every, *fsdp, "--train.stop_after", "5")
    assert (tmp_path / "b" / "checkpoints" / "step-00000003" / "sharded").is_dir()
    assert not (tmp_path / "b" / "final").exists()
    torchrun_train(ds, tiny_student_dir, tmp_path / "b", *every, *fsdp, "--resume")
    assert losses(tmp_path / "b") == a  # bit for bit
    # The final students: the same weights, saved as DDP saves them (tied lm_head once).

    fa = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    fb = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    fd = load_file(str(tmp_path / "ddp" / "final" / "model.safetensors"))
    assert fa.keys() == fb.keys() == fd.keys()
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    assert all(torch.allclose(fa[k], fd[k], rtol=1e-6, atol=1e-7) for k in fa)  # measured: equal


@pytest.mark.slow
def test_fsdp_resumed_on_three_ranks_trains_as_ddp_resumed_on_three(
    tiny_teacher_dir: Path, tiny_student_dir: Path, tmp_path: Path
) -> None:
    # DCP reshards the 2-rank checkpoint's weights and Adam moments onto 3 ranks; the data
    # carried over is the same for both, so FSDP must go on as DDP (whose checkpoint is whole).
    ds = capture_dataset(tiny_teacher_dir, tmp_path / "ds", count=40, shard_positions=120)
    every = ("--log.checkpoint_every", "3", "--log.eval_every", "3", "--optim.grad_accum", "2")
    for name, extra in (("ddp", ()), ("fsdp", ("--train.parallel", "fsdp"))):
        torchrun_train(
            ds, tiny_student_dir, tmp_path / name, *every, *extra, "--train.stop_after", "5"
        )
        torchrun_train(ds, tiny_student_dir, tmp_path / name, *every, *extra, "--resume", nproc=3)
    ddp, fsdp = losses(tmp_path / "ddp"), losses(tmp_path / "fsdp")
    assert [r["step"] for r in fsdp if "loss" in r] == list(range(1, 8))
    trained = read_metrics(tmp_path / "fsdp" / "metrics.jsonl")
    examples = [r["examples"] for r in trained if "loss" in r]
    assert examples[:4] == [16, 16, 16, 24]  # 3 ranks × 4 × grad_accum 2 after the resume
    assert [sorted(r) for r in fsdp] == [sorted(r) for r in ddp]
    for x, y in zip(fsdp, ddp, strict=True):
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-6), (k, x, y)
    fa = load_file(str(tmp_path / "fsdp" / "final" / "model.safetensors"))
    fd = load_file(str(tmp_path / "ddp" / "final" / "model.safetensors"))
    assert fa.keys() == fd.keys()
    assert all(torch.allclose(fa[k], fd[k], rtol=1e-5, atol=1e-6) for k in fa)


def test_fsdp_is_refused_with_lora_and_on_one_process(
    tmp_path: Path, tiny_student_dir: Path
) -> None:
    with pytest.raises(InputError, match=r"train.parallel=fsdp trains every weight; got lora.r=8"):
        load_config(
            None,
            [
                ("data.train", "x", "--data.train"),
                ("train.output", "y", "--train.output"),
                ("model.path", "m", "--model.path"),
                ("lora.r", "8", "--lora.r"),
                ("train.parallel", "fsdp", "--train.parallel"),
            ],
        )
    cfg = load_config(
        None,
        [
            ("data.train", str(tmp_path / "nothing"), "--data.train"),
            ("train.output", str(tmp_path / "out"), "--train.output"),
            ("model.path", str(tiny_student_dir), "--model.path"),
            ("train.parallel", "fsdp", "--train.parallel"),
        ],
    )
    with pytest.raises(InputError, match=r"train.parallel=fsdp .* but this is one process"):
        train(cfg)
