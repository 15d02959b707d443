"""LoRA adapters on tiny models: they learn, resume exactly, and their outputs load."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from logitcache.cache.errors import InputError
from logitcache.train.adapters import MERGED_NAME, apply_lora, load_trainable_state
from logitcache.train.checkpoint import ADAPTER_NAME, latest_checkpoint
from logitcache.train.config import Config, load_config
from logitcache.train.metrics import read_metrics
from logitcache.train.trainer import train
from tests.train.helpers import capture_dataset, config_from

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora_logits")
    return {
        "train": capture_dataset(tiny_teacher_dir, root / "train", count=48),
        "eval": capture_dataset(tiny_teacher_dir, root / "eval", count=16, seed=1, prefix="ev"),
    }


def config(datasets: dict[str, Path], student: Path, out: Path, **sets: object) -> Config:
    overrides = {
        "data.train": datasets["train"],
        "data.eval": datasets["eval"],
        "data.shuffle_buffer": 16,
        "model.path": student,
        "train.output": out,
        "optim.lr": 1e-2,
        "lora.r": 8,
        "log.progress": False,
    }
    return config_from(overrides, **sets)


def test_lora_lowers_heldout_kl_and_the_adapter_and_merged_model_give_its_logits(
    datasets: dict[str, Path], tiny_student_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    cfg = config(
        datasets, tiny_student_dir, out, train__steps=24, log__eval_every=12, lora__merge=True
    )
    assert train(cfg)["finished"]
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval/kl" in r]
    first, last = evals[0]["eval/kl"], evals[-1]["eval/kl"]
    assert last < 0.85 * first, (first, last)

    # The checkpoint holds the adapters only; the trained model is the base plus them.
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and not (ckpt / "model.safetensors").exists()
    from safetensors.torch import load_file

    trained = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_student_dir), cfg.lora, seed=0)
    assert load_trainable_state(trained, load_file(str(ckpt / ADAPTER_NAME))) == []
    adapter = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_student_dir), out / "final"
    )
    merged = AutoModelForCausalLM.from_pretrained(out / MERGED_NAME)
    base = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    ids = torch.arange(3, 40).view(1, -1)
    with torch.no_grad():
        want = trained.eval()(ids).logits
        for model in (adapter, merged):
            torch.testing.assert_close(model.eval()(ids).logits, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(base(ids).logits, want, atol=1e-3)
    assert not any(n.startswith("base_model") for n, _ in merged.named_parameters())


def test_lora_resume_reproduces_the_uninterrupted_losses(
    datasets: dict[str, Path], tiny_student_dir: Path, tmp_path: Path
) -> None:
    common = dict(
        train__steps=6,
        optim__grad_accum=2,
        data__batch_size=3,
        lora__dropout=0.1,  # the adapters' dropout draws from the RNG the checkpoint restores
        log__checkpoint_every=3,
        log__eval_every=3,
    )
    assert train(config(datasets, tiny_student_dir, tmp_path / "a", **common))["finished"]
    cut = train(config(datasets, tiny_student_dir, tmp_path / "b", train__stop_after=5, **common))
    assert cut["step"] == 5 and not cut["finished"]
    resumed = train(config(datasets, tiny_student_dir, tmp_path / "b", **common), resume=True)
    assert resumed["finished"]
    keys = ("step", "loss", "kd", "ce", "grad_norm", "lr", "positions", "epoch", "eval/kl")
    a = [{k: r[k] for k in keys if k in r} for r in read_metrics(tmp_path / "a" / "metrics.jsonl")]
    b = [{k: r[k] for k in keys if k in r} for r in read_metrics(tmp_path / "b" / "metrics.jsonl")]
    assert a == b  # bit for bit


def test_the_adapter_names_its_base_by_absolute_path_and_loads_from_any_folder(
    datasets: dict[str, Path], tiny_student_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    import json

    from logitcache.train.report import evaluate_students

    monkeypatch.chdir(tiny_student_dir.parent)  # model.path as typed there: relative
    out = tmp_path / "run"
    assert train(config(datasets, Path(tiny_student_dir.name), out, train__steps=2))["finished"]
    adapter = out / "final" / "adapter_config.json"
    assert json.loads(adapter.read_text())["base_model_name_or_path"] == str(tiny_student_dir)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    final, data = str(out / "final"), str(datasets["eval"])
    assert evaluate_students([("a", final)], data).students[0].metrics["kl"] is not None

    # An adapter saved before, with its base as typed: refused, naming it and the fix.
    saved = json.loads(adapter.read_text())
    adapter.write_text(json.dumps({**saved, "base_model_name_or_path": tiny_student_dir.name}))
    (out / MERGED_NAME).mkdir()
    with pytest.raises(InputError) as e:
        evaluate_students([("a", final)], data)
    assert str(e.value) == (
        f"--student {final} is a LoRA adapter whose base model {tiny_student_dir.name!r} "
        f"(base_model_name_or_path in {adapter}) is no folder here (read from the current "
        f"folder, {tmp_path / 'elsewhere'}); set base_model_name_or_path there to the base "
        f"model's folder (an absolute path loads from anywhere), or pass {out / MERGED_NAME}, "
        "the adapters merged into the base"
    )
    adapter.write_text(json.dumps(saved))  # the fix, as it says
    assert evaluate_students([("a", final)], data).students[0].metrics["kl"] is not None


@pytest.mark.parametrize(
    ("key", "value"),
    [("modules_to_save", "lm_head"), ("target_modules", "q_proj,lm_head"),
     ("modules_to_save", "embed_tokens")],  # tied to the lm_head in the tiny student
)  # fmt: skip
def test_adapting_the_lm_head_is_refused(
    datasets: dict[str, Path], tiny_student_dir: Path, tmp_path: Path, key: str, value: str
) -> None:
    cfg = config(datasets, tiny_student_dir, tmp_path / "r", **{f"lora__{key}": value})
    with pytest.raises(InputError, match=f"lora.{key} names .* holds the lm_head weight"):
        train(cfg)


def test_lora_settings_are_checked(datasets: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InputError) as e:
        load_config(
            None,
            [
                ("data.train", str(datasets["train"]), "--data.train"),
                ("train.output", str(tmp_path), "--train.output"),
                ("model.config", "cfg.json", "--model.config"),
                ("model.tokenizer", "tok", "--model.tokenizer"),
                ("lora.r", "4", "--lora.r"),
                ("lora.dropout", "1.5", "--lora.dropout"),
            ],
        )
    assert "lora.r > 0 adapts a pretrained student: set model.path" in str(e.value)
    assert "lora.dropout=1.5 must be in [0, 1)" in str(e.value)


def test_missing_optional_packages_name_their_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from logitcache.train.config import LoraConfig
    from logitcache.train.tensorboard import open_writer

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    with pytest.raises(
        InputError, match=r"lora.r > 0 needs peft: pip install 'logitcache\[lora\]'"
    ):
        apply_lora(torch.nn.Linear(2, 2), LoraConfig(r=4), seed=0)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(InputError, match=r"pip install 'logitcache\[tensorboard\]'"):
        open_writer(tmp_path, purge_step=None)


def test_qlora_settings_are_checked(datasets: dict[str, Path], tmp_path: Path) -> None:
    sets = [
        ("data.train", str(datasets["train"]), "--data.train"),
        ("train.output", str(tmp_path), "--train.output"),
        ("model.path", "student", "--model.path"),
        ("lora.load_in_4bit", "true", "--lora.load_in_4bit"),
        ("train.device", "cpu", "--train.device"),
    ]
    with pytest.raises(InputError) as e:
        load_config(None, sets)
    assert "lora.load_in_4bit quantizes the frozen base weights under LoRA adapters (QLoRA): " \
        "set lora.r" in str(e.value)  # fmt: skip
    assert "lora.load_in_4bit needs a CUDA device (bitsandbytes' 4-bit kernels) but " \
        "train.device=cpu" in str(e.value)  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_qlora_without_cuda_is_refused_before_training(
    datasets: dict[str, Path], tiny_student_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cfg = config(datasets, tiny_student_dir, out, train__steps=2, lora__load_in_4bit=True)
    with pytest.raises(InputError, match=r"lora.load_in_4bit needs a CUDA device .* torch sees"):
        train(cfg)
    assert latest_checkpoint(out) is None


def test_qlora_without_bitsandbytes_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from logitcache.train.adapters import load_4bit

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(InputError, match=r"pip install 'logitcache\[qlora\]'"):
        load_4bit("student", gradient_checkpointing=False)


@pytest.mark.gpu
def test_qlora_lowers_heldout_kl_and_resumes_and_merges(
    datasets: dict[str, Path], tiny_student_dir: Path, tmp_path: Path
) -> None:
    """4-bit NF4 base weights (bitsandbytes) under LoRA adapters, on CUDA."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    sets = {"train__steps": 24, "log__eval_every": 12, "lora__load_in_4bit": True}
    full = config(datasets, tiny_student_dir, tmp_path / "full", **sets, lora__merge=True)
    assert train(full)["finished"]
    evals = [r["eval/kl"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if
             "eval/kl" in r]  # fmt: skip
    assert evals[-1] < 0.85 * evals[0], evals
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / MERGED_NAME)
    assert next(merged.parameters()).dtype == torch.float32
    # Stopped after step 5, resumed from its step-3 checkpoint: the uninterrupted losses.
    common = dict(train__steps=6, log__checkpoint_every=3, lora__load_in_4bit=True)
    a = config(datasets, tiny_student_dir, tmp_path / "a", **common)
    b = config(datasets, tiny_student_dir, tmp_path / "b", **common)
    assert train(a)["finished"]
    assert not train(config(datasets, tiny_student_dir, tmp_path / "b", train__stop_after=5,
                            **common))["finished"]  # fmt: skip
    assert train(b, resume=True)["finished"]
    a_, b_ = ([r["loss"] for r in read_metrics(c.train.output + "/metrics.jsonl") if "loss" in r]
              for c in (a, b))  # fmt: skip
    assert b_ == pytest.approx(a_, rel=1e-4)  # CUDA kernels: not asserted bit for bit


def test_lora_under_bf16_holds_the_base_in_bf16_and_merges_from_fp32(
    datasets: dict[str, Path], tiny_student_dir: Path, tmp_path: Path
) -> None:
    """train.precision bf16 (the default on CUDA; here on the CPU): the frozen base weights in
    bf16, the adapters in fp32; final-merged/ is merged into the fp32 base weights."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from logitcache.cache.reader import open_dataset
    from logitcache.train.student import load_student

    out = tmp_path / "run"
    cfg = config(datasets, tiny_student_dir, out, train__steps=12, log__eval_every=12,
                 train__precision="bf16", lora__merge=True)  # fmt: skip
    info = open_dataset(str(datasets["train"])).info
    model = load_student(cfg, info, frozen_dtype=torch.bfloat16)
    dtypes = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert dtypes == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}

    assert train(cfg)["finished"]
    evals = [r["eval/kl"] for r in read_metrics(out / "metrics.jsonl") if "eval/kl" in r]
    assert evals[-1] < 0.9 * evals[0], evals
    adapter = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    merged = AutoModelForCausalLM.from_pretrained(out / MERGED_NAME)
    fp32 = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_student_dir), out / "final"
    ).merge_and_unload()
    for (name, a), (_, b) in zip(
        merged.state_dict().items(), fp32.state_dict().items(), strict=True
    ):
        assert a.dtype == torch.float32 and torch.equal(a, b), name
