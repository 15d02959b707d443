"""The fidelity study's machinery on tiny models: every variant trains, is measured, and
online full-vocabulary KD lowers the held-out KL to the teacher."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from logitcache.tools.studies.fidelity import (
    Row,
    Settings,
    Variant,
    load_rows,
    merge_rows,
    plot,
    run_study,
    save_rows,
    table,
    winner,
)


def test_study_runs_every_variant(
    tmp_path: Path, tiny_teacher_dir: Path, tiny_student_dir: Path
) -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(8, 384, size=(20, 17))
    variants = [
        Variant("online"),
        Variant("hard"),
        Variant("topk", k=8, codec="u8"),
        Variant("topk", k=8, tail="renorm"),
        Variant("sampled", n=4),
        Variant("sampled", n=4, sampling="systematic"),
        Variant("topk", k=384, codec="f32"),  # k = vocab: the offline twin of online KD
        Variant("topk", k=4, n=6, tail="draws"),
        Variant("topk", k=4, n=6, tail="draws", sample_seed=1),
        Variant("topk", k=8, n=6, tail="draws", k_mass=0.5, k_min=1, n_rate=12.0),
    ]
    rows, initial = run_study(
        tiny_teacher_dir,
        tiny_student_dir,
        tokens[:16],
        tokens[16:],
        variants,
        Settings(steps=4, batch_size=4, lr=3e-3, warmup_steps=0),
        tmp_path,
        log=lambda _: None,
    )
    assert [r.variant for r in rows] == variants
    for r in rows:
        assert all(math.isfinite(x) for x in (r.kl, r.ce, r.top1, r.step_s))
        assert (r.bytes_per_position is None) == (r.variant.kind == "online")
    by = {r.variant.name: r for r in rows}
    assert by["online full KD"].kl < initial["kl"]
    # The online loop replicates the trainer: with every id stored, the runs coincide.
    assert math.isclose(by["top-384 bucket f32"].kl, by["online full KD"].kl, rel_tol=1e-3)
    # Tokens alone take fewer bytes than tokens plus targets.
    assert by["hard labels (CE)"].bytes_per_position < by["top-8 bucket u8"].bytes_per_position
    assert by["sampled n=4"].unique_ids is not None
    assert by["sampled n=4 systematic"].unique_ids is not None
    # Top-k + tail draws: other draws with another seed, the same top-k; one mean row.
    a, b = by["top-4 + 6 tail draws"], by["top-4 + 6 tail draws [draws 1]"]
    assert a.unique_ids is not None and a.kl != b.kl
    # Adaptive targets: fewer than the cap of ids per position on average, draws by tail mass.
    adaptive = by["top-≤8 @0.5 + ≤6 tail draws @12/mass"]
    assert adaptive.mean_k is not None and 1 <= adaptive.mean_k < 8
    assert adaptive.unique_ids is not None and adaptive.unique_ids < 6
    assert "| top-8 renorm u8 |" in table(rows)
    assert "| top-4 + 6 tail draws | " in table(rows) and "2 runs: " in table(rows)
    plot(rows, initial, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0


def test_winner_is_cheapest_within_tolerance() -> None:
    def row(v: Variant, b: float | None, kl: float) -> Row:
        return Row(v, b, kl, 1.0, 0.5, 0.1)

    rows = [
        row(Variant("online"), None, 1.000),
        row(Variant("topk", k=8), 20.0, 1.009),
        row(Variant("topk", k=32), 60.0, 1.001),
        row(Variant("sampled", n=8), 11.0, 1.02),
        row(Variant("online", seed=1), None, 0.9),
    ]
    best = winner(rows, 0.01)
    assert best is not None and best.variant == Variant("topk", k=8)
    assert winner(rows, 0.0) is None
    # Configurations with draws count by their mean over sample seeds.
    hybrid = Variant("topk", k=4, n=8, tail="draws")
    rows += [row(hybrid, 15.0, 1.004), row(replace(hybrid, sample_seed=1), 15.0, 1.012)]
    rows += [row(Variant("sampled", n=4), 9.0, 1.001)]
    rows += [row(Variant("sampled", n=4, sample_seed=1), 9.0, 1.03)]
    best = winner(rows, 0.01)
    assert best is not None and best.variant == hybrid and math.isclose(best.kl, 1.008)


def test_replot_merges_runs_of_one_setup(tmp_path: Path) -> None:
    def row(v: Variant, kl: float) -> Row:
        return Row(v, 10.0, kl, 1.0, 0.5, 0.1)

    initial = {"kl": 14.6, "ce": 17.9, "top1": 0.0}
    first = [row(Variant("online"), 1.0), row(Variant("topk", k=8), 1.2)]
    again = [row(Variant("topk", k=8), 1.21), row(Variant("sampled", n=8), 1.1)]
    rows, init = merge_rows([(first, initial), (again, dict(initial))])
    assert [(r.variant, r.kl) for r in rows] == [
        (Variant("online"), 1.0),
        (Variant("topk", k=8), 1.21),  # the later measurement replaces the earlier
        (Variant("sampled", n=8), 1.1),
    ]
    assert init == initial
    save_rows(rows, init, tmp_path / "merged.json")
    assert load_rows(tmp_path / "merged.json") == (rows, initial)
    with pytest.raises(SystemExit, match=r"different setups \(untrained student KL 14\.6"):
        merge_rows([(first, initial), (again, {**initial, "kl": 9.0})])
    # Rounding of the same setup's held-out targets (another box, format version) is allowed.
    assert merge_rows([(first, initial), (again, {**initial, "kl": 14.6 * (1 + 2e-5)})])[0]


def test_context_distillation_study_aligns_teacher_and_student(
    tmp_path: Path, tiny_teacher_dir: Path, tiny_student_dir: Path
) -> None:
    # The teacher reads 6 more tokens before each 17-token sequence; the student never does.
    tokens = np.random.default_rng(1).integers(8, 384, size=(20, 6 + 17))
    variants = [
        Variant("online"),
        Variant("topk", k=384, codec="f32"),  # every id stored: the offline twin of online KD
        Variant("topk", k=4, n=6, tail="draws"),
    ]
    settings = Settings(steps=4, batch_size=4, lr=3e-3, warmup_steps=0, context=6)
    rows, initial = run_study(
        tiny_teacher_dir, tiny_student_dir, tokens[:16], tokens[16:], variants, settings,
        tmp_path / "cd", log=lambda _: None,
    )  # fmt: skip
    by = {r.variant.name: r for r in rows}
    # Targets and the online loop put the teacher's context at the same place: same run.
    assert math.isclose(by["top-384 bucket f32"].kl, by["online full KD"].kl, rel_tol=1e-3)
    assert by["online full KD"].kl < initial["kl"]
    # The held-out KL is to the teacher *with* context: not what the same study without it sees.
    _, plain = run_study(
        tiny_teacher_dir, tiny_student_dir, tokens[:16, 6:], tokens[16:, 6:], variants[:1],
        replace(settings, context=0), tmp_path / "plain", log=lambda _: None,
    )  # fmt: skip
    assert not math.isclose(plain["kl"], initial["kl"], rel_tol=1e-3)
