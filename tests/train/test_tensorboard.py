"""TensorBoard events read back with TensorBoard's own reader equal metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import pytest

from logitcache.train.config import load_config
from logitcache.train.metrics import read_metrics
from logitcache.train.tensorboard import TENSORBOARD_NAME, tag
from logitcache.train.trainer import train
from tests.train.helpers import capture_dataset

pytest.importorskip("tensorboard")


def test_event_files_hold_the_scalars_of_metrics_jsonl_across_a_resume(
    tiny_teacher_dir: Path, tiny_student_dir: Path, tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_ds = capture_dataset(tiny_teacher_dir, tmp_path / "train", count=24)
    eval_ds = capture_dataset(tiny_teacher_dir, tmp_path / "eval", count=8, seed=1, prefix="ev")
    out = tmp_path / "run"

    def cfg(**extra: str) -> object:
        sets = {
            "data.train": str(train_ds),
            "data.eval": str(eval_ds),
            "model.path": str(tiny_student_dir),
            "train.output": str(out),
            "train.steps": "6",
            "data.batch_size": "4",
            "log.eval_every": "2",
            "log.checkpoint_every": "2",
            "log.tensorboard": "true",
            "log.progress": "false",
            **extra,
        }
        return load_config(None, [(k, v, f"--{k}") for k, v in sets.items()])

    # Steps 4 and 5 are logged, lost with the interruption, and redone by the resume.
    assert not train(cfg(**{"train.stop_after": "5"}))["finished"]  # type: ignore[arg-type]
    assert train(cfg(), resume=True)["finished"]  # type: ignore[arg-type]

    board = EventAccumulator(str(out / TENSORBOARD_NAME))
    board.Reload()
    want: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(out / "metrics.jsonl"):
        for key, value in record.items():
            if key != "step" and value is not None:
                want.setdefault(tag(key), []).append((record["step"], float(value)))
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "eval/kl"} <= set(want)
    assert set(board.Tags()["scalars"]) == set(want)
    for name, points in want.items():
        got = [(e.step, e.value) for e in board.Scalars(name)]
        assert [s for s, _ in got] == [s for s, _ in points], name
        # Events store float32.
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), name
