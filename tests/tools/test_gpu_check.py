"""`python -m logitcache.tools.gpu_check`: refuses without CUDA; its sections run (on the CPU,
at toy sizes, with the hidden --smoke flag). The figures themselves need a GPU box."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from logitcache.tools import gpu_check


def test_refuses_without_a_cuda_device(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "figures.json")]) == 2
    assert capsys.readouterr().err == "gpu_check: no CUDA device; this script is for a GPU box\n"
    assert not (tmp_path / "figures.json").exists()


def test_pytest_summary_lines_are_counted() -> None:
    assert gpu_check.pytest_counts("6 passed in 23.82s") == {
        "passed": 6, "failed": 0, "skipped": 0, "errors": 0,
    }  # fmt: skip
    assert gpu_check.pytest_counts("1 failed, 4 passed, 2 skipped, 1 error in 9.1s") == {
        "passed": 4, "failed": 1, "skipped": 2, "errors": 1,
    }  # fmt: skip
    assert sum(gpu_check.pytest_counts("no tests ran in 0.51s").values()) == 0


def test_the_tail_draws_section_compares_two_computations(capsys) -> None:
    report = gpu_check.Report("cpu (test)")
    gpu_check.draws_section(report, gpu_check.SMOKE, "cpu")
    got = {f["name"]: f["value"] for f in report.figures}
    # The CPU against itself: the same ids, draws and log-probs.
    assert got["rows with the same top-k ids"] == got["rows with the same tail draws"] == 1.0
    assert got["max |Δ log p| (rows with the same ids)"] == 0.0
    assert got["targets positions/s on cpu"] > 0
    assert "[cpu (test)] tail draws (bf16 logits): targets positions/s on cpu = " in (
        capsys.readouterr().out
    )


@pytest.mark.slow
def test_every_section_runs_at_toy_size_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    assert gpu_check.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["failed"] == [] and report["card"] == "cpu (smoke)"
    names = {(f["section"].split(" (")[0], f["name"]) for f in report["figures"]}
    for figure in [
        ("capture", "capture ÷ bare (paired median)"),
        ("generate", "HF generate + targets ÷ bare"),
        ("training step", "KD (offline) ÷ CE (HF)"),
        ("chunked loss", "V=1024 chunked@256 peak ÷ dense"),
        ("tail draws", "rows the same up to tied logits"),
    ]:
        assert figure in names, figure
    assert all(f["card"] == "cpu (smoke)" and f["value"] == f["value"] for f in report["figures"])
    skipped = {s["section"] for s in report["skipped"]}
    assert skipped == {"pytest -m gpu", "generate (vLLM)"}
