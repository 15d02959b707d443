"""`logitcache demo`: context distillation end to end on the real SmolLM2 teacher."""

from __future__ import annotations

import argparse
import dataclasses

from .demo import DemoConfig, run_demo

HELP = "context distillation end to end on the real SmolLM2 teacher"


def add_arguments(p: argparse.ArgumentParser) -> None:
    defaults = DemoConfig()
    for f in dataclasses.fields(DemoConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float}.get(str(f.type), str)
        p.add_argument(
            flag,
            type=kind,
            default=getattr(defaults, f.name),
            help=f"(default {getattr(defaults, f.name)})",
        )


def run(args: argparse.Namespace) -> int:
    cfg = DemoConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)})
    s = run_demo(cfg)
    ok = s["kl_drop"] >= 0.7 and s["ahoy_student_after"] > s["ahoy_student_before"] + 0.3
    print(
        "demo: PASS (KL fell ≥ 70% and the behaviour moved)"
        if ok
        else "demo: the goals (KL −70%, behaviour moved) were not reached in this run"
    )
    return 0
