"""`logitcache eval`: students scored on a held-out logit dataset, into report.md and kl.png."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from logitcache.cache.errors import IncompatibleError, InputError
from logitcache.tools.cli import main as cli_main
from logitcache.tools.tiny import make_tiny_model, make_tiny_tokenizer
from logitcache.train.report import evaluate_students

PROMPTS = ["What is the capital of France?", "Write a poem.", "Explain rain.", "Say hello.", "2+2?"]


@pytest.fixture(scope="module")
def heldout(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path) -> Path:
    """The tiny teacher's own greedy answers, no context, exact (f32) top-16 targets."""
    work = tmp_path_factory.mktemp("eval")
    prompts = work / "heldout.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS))
    )
    out = work / "heldout-logits"
    rc = cli_main([
        "build", "--teacher", str(tiny_teacher_dir), "--prompts", str(prompts), "--out", str(out),
        "--mode", "generate", "--max-new-tokens", "6", "--k", "16", "--n", "0", "--codec", "f32",
        "--no-progress",
    ])  # fmt: skip
    assert rc == 0
    return out


def test_eval_writes_a_report_with_kl_answers_and_the_expect_share(
    heldout: Path, tiny_teacher_dir: Path, tiny_student_dir: Path, tmp_path: Path, capsys
):
    out = tmp_path / "report"
    rc = cli_main([
        "eval", "--student", str(tiny_teacher_dir), "--student", str(tiny_student_dir),
        "--data", str(heldout), "--expect", r"\w", "--max-new-tokens", "6", "--out", str(out),
    ])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert (out / "kl.png").stat().st_size > 1000
    assert "![KL per student](kl.png)" in md
    for d in (tiny_teacher_dir, tiny_student_dir):
        assert f"| `{d}` |" in md and f"{d}: KL " in printed
    assert md.count("| teacher (stored response) |") == len(PROMPTS)
    assert "`\\w` found" in md and r"'\\w' found in" in printed
    # report.json carries the same measures for scripts.
    data = json.loads((out / "report.json").read_text())
    assert [s["path"] for s in data["students"]] == [str(tiny_teacher_dir), str(tiny_student_dir)]
    for s in data["students"]:
        assert f"{s['path']}: KL {s['metrics']['kl']:.4f}" in printed
        found = sum(re.search(r"\w", a) is not None for a in s["answers"])
        assert s["expect_rate"] == found / len(PROMPTS)


def test_the_teacher_scored_on_its_own_targets_has_kl_zero_and_agrees_everywhere(
    heldout: Path, tiny_teacher_dir: Path, tiny_student_dir: Path
):
    r = evaluate_students(
        [("teacher", str(tiny_teacher_dir)), ("student", str(tiny_student_dir))],
        str(heldout),
        generate=True,
        max_new_tokens=6,
        expect="^x",
    )
    teacher, student = r.students
    assert teacher.metrics["kl"] == pytest.approx(0.0, abs=1e-5)
    assert teacher.metrics["top1"] == 1.0
    assert student.metrics["kl"] > 0.01
    assert teacher.metrics["positions"] == student.metrics["positions"] > 0
    assert r.ids == sorted(f"q{i}" for i in range(len(PROMPTS)))
    # Greedy, no context: the teacher regenerates exactly what it stored.
    assert teacher.answers == r.teacher_answers
    for s in r.students:
        assert s.expect_rate == sum(a.startswith("x") for a in s.answers) / len(PROMPTS)
    assert r.temperature == 1.0


def test_a_student_with_another_tokenizer_is_refused(
    heldout: Path, tiny_teacher_dir: Path, tmp_path: Path
):
    other = make_tiny_model(
        tmp_path / "other", make_tiny_tokenizer(tmp_path / "tok", vocab_size=300), hidden=32
    )
    with pytest.raises(
        IncompatibleError,
        match=rf"--student {re.escape(str(other))}: its tokenizer is sha256:.*captured with sha256:.*shares the teacher's tokenizer",
    ):
        evaluate_students([("a", str(tiny_teacher_dir)), ("b", str(other))], str(heldout))


def test_missing_folders_and_a_bad_regex_are_reported_at_once(heldout: Path, tmp_path: Path):
    missing = tmp_path / "nope"
    with pytest.raises(InputError) as e:
        evaluate_students([("x", str(missing))], str(tmp_path / "no-data"), expect="(unclosed")
    msg = str(e.value)
    assert msg.startswith("3 problems:")
    assert re.search(rf"--student {re.escape(str(missing))}: no such folder", msg)
    assert re.search(r"--data .*no-data: no logit dataset there \(no manifest.json\)", msg)
    assert re.search(r"--expect '\(unclosed' is not a valid regular expression", msg)


def test_a_capture_not_finalized_gets_the_advice_of_the_other_tools(
    heldout: Path, tiny_teacher_dir: Path, tmp_path: Path
):
    import json as json_
    import shutil

    copy = tmp_path / "interrupted"
    shutil.copytree(heldout, copy)
    (copy / "manifest.json").unlink()
    journal = next((copy / "_parts").glob("*.json"))
    obj = json_.loads(journal.read_text())
    journal.write_text(json_.dumps({**obj, "finished": False}))  # as a killed build leaves it
    with pytest.raises(InputError) as e:
        evaluate_students([("t", str(tiny_teacher_dir))], str(copy))
    msg = str(e.value)
    assert f"--data {copy}: " in msg and "rerun the `logitcache build` command" in msg
    assert f"logitcache finalize {copy} --partial" in msg


def test_the_cli_prints_the_error_and_exits_1(heldout: Path, tmp_path: Path, capsys):
    rc = cli_main(
        [
            "eval",
            "--student",
            str(tmp_path / "nope"),
            "--data",
            str(heldout),
            "--out",
            str(tmp_path / "r"),
        ]
    )
    assert rc == 1
    assert re.search(
        r"logitcache eval: error: --student .*nope: no such folder", capsys.readouterr().err
    )
    assert not (tmp_path / "r").exists()


def test_without_matplotlib_the_error_names_the_extra(
    heldout: Path, tiny_teacher_dir: Path, tmp_path: Path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    rc = cli_main(
        [
            "eval",
            "--student",
            str(tiny_teacher_dir),
            "--data",
            str(heldout),
            "--out",
            str(tmp_path / "r"),
        ]
    )
    assert rc == 1
    assert "pip install 'logitcache[plot]'" in capsys.readouterr().err


def test_an_existing_file_as_the_report_folder_is_refused_before_scoring(
    heldout: Path, tiny_student_dir: Path, tmp_path: Path, capsys
):
    (tmp_path / "score.jsonl").write_text("{}\n")
    for out, problem in (
        ("score.jsonl", "is an existing file, not a folder; choose a new folder name"),
        ("score.jsonl/a/b", f"{tmp_path / 'score.jsonl'} is a file, not a folder"),
    ):
        out = str(tmp_path / out)
        argv = ["eval", "--student", str(tiny_student_dir), "--data", str(heldout), "--out", out]
        assert cli_main(argv) == 1
        assert f"logitcache eval: error: --out {out}" in (err := capsys.readouterr().err)
        assert problem in err


def test_on_sampled_targets_the_measure_is_named_kl_plus_the_teachers_entropy(
    heldout: Path, tiny_teacher_dir: Path, tmp_path: Path, capsys
):
    sampled = tmp_path / "sampled"
    prompts = Path(heldout).parent / "heldout.jsonl"
    rc = cli_main([
        "build", "--teacher", str(tiny_teacher_dir), "--prompts", str(prompts), "--out",
        str(sampled), "--mode", "generate", "--max-new-tokens", "6", "--targets", "sampled",
        "--no-progress",
    ])  # fmt: skip
    assert rc == 0
    name, out = str(tiny_teacher_dir), tmp_path / "r"
    assert cli_main(["eval", "--student", name, "--data", str(sampled), "--out", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    # The teacher on its own draws: its KL is 0, so what is left is its entropy, well above 0.
    ce = data["students"][0]["metrics"]["kl"]
    assert data["kl_includes_teacher_entropy"] is True and ce > 0.5
    assert f"{name}: KL + teacher entropy {ce:.4f}  CE " in capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert "KL(teacher ‖ student) + the teacher's entropy (the cross-entropy to the" in md
    assert "| student | KL + teacher entropy (nats/token) |" in md and "| KL (nats" not in md
    out = tmp_path / "topk"
    assert cli_main(["eval", "--student", name, "--data", str(heldout), "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["kl_includes_teacher_entropy"] is False
    assert re.search(rf"{re.escape(name)}: KL -?0\.0000  CE ", capsys.readouterr().out)
