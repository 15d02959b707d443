"""The demo's whole path (capture with context → train without → measure) on the tiny model.

The real run uses SmolLM2 and takes minutes; this checks the wiring and its outputs in seconds.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from logitcache.tools.cli import main as cli_main
from logitcache.tools.demo import DemoConfig, run_demo
from logitcache.tools.demo.behaviour import load_demo_prompts
from logitcache.train.metrics import read_metrics


def _generate_from_text(model_dir: str, prompts: list[str], max_new_tokens: int) -> list[str]:
    """How the demo generated before it called `logitcache eval`: from the prompt text."""
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
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        gen = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
    out = tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [o.strip() for o in out]


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
    assert "answers opening with 'Ahoy'" in out and "answers with pirate words" in out
    # The eval library gives the numbers the trainer logged: eval/kl at step 0 and at the end.
    work = tmp_path / "demo"
    logged = [
        m["eval/kl"] for m in read_metrics(work / "student" / "metrics.jsonl") if "eval/kl" in m
    ]
    assert (summary["kl_before"], summary["kl_after"]) == (logged[0], logged[-1])
    assert (work / "report" / "report.md").exists() and (work / "report" / "kl.png").exists()
    # ... and the answers the demo generated from the prompt text before it called eval.
    texts = [p["prompt"] for p in load_demo_prompts()[:4]]
    after = _generate_from_text(str(work / "student" / "final"), texts, 6)
    report = (work / "report" / "report.md").read_text()
    for answer in after:
        assert (
            f"| `student after` | {answer.replace('|', chr(92) + '|').replace(chr(10), '<br>') or '(empty)'} |"
            in report
        )


@pytest.mark.parametrize("expect", [r"\w", None])
def test_demo_on_your_own_context_and_prompts(
    tmp_path: Path, tiny_teacher_dir: Path, capsys, expect: str | None
):
    context = tmp_path / "context.txt"
    context.write_text("You answer every question about the sea, in one line.")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": f"mine{i:02d}", "prompt": f"Tell me fact {i}."}) + "\n"
            for i in range(12)
        )
    )
    work = tmp_path / "demo"
    argv = [
        "demo", "--workdir", str(work), "--teacher", str(tiny_teacher_dir),
        "--context", str(context), "--prompts", str(prompts),
        "--train-prompts", "8", "--heldout-prompts", "4", "--max-new-tokens", "5",
        "--epochs", "1", "--batch-size", "4", "--show", "1",
    ]  # fmt: skip
    assert cli_main(argv + (["--expect", expect] if expect else [])) == 0
    out = capsys.readouterr().out
    summary = json.loads((work / "demo_summary.json").read_text())
    assert "(context.txt) + prompt" in out and "prompt: Tell me fact 0." in out
    assert "Ahoy" not in out and "pirate" not in out
    assert [
        json.loads(line)["id"] for line in (work / "heldout.jsonl").read_text().splitlines()
    ] == [f"mine{i:02d}" for i in range(4)]
    if expect:
        assert f"answers matching {expect!r}:" in out
        assert summary["expect"] == expect and 0 <= summary["expect_student_after"] <= 1
        assert f"`{expect}` found" in (work / "report" / "report.md").read_text()
    else:
        assert "KL only" in out and not any(k.startswith(("expect", "ahoy")) for k in summary)
    assert math.isfinite(summary["kl_after"])


def test_demo_refuses_bad_inputs_before_loading_a_teacher(tmp_path: Path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "hi"}) + "\n")
    argv = ["demo", "--workdir", str(tmp_path / "w"), "--teacher", str(tmp_path / "no-teacher")]
    assert cli_main([*argv, "--expect", "(unclosed"]) == 1
    assert "--expect '(unclosed' is not a valid regular expression" in capsys.readouterr().err
    assert cli_main([*argv, "--context", str(tmp_path / "none.txt")]) == 1
    assert "--context" in capsys.readouterr().err
    assert cli_main([*argv, "--prompts", str(prompts)]) == 1
    err = capsys.readouterr().err
    assert (
        f"--prompts {prompts} holds 1 prompts but --heldout-prompts 24 + --train-prompts 64" in err
    )
    assert not (tmp_path / "w").exists()


def test_demo_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        cli_main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--workdir", "--train-prompts", "--heldout-prompts", "--max-new-tokens", "--k",
                 "--n", "--epochs", "--lr", "--batch-size", "--show", "--teacher", "--context",
                 "--prompts", "--expect"):  # fmt: skip
        described = re.search(rf"{flag} [A-Z]+ (.*?)(?= --|$)", text)
        assert described and len(described.group(1)) > 20, flag


def test_demo_stores_the_capture_default_targets():
    from logitcache.cache.capture_config import TargetConfig

    t = TargetConfig().spec
    assert (DemoConfig().k, DemoConfig().n, t.kind) == (t.k, t.n, "topk")
