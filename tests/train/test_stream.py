"""The training stream: order, splitting, resume, memory bound, remote shards."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from logitcache.cache.errors import InputError
from logitcache.cache.writer import DatasetWriter
from logitcache.train.batching import Batcher
from logitcache.train.order import Shuffle, slot_range
from logitcache.train.reslot import Carry
from logitcache.train.stream import LogitStream, StreamLoader
from tests.cache.synth import make_examples, make_info

COUNT = 97  # prime, so slots get unequal shares


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """97 examples in several shards of unequal size, several record batches each."""
    info = make_info(k=4, vocab=300)
    out = tmp_path_factory.mktemp("stream") / "ds"
    with DatasetWriter(out, info, shard_positions=100, batch_rows=5) as w:
        for ex in make_examples(info, COUNT, max_len=12):
            w.add(ex)
    return out


def ids_of(stream: LogitStream, **kw: int) -> list[str]:
    return [it.example.id for it in stream.items(**kw)]


def test_dataset_has_several_shards(dataset: Path) -> None:
    assert len(LogitStream(dataset).shard_rows) >= 5


def test_order_is_deterministic_per_seed_and_epoch(dataset: Path) -> None:
    a = ids_of(LogitStream(dataset, seed=3, shuffle_buffer=16, epochs=2))
    b = ids_of(LogitStream(dataset, seed=3, shuffle_buffer=16, epochs=2))
    assert a == b
    epoch0, epoch1 = a[:COUNT], a[COUNT:]
    assert sorted(epoch0) == sorted(epoch1) == sorted(f"ex{i}" for i in range(COUNT))
    assert epoch0 != epoch1  # epochs differ
    other_seed = ids_of(LogitStream(dataset, seed=4, shuffle_buffer=16, epochs=1))
    assert other_seed != epoch0
    stored = ids_of(LogitStream(dataset, shuffle=False, epochs=1))
    assert stored == [f"ex{i}" for i in range(COUNT)]  # shuffle off: the written order


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 1), (2, 3), (3, 4)])
def test_ranks_times_workers_are_complete_and_disjoint(
    dataset: Path, world: int, workers: int
) -> None:
    num_slots = world * workers
    seen: list[str] = []
    sizes = []
    for rank in range(world):
        stream = LogitStream(dataset, seed=1, shuffle_buffer=8, rank=rank, world_size=world)
        for w in range(workers):
            got = ids_of(stream, slot=rank * workers + w, num_slots=num_slots)
            sizes.append(len(got))
            seen += got
    assert sorted(seen) == sorted(f"ex{i}" for i in range(COUNT))  # complete and disjoint
    assert max(sizes) - min(sizes) <= 1  # balanced


def test_slot_ranges_tile_the_epoch() -> None:
    for n, s in itertools.product([0, 1, 7, 100], [1, 2, 3, 8]):
        ranges = [slot_range(n, i, s) for i in range(s)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))


def test_buffer_bounds_memory_and_displacement(dataset: Path) -> None:
    stream = LogitStream(dataset, seed=0, shuffle_buffer=6, shuffle=True)
    order = ids_of(stream)
    assert stream.peak_pending == 6  # never more than the buffer decoded and held
    plan = Shuffle(1000, 10, [0, 0, 1, 0])
    plan.fill()
    out = []
    while (item := plan.emit()) is not None:
        assert len(plan.pending) < 10
        out.append(item)
        plan.fill()
    assert sorted(out) == list(range(1000))
    assert all(src < 10 + t for t, src in enumerate(out))  # bounded displacement
    assert out != sorted(out)
    assert len(order) == COUNT


def make_loader(dataset: Path, workers: int, batch_size: int = 4, **kw: object) -> StreamLoader:
    info = LogitStream(dataset).dataset.info
    stream = LogitStream(
        dataset,
        seed=7,
        shuffle_buffer=10,
        epochs=None,
        make_batches=Batcher(info, 64, batch_size=batch_size),
        **kw,  # type: ignore[arg-type]
    )
    return StreamLoader(stream, num_workers=workers, prefetch=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_state_dict_yields_exactly_the_rest(dataset: Path, workers: int) -> None:
    straight = make_loader(dataset, workers)
    full = [b.ids for b in itertools.islice(straight, 70)]  # crosses into epochs 1 and 2

    first = make_loader(dataset, workers)
    head = [b.ids for b in itertools.islice(first, 33)]  # mid-epoch, odd: worker 1 is next
    state = first.state_dict()
    resumed = make_loader(dataset, workers)
    resumed.load_state_dict(state)
    tail = [b.ids for b in itertools.islice(resumed, 70 - 33)]
    assert head + tail == full


def test_every_example_once_per_epoch_through_workers(dataset: Path) -> None:
    loader = make_loader(dataset, workers=2)
    per_epoch: dict[int, list[str]] = {}
    for batch in itertools.islice(loader, 60):
        per_epoch.setdefault(batch.epoch, []).extend(batch.ids)
    assert sorted(per_epoch[0]) == sorted(f"ex{i}" for i in range(COUNT))


def test_resume_refuses_another_order(dataset: Path) -> None:
    loader = make_loader(dataset, workers=0)
    next(iter(loader))
    state = loader.state_dict()
    other = make_loader(dataset, workers=0)
    other.stream.seed = 8
    with pytest.raises(InputError, match=r"seed was 7 and is now 8.*same dataset, seed"):
        other.load_state_dict(state)


def run_slots(
    dataset: Path, world: int, workers: int, epochs: float | None, take: list[int], state=None
) -> tuple[dict[int, list[str]], dict]:
    """Each rank of ``world`` takes ``take[rank]`` batches of 4 (all, for None); the ids it
    saw by epoch, and the merged state after."""
    seen: dict[int, list[str]] = {}
    states = []
    for rank in range(world):
        loader = make_loader(dataset, workers, rank=rank, world_size=world)
        loader.stream.epochs = epochs
        if state is not None:
            loader.load_state_dict(state)
        for batch in itertools.islice(loader, take[rank]):
            seen.setdefault(batch.epoch, []).extend(batch.ids)
        states.append(loader.state_dict())
    return seen, StreamLoader.merge_states(states)


@pytest.mark.parametrize(
    "before,after,epochs,take",
    [
        ((2, 1), (1, 1), 2, [9, 8]),  # 2 ranks → 1, mid-epoch, one rank a batch ahead
        ((1, 1), (3, 1), 2, [30]),  # 1 → 3, into epoch 1
        ((2, 2), (1, 3), 1.5, [7, 11]),  # workers change too, fractional epochs
        ((3, 0), (2, 0), 3, [8, 7, 8]),  # a slot has ended epoch 0, the others have not
    ],
)
def test_resume_on_another_number_of_slots_sees_every_example_once_per_epoch(
    dataset: Path, before: tuple[int, int], after: tuple[int, int], epochs: float, take: list[int]
) -> None:
    head, state = run_slots(dataset, *before, epochs, take)
    tail, state2 = run_slots(dataset, *after, epochs, [10**6] * after[0], state)
    assert state2["version"] == 2 and state2["carry"]["num_slots"] == before[0] * max(before[1], 1)
    whole = sorted(f"ex{i}" for i in range(COUNT))
    assert 0 < len(head[max(head)]) < COUNT  # stopped mid-epoch
    for epoch in range(int(epochs)):
        assert sorted(head.get(epoch, []) + tail.get(epoch, [])) == whole, epoch
    if epochs % 1:  # the fractional last epoch: no example twice, and ⌈half⌉ of each slot's share
        last = head.get(int(epochs), []) + tail.get(int(epochs), [])
        assert len(last) == len(set(last)) and abs(len(last) - COUNT / 2) <= 4


ALL = 10**6


@pytest.mark.parametrize(
    "chain",
    [
        # (ranks, workers, batches each rank takes) per invocation, each resuming the last
        [(2, 0, [6, 7]), (3, 0, [2, 1, 2]), (1, 2, [ALL])],  # carried, then carried again
        [(2, 0, [5, 6]), (2, 0, [4, 4]), (2, 0, [ALL, ALL])],  # the same layout, twice
        [(1, 2, [7]), (2, 0, [5, 5]), (2, 0, [3, 3]), (3, 0, [ALL] * 3)],  # dealt anew, kept
        [(2, 0, [6, 7]), (3, 0, [2, 1, 2]), (3, 0, [3, 3, 3]), (3, 0, [ALL] * 3)],
    ],
)
def test_a_chain_of_resumes_sees_every_example_once_per_epoch(dataset: Path, chain: list) -> None:
    seen: dict[int, list[str]] = {}
    state = None
    for ranks, workers, take in chain:
        got, state = run_slots(dataset, ranks, workers, 2, take, state)
        for epoch, ids in got.items():
            seen.setdefault(epoch, []).extend(ids)
    for epoch in (0, 1):
        assert sorted(seen[epoch]) == sorted(f"ex{i}" for i in range(COUNT)), epoch


def test_a_carry_is_only_the_begun_epochs() -> None:
    c = Carry.of(3, {0: (1, 0), 1: (1, 4), 2: (0, 9)}, None)
    assert (c.first, c.last) == (0, 1)
    assert c.covers(0) and c.covers(1) and not c.covers(2)
    done = Carry.of(2, {0: (2, 0), 1: (2, 0)}, None)  # both slots just ended epoch 1
    assert (done.first, done.last) == (2, 1) and not done.covers(2)
    again = Carry.of(2, {}, c)  # resumed again before any batch: c's epochs still carried
    assert (again.first, again.last, again.states) == (0, 1, ((0, 0), (0, 0)))
    assert Carry.from_json(again.to_json()) == again


def test_token_budget_batches(dataset: Path) -> None:
    info = LogitStream(dataset).dataset.info
    stream = LogitStream(dataset, seed=0, make_batches=Batcher(info, max_seq_len=16, max_tokens=40))
    batches = list(StreamLoader(stream))
    assert all(b.input_ids.numel() <= 40 for b in batches)
    assert sum(len(b.ids) for b in batches) == COUNT
    assert max(len(b.ids) for b in batches) > 2


def test_remote_shards_are_cached_locally(tmp_path: Path) -> None:
    info = make_info(k=4, vocab=300)
    url = f"memory://{tmp_path.name}/ds"
    with DatasetWriter(url, info, shard_positions=100) as w:
        for ex in make_examples(info, 30, max_len=12):
            w.add(ex)
    cache = tmp_path / "cache"
    stream = LogitStream(url, cache_dir=cache, seed=0)
    first = ids_of(stream)
    files = sorted(cache.glob("*.arrow"))
    assert len(files) == len(stream.shard_rows) > 1
    assert ids_of(LogitStream(url, cache_dir=cache, seed=0)) == first
    assert np.all([f.stat().st_size > 0 for f in files])
