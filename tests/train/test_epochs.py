"""train.epochs: every example exactly once per epoch, whatever the ranks, DataLoader workers,
gradient accumulation and batching; the step count is what that takes, counted exactly."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from logitcache.cache.reader import open_dataset
from logitcache.cache.writer import DatasetWriter
from logitcache.train.batching import idle_batch
from logitcache.train.config import Config, DataConfig, OptimConfig, TrainConfig
from logitcache.train.epochs import micro_batches, steps_for
from logitcache.train.loss_plan import plan_loss
from logitcache.train.metrics import read_metrics
from logitcache.train.order import slot_range
from logitcache.train.stream import StreamLoader
from logitcache.train.student import Dist, DistillStudent
from logitcache.train.trainer import make_loader, total_steps, train
from tests.cache.synth import make_examples, make_info
from tests.train.helpers import capture_dataset, config_from

INFO = make_info(k=4, vocab=300)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Datasets of several sizes, each in several shards of several record batches."""
    root = tmp_path_factory.mktemp("epochs")
    out = {}
    for count in (8, 13, 14, 29, 41, 48):
        out[count] = root / f"ds{count}"
        with DatasetWriter(out[count], INFO, shard_positions=60, batch_rows=3) as w:
            for ex in make_examples(INFO, count, seed=count, max_len=12):
                w.add(ex)
    return out


def loader_config(ds: Path, batch: int, workers: int, accum: int, epochs: float) -> Config:
    return Config(
        data=DataConfig(
            train=str(ds),
            batch_size=batch,
            max_tokens=0 if batch else 40,  # batch 0: a token budget
            max_seq_len=16,
            shuffle_buffer=4,
            num_workers=workers,
            prefetch=2,
        ),
        optim=OptimConfig(grad_accum=accum),
        train=TrainConfig(output="unused", epochs=epochs, seed=3),
    )


def rank_loader(cfg: Config, rank: int, world: int) -> StreamLoader:
    dist = Dist(rank, world, torch.device("cpu"))
    return make_loader(cfg, cfg.data.train, INFO, dist, train=True, pad_id=0)


# (examples, batch size (0: token budget), workers per rank, ranks, grad_accum, epochs)
GRID = [
    (8, 4, 3, 1, 1, 1),  # issue 11: 2 steps and 5 of the 8 examples before
    (48, 5, 3, 1, 1, 1),  # issue 11: 46 of 48 before
    (13, 2, 0, 1, 3, 2),
    (14, 2, 3, 1, 2, 2),  # workers with 2, 3 and 3 batches an epoch
    (29, 4, 2, 2, 3, 2),
    (41, 4, 0, 2, 2, 2),  # ranks with 10 and 12 micro-batches
    (29, 3, 1, 3, 1, 3),
    (13, 0, 0, 1, 2, 2),
    (41, 0, 2, 2, 2, 1),
    (29, 0, 0, 3, 1, 2),
]


@pytest.mark.parametrize("count,batch,workers,world,accum,epochs", GRID)
def test_every_example_exactly_once_per_epoch_and_the_steps_that_takes(
    synthetic: dict[int, Path],
    count: int,
    batch: int,
    workers: int,
    world: int,
    accum: int,
    epochs: int,
) -> None:
    cfg = loader_config(synthetic[count], batch, workers, accum, epochs)
    shares = []
    per_epoch: dict[int, Counter[str]] = {e: Counter() for e in range(epochs)}
    for rank in range(world):
        loader = rank_loader(cfg, rank, world)
        share = micro_batches(loader)
        batches = list(loader)  # the stream of an epochs run ends
        assert len(batches) == share  # counted exactly, token budget included
        shares.append(share)
        for b in batches:
            per_epoch[b.epoch].update(b.ids)
    everyone = Counter(f"ex{i}" for i in range(count))
    assert all(per_epoch[e] == everyone for e in range(epochs))
    steps = steps_for(shares, accum)
    # Every rank takes all of its micro-batches, and one step fewer would leave some.
    assert (steps - 1) * accum < max(shares) <= steps * accum
    if batch and world == 1 and workers > 1:
        assert steps > math.ceil(epochs * count / (batch * accum))  # the old count was short


@pytest.mark.parametrize(
    "workers,batch,world", [(0, 3, 1), (2, 3, 1), (3, 0, 1), (2, 3, 2), (0, 0, 3)]
)
def test_a_fractional_epoch_trains_part_of_one_more_pass_once(
    synthetic: dict[int, Path], workers: int, batch: int, world: int
) -> None:
    cfg = loader_config(synthetic[29], batch, workers, 2, 1.5)
    first: Counter[str] = Counter()
    second: Counter[str] = Counter()
    shares = []
    for rank in range(world):
        loader = rank_loader(cfg, rank, world)
        share = micro_batches(loader)
        batches = list(loader)
        assert len(batches) == share
        # Counted from a resumed position: what is left.
        cut = rank_loader(cfg, rank, world)
        taken = len(list(itertools.islice(cut, share // 2)))
        rest = rank_loader(cfg, rank, world)
        rest.load_state_dict(cut.state_dict())
        assert micro_batches(rest) == share - taken
        shares.append(len(batches))
        first.update(i for b in batches if b.epoch == 0 for i in b.ids)
        second.update(i for b in batches if b.epoch == 1 for i in b.ids)
    assert first == Counter(f"ex{i}" for i in range(29))
    slots = world * max(workers, 1)
    ranges = [slot_range(29, s, slots) for s in range(slots)]
    half = sum(math.ceil(0.5 * (hi - lo)) for lo, hi in ranges)
    assert sum(second.values()) == len(second) == half  # no example twice
    steps = steps_for(shares, 2)
    assert (steps - 1) * 2 < max(shares) <= steps * 2


@pytest.mark.parametrize("batch,epochs", [(2, 2), (0, 2), (2, 1.5)])
def test_resume_is_exact_after_a_worker_has_run_out(
    synthetic: dict[int, Path], batch: int, epochs: float
) -> None:
    # 14 examples, 3 workers, batch 2: 2, 3 and 3 batches an epoch, so over 2 epochs worker 0
    # runs out 4 batches before the others and the DataLoader's turns skip it from then on.
    cfg = loader_config(synthetic[14], batch, 3, 1, epochs)
    full = [b.ids for b in rank_loader(cfg, 0, 1)]
    for cut in (7, 13, len(full) - 1):
        first = rank_loader(cfg, 0, 1)
        head = [b.ids for b in itertools.islice(first, cut)]
        resumed = rank_loader(cfg, 0, 1)
        resumed.load_state_dict(first.state_dict())
        assert head + [b.ids for b in resumed] == full, cut


def test_train_steps_keeps_a_never_ending_stream(synthetic: dict[int, Path]) -> None:
    cfg = loader_config(synthetic[8], 4, 3, 2, 1)
    cfg = Config(data=cfg.data, optim=cfg.optim, train=TrainConfig(output="unused", steps=9))
    loader = rank_loader(cfg, 0, 1)
    assert loader.stream.epochs is None
    assert total_steps(cfg, loader, Dist(0, 1, torch.device("cpu"))) == 9
    assert len(list(itertools.islice(loader, 9 * 2))) == 18  # runs past any epoch's end


@pytest.mark.parametrize("kind,tail_draws", [("topk", False), ("sampled", False), ("topk", True)])
def test_an_idle_batch_adds_nothing_to_the_loss_or_the_gradient(
    tiny_student_dir: Path, kind: str, tail_draws: bool
) -> None:
    from transformers import AutoModelForCausalLM

    info = make_info(kind, k=4, n=8, vocab=384, tail_draws=8 if tail_draws else 0)
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir, dtype=torch.float32)
    plan = plan_loss(Config().loss, info.targets)
    assert plan.tail_draws == tail_draws  # loss.tail=auto trains on stored draws
    student = DistillStudent(model, plan)
    batch = idle_batch(info, pad_id=0, tail_draws=plan.tail_draws)
    assert batch.num_positions == 0 and batch.ids == []
    total, kd, ce = student(
        batch.input_ids, batch.attention_mask, batch.positions, batch.labels, batch.targets
    )
    assert float(total) == float(kd) == float(ce) == 0.0
    (total * 0.0).backward()  # as the trainer weighs a micro-batch of no positions
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


# --------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("epochs-captured")
    return {n: capture_dataset(tiny_teacher_dir, root / f"ds{n}", count=n) for n in (8, 13)}


@pytest.mark.parametrize(
    "count,sets",
    [
        (8, {"data.batch_size": 4, "data.num_workers": 3}),  # the run
        (
            13,
            {"data.batch_size": 2, "data.num_workers": 2, "optim.grad_accum": 3, "train.epochs": 2},
        ),
        (
            13,
            {"data.batch_size": 0, "data.max_tokens": 64, "optim.grad_accum": 2, "train.epochs": 2},
        ),
    ],
)
def test_the_trainer_trains_every_example_once_per_epoch(
    captured: dict[int, Path],
    tiny_student_dir: Path,
    tmp_path: Path,
    count: int,
    sets: dict[str, object],
) -> None:
    out = tmp_path / "run"
    overrides = {
        "data.train": captured[count],
        "data.shuffle_buffer": 4,
        "data.max_seq_len": 64,
        "model.path": tiny_student_dir,
        "train.output": out,
        "log.progress": False,
        "log.example_ids": True,
        **sets,
    }
    cfg = config_from(overrides)
    summary = train(cfg)
    assert summary["finished"]
    seen = [json.loads(line) for line in (out / "examples-rank0.jsonl").read_text().splitlines()]
    epochs = int(cfg.train.epochs)
    for e in range(epochs):
        ids = Counter(i for rec in seen if rec["epoch"] == e for i in rec["ids"])
        assert ids == Counter(f"ex{i}" for i in range(count))
    assert sum(len(rec["ids"]) for rec in seen) == epochs * count
    info = open_dataset(cfg.data.train).info
    loader = make_loader(
        cfg, cfg.data.train, info, Dist(0, 1, torch.device("cpu")), train=True, pad_id=0
    )
    assert len(seen) == micro_batches(loader)  # one line per micro-batch trained on
    assert summary["steps"] == steps_for([len(seen)], cfg.optim.grad_accum)
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, summary["steps"] + 1))
    assert sum(r["examples"] for r in steps) == epochs * count
