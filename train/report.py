"""Students scored on a held-out logit dataset: `logitcache eval`, and the demo's measures.

For each student folder, over the held-out dataset's stored teacher targets:

* ``kl``, ``ce``, ``top1``: :func:`logitcache.train.evaluate.evaluate` over the batches the
  trainer's own held-out eval reads (:func:`logitcache.train.trainer.make_loader`), at the
  dataset's capture temperature, so a student scored here gets the number its training run
  logged as ``eval/kl`` for the same weights and the same ``batch_size`` (on sampled targets
  ``kl`` is the cross-entropy to the teacher's draws, KL + the teacher's entropy, and is
  labelled "KL + teacher entropy");
* with ``generate``: its greedy answers to the dataset's stored prompts (the student's view,
  ``prompt_ids``), in id order, beside the teacher's stored response;
* with ``expect``: the share of answers (the teacher's too) in which the regex is found
  (``re.search``; anchor it with ``^`` to ask for an opening).

:func:`write_report` turns the result into ``report.md`` and ``kl.png`` (matplotlib).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from logitcache.cache.errors import IncompatibleError, InputError, ManifestError
from logitcache.cache.format import PARTS_DIR
from logitcache.cache.manifest import load_manifest
from logitcache.cache.paths import output_problem
from logitcache.cache.storage import Location

from .metrics import kl_label

REPORT_NAME = "report.md"
PLOT_NAME = "kl.png"
JSON_NAME = "report.json"
GENERATE_BATCH = 16
"""Prompts per `generate` call (left-padded), as the demo has always generated."""


@dataclass(frozen=True)
class StudentResult:
    """One student's measures on the held-out set."""

    name: str
    """How the report names it (the folder as typed, or the demo's "student before")."""
    path: str
    """The student's folder."""
    metrics: dict[str, float | int | None]
    """kl, ce, top1 (None over zero positions), positions, examples, dropped_targets."""
    answers: list[str] | None = None
    """Greedy answers, one per prompt of :attr:`EvalResult.ids` (with generate)."""
    expect_rate: float | None = None
    """Share of :attr:`answers` matching the expect regex (with expect)."""


@dataclass(frozen=True)
class EvalResult:
    """Every student's measures on one held-out dataset."""

    data: str
    temperature: float
    """The dataset's capture temperature, at which the students' KL was taken."""
    targets: str
    """The dataset's targets, as a label (e.g. top-32 u8 + 32 draws)."""
    students: list[StudentResult]
    kl_includes_teacher_entropy: bool = False
    """True on sampled targets: each student's ``kl`` is then the cross-entropy to the teacher's
    draws, the KL plus the teacher's entropy (labelled "KL + teacher entropy")."""
    ids: list[str] = field(default_factory=list)
    """Example ids of the generated prompts, in order (with generate)."""
    prompts: list[str] = field(default_factory=list)
    """The stored prompts (student view), decoded (with generate)."""
    teacher_answers: list[str] = field(default_factory=list)
    """The teacher's stored responses, decoded with the first student's tokenizer."""
    expect: str | None = None
    teacher_expect_rate: float | None = None
    max_new_tokens: int = 0


def check_plot_available() -> None:
    """Refuse before any work when matplotlib (the report's PNG) is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError(
            "the eval report's PNG needs matplotlib, which is not installed: "
            "pip install 'logitcache[plot]'"
        ) from None


def compile_expect(expect: str | None, flag: str = "--expect") -> re.Pattern[str] | None:
    if expect is None:
        return None
    try:
        return re.compile(expect)
    except re.error as e:
        raise InputError(
            f"{flag} {expect!r} is not a valid regular expression ({e}); fix the pattern "
            "(Python `re` syntax; quote it in the shell)"
        ) from None


def _problems(students: Sequence[tuple[str, str]], data: str, out: str | None) -> list[str]:
    from .student import model_folder_problem

    problems = [p for _, path in students if (p := model_folder_problem(path, f"--student {path}"))]
    if out is not None and (problem := output_problem(out, f"--out {out}", folder=True)):
        problems.append(problem)
    if "://" not in data and not (Path(data) / "manifest.json").is_file():
        if (Path(data) / PARTS_DIR).is_dir():  # a capture not finalized: say what finishes it
            try:
                load_manifest(Location(data))
            except ManifestError as e:
                problems.append(f"--data {data}: {e}")
        else:
            problems.append(
                f"--data {data}: no logit dataset there (no manifest.json); pass a held-out set "
                "captured with `logitcache build`"
            )
    return problems


def evaluate_students(
    students: Sequence[tuple[str, str]],
    data: str,
    *,
    generate: bool = False,
    max_new_tokens: int = 64,
    expect: str | None = None,
    batch_size: int = 8,
    device: str = "auto",
    out: str | None = None,
) -> EvalResult:
    """Score each ``(name, folder)`` of ``students`` on the held-out dataset ``data``.

    Everything that can be refused is refused before a model is loaded, all at once: a missing
    folder (or a LoRA adapter's missing base), a dataset that is not one, a bad ``expect``
    regex, an ``out`` folder the report cannot be written to (:func:`write_report`), and a
    student whose tokenizer fingerprint is not the dataset's (its ids would mean other tokens).
    """
    import torch

    from logitcache.cache.reader import open_dataset
    from logitcache.cache.tokenizer import tokenizer_fingerprint

    from .compat import capture_temperature
    from .config import Config, DataConfig, LossConfig, ModelConfig, TrainConfig
    from .evaluate import evaluate
    from .loss_plan import plan_loss
    from .student import final_hidden, load_student, load_tokenizer, setup_dist
    from .trainer import make_loader

    if not students:
        raise InputError("no student to evaluate: pass --student DIR (repeatable)")
    problems = _problems(students, data, out)
    try:
        pattern = compile_expect(expect)
    except InputError as e:
        problems.append(str(e))
        pattern = None
    if problems:
        raise InputError(_join(problems))
    info = open_dataset(data).info
    temperature = capture_temperature(info) or 1.0

    def config(path: str) -> Config:
        return Config(
            data=DataConfig(train=data, eval=data, batch_size=batch_size),
            model=ModelConfig(path=path),
            loss=LossConfig(temperature=temperature),
            train=TrainConfig(device=device),  # type: ignore[arg-type]
        )

    tokenizers = {}
    for name, path in students:
        tok = load_tokenizer(config(path), name=f"--student {path}")
        found = tokenizer_fingerprint(tok)
        if found != info.tokenizer_fingerprint:
            problems.append(
                f"--student {path}: its tokenizer is {found} but --data {data} was captured with "
                f"{info.tokenizer_fingerprint} (tokenizer.fingerprint in its manifest.json); token "
                "ids would mean different things. Evaluate a student that shares the teacher's "
                "tokenizer"
            )
        tokenizers[name] = tok
    if problems:
        raise IncompatibleError(_join(problems))

    examples = []
    if generate or pattern is not None:
        examples = sorted(open_dataset(data).iter_examples(), key=lambda ex: ex.id)
    first = tokenizers[students[0][0]]
    teacher_answers = [
        first.decode(ex.response_ids.tolist(), skip_special_tokens=True).strip() for ex in examples
    ]
    tail = plan_loss(LossConfig(temperature=temperature), info.targets).topk_tail
    results = []
    for name, path in students:
        cfg = config(path)
        dist = setup_dist(cfg)
        tok = tokenizers[name]
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        model = load_student(cfg, info, name=f"--student {path}").to(dist.device).eval()
        loader = make_loader(cfg, data, info, dist, train=False, pad_id=pad_id)
        metrics = evaluate(
            loader,
            lambda b, model=model: final_hidden(model, b.input_ids, b.attention_mask, b.positions),
            model.get_output_embeddings(),
            device=dist.device,
            tail=tail,
            temperature=temperature,
            all_reduce=dist.sum,
        )
        answers = None
        if examples:
            answers = _generate(model, tok, [ex.prompt_ids for ex in examples], max_new_tokens)
        results.append(StudentResult(name, path, metrics, answers, _rate(pattern, answers)))
        dist.close()
        if dist.device.type == "cuda":
            torch.cuda.empty_cache()
    return EvalResult(
        data=data,
        temperature=temperature,
        targets=info.targets.label,
        students=results,
        kl_includes_teacher_entropy=info.targets.kind == "sampled",
        ids=[ex.id for ex in examples],
        prompts=[
            first.decode(ex.prompt_ids.tolist(), skip_special_tokens=True).strip()
            for ex in examples
        ],
        teacher_answers=teacher_answers,
        expect=expect,
        teacher_expect_rate=_rate(pattern, teacher_answers if examples else None),
        max_new_tokens=max_new_tokens if examples else 0,
    )


def _join(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    listed = "\n  - ".join(problems)
    return f"{len(problems)} problems:\n  - {listed}"


def _rate(pattern: re.Pattern[str] | None, texts: list[str] | None) -> float | None:
    if pattern is None or not texts:
        return None
    return sum(pattern.search(t) is not None for t in texts) / len(texts)


def _generate(model: Any, tok: Any, prompts: list[Any], max_new_tokens: int) -> list[str]:
    """Greedy answers to stored prompt ids, left-padded in batches of GENERATE_BATCH."""
    import torch

    tok.padding_side = "left"
    device = next(model.parameters()).device
    out: list[str] = []
    with torch.inference_mode():
        for i in range(0, len(prompts), GENERATE_BATCH):
            chunk = [{"input_ids": p.tolist()} for p in prompts[i : i + GENERATE_BATCH]]
            enc = tok.pad(chunk, padding=True, return_tensors="pt").to(device)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tok.pad_token_id or tok.eos_token_id,
            )
            out += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [o.strip() for o in out]


# --------------------------------------------------------------------------- the report


def _num(x: float | int | None, fmt: str = ".4f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>") or "(empty)"


def format_report(r: EvalResult, plot_name: str = PLOT_NAME) -> str:
    """The Markdown report: a table of every student's measures, then answers side by side."""
    expect = f" | `{r.expect}` found" if r.expect is not None else ""
    kl = kl_label(r.kl_includes_teacher_entropy)
    measure = (
        "KL(teacher ‖ student) + the teacher's entropy (the cross-entropy to the teacher's "
        "sampled draws: sampled targets do not give the KL alone)"
        if r.kl_includes_teacher_entropy
        else "KL(teacher ‖ student)"
    )
    lines = [
        "# logitcache eval",
        "",
        f"Held-out dataset `{r.data}` ({r.targets} targets, capture temperature "
        f"{r.temperature:g}). {measure} and top-1 agreement against its stored targets, CE "
        "of its response tokens; means per response position.",
        "",
        f"| student | {kl} (nats/token) | CE | top-1 | positions{expect} |",
        "|---|---|---|---|---|" + ("---|" if expect else ""),
    ]
    for s in r.students:
        m = s.metrics
        rate = f" | {_num(s.expect_rate, '.0%')}" if expect else ""
        lines.append(
            f"| `{s.name}` | {_num(m['kl'])} | {_num(m['ce'])} | {_num(m['top1'], '.3f')} "
            f"| {m['positions']}{rate} |"
        )
    if r.expect is not None and r.teacher_expect_rate is not None:
        lines += [
            "",
            f"The teacher's stored responses: `{r.expect}` found in {r.teacher_expect_rate:.0%}.",
        ]
    lines += ["", f"![{kl} per student]({plot_name})", ""]
    if r.ids:
        lines += [
            f"## Answers ({len(r.ids)} held-out prompts, greedy, at most {r.max_new_tokens} "
            "new tokens)",
            "",
        ]
        for i, (ex_id, prompt) in enumerate(zip(r.ids, r.prompts, strict=True)):
            lines += [
                f"### {ex_id}",
                "",
                f"prompt (the student's view): {_cell(prompt)}",
                "",
                "| who | answer |",
                "|---|---|",
                f"| teacher (stored response) | {_cell(r.teacher_answers[i])} |",
            ]
            lines += [f"| `{s.name}` | {_cell((s.answers or [''])[i])} |" for s in r.students]
            lines.append("")
    return "\n".join(lines)


def plot_kl(r: EvalResult, png: str | Path) -> None:
    """A bar chart of each student's held-out KL (+ the teacher's entropy, sampled targets)."""
    check_plot_available()
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.name for s in r.students]
    values = [math.nan if s.metrics["kl"] is None else s.metrics["kl"] for s in r.students]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(names) + 2), 4))
    ax.bar(range(len(names)), values, color="tab:blue")
    ax.set_xticks(
        range(len(names)), [n if len(n) <= 24 else "…" + n[-23:] for n in names], rotation=15
    )
    sampled = r.kl_includes_teacher_entropy
    ax.set(
        ylabel="KL(teacher ‖ student)" + (" + H(teacher)" if sampled else "") + ", nats/token",
        title=f"held-out {kl_label(sampled)}: {Path(r.data).name}",
    )
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def write_report(r: EvalResult, out: str | Path) -> tuple[Path, Path]:
    """Write ``report.md``, ``kl.png`` and ``report.json`` (the :class:`EvalResult`'s fields,
    for scripts) into the folder ``out``; returns the paths of the first two."""
    import dataclasses
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / PLOT_NAME
    plot_kl(r, png)
    md = out / REPORT_NAME
    md.write_text(format_report(r) + "\n", encoding="utf-8")
    text = json.dumps(dataclasses.asdict(r), indent=1, ensure_ascii=False)
    (out / JSON_NAME).write_text(text + "\n", encoding="utf-8")
    return md, png
