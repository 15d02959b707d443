"""The demo's whole path (capture with context → train without → measure) on the tiny model.

The real run uses SmolLM2 and takes minutes; this checks the wiring and its outputs in seconds.
"""

from __future__ import annotations

import json
import math

from logitcache.tools.demo import DemoConfig, run_demo


def test_demo_pipeline_on_tiny_teacher(tmp_path, tiny_teacher_dir, capsys):
    cfg = DemoConfig(
        workdir=str(tmp_path / "demo"),
        train_prompts=16,
        heldout_prompts=4,
        max_new_tokens=6,
        epochs=2,
        lr=3e-3,
        batch_size=4,
        show=1,
        teacher=str(tiny_teacher_dir),
    )
    summary = run_demo(cfg)
    assert math.isfinite(summary["kl_before"]) and math.isfinite(summary["kl_after"])
    assert summary["kl_after"] < summary["kl_before"]  # the student moves toward the teacher
    assert (tmp_path / "demo" / "training.png").stat().st_size > 1000
    assert json.loads((tmp_path / "demo" / "demo_summary.json").read_text()) == summary
    out = capsys.readouterr().out
    assert "KL(teacher with context ‖ student without)" in out
    assert "teacher+context:" in out
    assert "top-32 + 32 tail draws stored" in out


def test_demo_stores_the_capture_default_targets():
    from logitcache.cache.capture_config import TargetConfig

    t = TargetConfig().spec
    assert (DemoConfig().k, DemoConfig().n, t.kind) == (t.k, t.n, "topk")
