"""Stream a logit dataset as training batches: deterministic, split across ranks and workers,
resumable mid-epoch, in bounded memory.

Each DataLoader worker of each rank is one *slot* and reads its share of each epoch's order
(:mod:`logitcache.train.order`: the shards permuted by ``(seed, epoch)``, cut into contiguous,
near-equal slots, each passed through a shuffle buffer seeded by ``(seed, epoch, slot)``).

A run of ``epochs`` passes ends: each slot emits its range once per epoch (a fractional last
epoch: the first ⌈fraction × range⌉ of that epoch's order), then stops, so every example is
emitted exactly once per whole epoch. :meth:`LogitStream.epoch_rows` gives a slot's order
without reading anything, which is how a run's length is counted beforehand
(:mod:`logitcache.train.epochs`).

The buffer is shuffled as *indices* (:class:`~logitcache.train.order.Shuffle`), so a slot's
position is just ``(epoch, emitted)``: resuming replays the index arithmetic (no I/O), then
reads back only the ≤ ``shuffle_buffer`` examples that were pending. Examples are copied out
of their record batch, and at most two shards are held at once (the one being read, the next
one fetched in the background), so memory does not grow with the dataset.

Shards are read only through :mod:`logitcache.cache.reader`; remote shards can be kept in its
local ``cache_dir``.
"""

from __future__ import annotations

import itertools
import math
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from logitcache.cache.errors import InputError
from logitcache.cache.format import Example
from logitcache.cache.reader import keep_freed_memory, open_dataset

from .order import Shuffle, shard_order, slot_range, slot_segments
from .reslot import Carry, layout_length, layout_rows
from .rows import RecentShards, SlotSource

STATE_VERSION = 1


# --------------------------------------------------------------------------- the stream


@dataclass(frozen=True)
class SlotState:
    """Where one slot stands: its epoch and how many of that epoch's examples it emitted."""

    epoch: int
    emitted: int


@dataclass
class StreamItem:
    """One example as the stream emits it, and the slot's state right after emitting it."""

    example: Example
    slot: int
    state: SlotState
    end_of_epoch: bool
    """True for the slot's last example of the epoch."""


class LogitStream(IterableDataset):
    """A logit dataset as an iterable of batches (or, via :meth:`items`, of examples).

    Each DataLoader worker of each rank is one slot; see the module docstring for the order.
    ``make_batches`` turns the slot's stream of :class:`StreamItem` into batches (see
    :mod:`logitcache.train.batching`); without it the stream yields the items themselves.
    Each slot moves to the next epoch on its own; with ``epochs=None`` it runs forever,
    otherwise it ends after ``epochs`` passes (see :meth:`epoch_length`).
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1024,
        epochs: float | None = 1,
        rank: int = 0,
        world_size: int = 1,
        verify: bool = False,
        cache_dir: str | Path | None = None,
        storage_options: dict[str, Any] | None = None,
        make_batches: Callable[[Iterator[StreamItem]], Iterator[Any]] | None = None,
    ):
        self.url = os.fspath(url)
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.epochs, self.rank, self.world_size = epochs, rank, world_size
        self.open_kwargs = dict(verify=verify, cache_dir=cache_dir, storage_options=storage_options)
        self.make_batches = make_batches
        self.dataset = open_dataset(self.url, **self.open_kwargs)
        self.shard_rows = [s.rows for s in self.dataset.shards]
        self.carry: Carry | None = None
        """Epochs begun on another number of slots, set by a resume (:mod:`.reslot`)."""
        self.start: dict[int, SlotState] = {}
        """Per-slot resume states, set by :class:`StreamLoader`.load_state_dict."""
        self.rotation = 0
        """Worker ``w`` plays slot ``(w + rotation) % num_workers``: after a resume the
        DataLoader's first worker must be the one whose batch was due next."""
        self.peak_pending = 0
        """Most examples ever held in the shuffle buffer (in this process)."""

    @property
    def num_examples(self) -> int:
        return sum(self.shard_rows)

    def __getstate__(self) -> dict[str, Any]:
        # Sent to DataLoader workers: each reopens the dataset (a few KB of manifest).
        state = self.__dict__.copy()
        state["dataset"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.dataset = open_dataset(self.url, **self.open_kwargs)

    @property
    def first_state(self) -> SlotState:
        """Where a slot stands before it emits anything: epoch 0, or a carry's first epoch."""
        return SlotState(self.carry.first if self.carry else 0, 0)

    def slot_of_worker(self) -> tuple[int, int]:
        """(this process's slot, number of slots), from the DataLoader worker info."""
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self.rank * workers + (worker + self.rotation) % workers, self.world_size * workers

    def items(self, slot: int | None = None, num_slots: int | None = None) -> Iterator[StreamItem]:
        """This slot's examples, epoch after epoch, from its resume state on."""
        if slot is None or num_slots is None:
            slot, num_slots = self.slot_of_worker()
        lo, hi = slot_range(self.num_examples, slot, num_slots)
        if lo == hi and self.epochs is None:
            raise InputError(
                f"{self.url}: {self.num_examples} examples cannot feed {num_slots} readers "
                "(ranks × data.num_workers) forever: one would never yield; use fewer "
                "data.num_workers or ranks, or a larger dataset"
            )
        state = self.start.get(slot, self.first_state)
        epoch, skip = state.epoch, state.emitted
        while self.epochs is None or epoch < self.epochs:
            yield from self._epoch_items(slot, num_slots, epoch, skip)
            epoch, skip = epoch + 1, 0

    def epoch_length(self, slot: int, num_slots: int, epoch: int) -> int:
        """Examples ``slot`` emits in ``epoch`` (a carried epoch: its piece of the rest)."""
        return layout_length(self, self.carry, slot, num_slots, epoch)

    def epoch_rows(self, slot: int, num_slots: int, epoch: int) -> Iterator[tuple[int, int]]:
        """(shard, row) of each example ``slot`` emits in ``epoch``, in order; reads nothing."""
        return layout_rows(self, self.carry, slot, num_slots, epoch)

    def plain_epoch_length(self, slot: int, num_slots: int, epoch: int) -> int:
        """Examples ``slot`` emits in an epoch laid out for ``num_slots``: its whole range, or
        in the last epoch of a fractional ``epochs`` the first ⌈fraction × range⌉ of them; 0
        after the last epoch."""
        lo, hi = slot_range(self.num_examples, slot, num_slots)
        if self.epochs is None or epoch + 1 <= self.epochs:
            return hi - lo
        if epoch < self.epochs:
            return math.ceil((self.epochs - epoch) * (hi - lo))
        return 0

    def plain_epoch_rows(self, slot: int, num_slots: int, epoch: int) -> Iterator[tuple[int, int]]:
        """:meth:`epoch_rows` of an epoch laid out for ``num_slots`` (not carried)."""
        source, plan = self._epoch_plan(slot, num_slots, epoch)
        plan.fill()
        for _ in range(self.plain_epoch_length(slot, num_slots, epoch)):
            pos = plan.emit()
            assert pos is not None
            plan.fill()
            _, shard, row = source.locate(pos)
            yield shard, row

    def _epoch_plan(self, slot: int, num_slots: int, epoch: int) -> tuple[SlotSource, Shuffle]:
        """The slot's range in ``epoch`` and the order its shuffle buffer emits it in."""
        order = shard_order(len(self.shard_rows), self.seed, epoch, self.shuffle)
        source = SlotSource(self.dataset, slot_segments(self.shard_rows, order, slot, num_slots))
        size = self.shuffle_buffer if self.shuffle else 1
        return source, Shuffle(source.n, size, [self.seed, epoch, 1, slot])

    def _epoch_items(
        self, slot: int, num_slots: int, epoch: int, skip: int
    ) -> Iterator[StreamItem]:
        if self.carry is not None and self.carry.covers(epoch):
            yield from self._carried_items(slot, num_slots, epoch, skip)
            return
        source, plan = self._epoch_plan(slot, num_slots, epoch)
        length = self.plain_epoch_length(slot, num_slots, epoch)
        # Replay the first `skip` steps as index arithmetic only, then read what is pending.
        plan.fill()
        for _ in range(skip):
            if plan.emit() is None:
                break
            plan.fill()
        held = {p: source.get(p) for p in sorted(plan.pending)}
        try:
            while plan.emitted < length:
                self.peak_pending = max(self.peak_pending, len(held))
                pos = plan.emit()
                assert pos is not None  # length ≤ the slot's range
                ex = held.pop(pos)
                for p in plan.fill():
                    held[p] = source.get(p)
                end = plan.emitted == length
                state = SlotState(epoch + 1, 0) if end else SlotState(epoch, plan.emitted)
                yield StreamItem(ex, slot, state, end)
        finally:
            source.close()

    def _carried_items(
        self, slot: int, num_slots: int, epoch: int, skip: int
    ) -> Iterator[StreamItem]:
        """A carried epoch (:mod:`logitcache.train.reslot`): the piece, in order, from ``skip``."""
        assert self.carry is not None
        length = self.carry.length(self, slot, num_slots, epoch)
        rows = itertools.islice(self.carry.rows(self, slot, num_slots, epoch), skip, None)
        shards = RecentShards(self.dataset)
        for emitted, (shard, row) in enumerate(rows, start=skip + 1):
            end = emitted == length
            state = SlotState(epoch + 1, 0) if end else SlotState(epoch, emitted)
            yield StreamItem(shards.example(shard, row), slot, state, end)

    def __iter__(self) -> Iterator[Any]:
        keep_freed_memory()  # here: in the process (DataLoader worker or not) that decodes
        items = self.items()
        return items if self.make_batches is None else self.make_batches(items)


# --------------------------------------------------------------------------- loading


class _Prefetch:
    """Run an iterator in a background thread, ``depth`` items ahead (for num_workers=0)."""

    _DONE = object()

    def __init__(self, it: Iterator[Any], depth: int):
        self._q: queue.Queue[Any] = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(it,), daemon=True)
        self._thread.start()

    def _run(self, it: Iterator[Any]) -> None:
        try:
            for x in it:
                if not self._put(x):
                    return
            self._put(self._DONE)
        except BaseException as e:  # re-raised in the consumer
            self._put(e)

    def _put(self, x: Any) -> bool:
        """Queue ``x`` unless the consumer has gone; False when it has."""
        while not self._stop.is_set():
            try:
                self._q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Any]:
        while True:
            x = self._q.get()
            if x is self._DONE:
                return
            if isinstance(x, BaseException):
                raise x
            yield x

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class StreamLoader:
    """Batches of a :class:`LogitStream` through DataLoader workers (or a prefetch thread),
    tracking what was *consumed* so that :meth:`state_dict` resumes exactly there.

    Every batch carries its slot's state after it (``batch.state``); workers run ahead, but
    only the states of batches handed to the trainer are recorded. The DataLoader takes the
    workers' batches in turn, skipping a worker whose stream has ended, so the loader also
    records whose turn is next (``due``) to restart the turns there.
    """

    def __init__(
        self,
        stream: LogitStream,
        *,
        num_workers: int = 0,
        prefetch: int = 4,
        pin_memory: bool = False,
    ):
        self.stream = stream
        self.num_workers = num_workers
        self.prefetch = prefetch
        self.pin_memory = pin_memory
        self.slots: dict[int, SlotState] = dict(stream.start)
        self.consumed = 0
        self.due = 0
        """The worker (this rank's slot index) whose batch is due next."""
        self.resumed_from: tuple[int, int] | None = None
        """(ranks, slots) the loaded state was saved on, when either differs from ours."""

    @property
    def num_slots(self) -> int:
        return self.stream.world_size * max(self.num_workers, 1)

    def __iter__(self) -> Iterator[Any]:
        self.stream.rotation = self.due
        self.stream.start = dict(self.slots)
        prefetcher: _Prefetch | None = None
        if self.num_workers > 0:
            loader: Any = DataLoader(
                self.stream,
                batch_size=None,
                num_workers=self.num_workers,
                prefetch_factor=max(self.prefetch // self.num_workers, 1),
                pin_memory=self.pin_memory,
                persistent_workers=False,
            )
        else:
            prefetcher = loader = _Prefetch(iter(self.stream), self.prefetch)
        try:
            for batch in loader:
                state = batch.state
                self.slots[state["slot"]] = SlotState(state["epoch"], state["emitted"])
                self.consumed += 1
                self.due = (state["slot"] + 1) % max(self.num_workers, 1)
                if self.pin_memory and self.num_workers == 0:
                    batch = batch.pin_memory()
                yield batch
        finally:
            if prefetcher is not None:
                prefetcher.close()

    @property
    def own_slots(self) -> range:
        """The slots this rank's workers play."""
        workers = max(self.num_workers, 1)
        return range(self.stream.rank * workers, (self.stream.rank + 1) * workers)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position of this rank's slots, for a checkpoint."""
        s = self.stream
        carried = {} if s.carry is None else {"carry": s.carry.to_json()}
        return {
            "version": STATE_VERSION + bool(carried),
            "seed": s.seed,
            "shuffle": s.shuffle,
            "shuffle_buffer": s.shuffle_buffer,
            "num_examples": s.num_examples,
            "num_slots": self.num_slots,
            "slots": {str(k): [v.epoch, v.emitted] for k, v in sorted(self.slots.items())},
            "due": {str(s.rank): self.due},
            "consumed": self.consumed,
        } | carried

    @staticmethod
    def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
        """Every rank's :meth:`state_dict` as one, from which each rank loads its own part."""
        merged = dict(states[0])
        merged["slots"] = {k: v for state in states for k, v in state["slots"].items()}
        merged["due"] = {k: v for state in states for k, v in state["due"].items()}
        return merged

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``, one rank's or all ranks' (:meth:`merge_states`). Saved on
        another number of slots (ranks × workers), the begun epochs are carried over
        (:mod:`logitcache.train.reslot`); on as many slots dealt to other ranks, each slot
        continues. Either needs all ranks' state, and sets :attr:`resumed_from`."""
        s = self.stream
        problems = []
        mine = {
            "seed": s.seed,
            "shuffle": s.shuffle,
            "shuffle_buffer": s.shuffle_buffer,
            "num_examples": s.num_examples,
        }
        if state.get("version") not in (STATE_VERSION, STATE_VERSION + 1):
            problems.append(f"stream state version {state.get('version')!r} (expected 1 or 2)")
        for key, value in mine.items():
            if state.get(key) != value:
                problems.append(f"{key} was {state.get(key)!r} and is now {value!r}")
        if problems:
            raise InputError(
                "cannot resume the data stream exactly: "
                + "; ".join(problems)
                + ". Resume with the same dataset, seed and shuffle buffer as the checkpointed "
                "run (or start a new run)"
            )
        slots = {int(k): (int(e), int(n)) for k, (e, n) in state["slots"].items()}
        carry = Carry.from_json(state.get("carry"))
        ranks = len(state.get("due", {})) or s.world_size  # `due` has one entry per rank
        if state["num_slots"] != self.num_slots or ranks != s.world_size:
            self.resumed_from = (ranks, int(state["num_slots"]))
        if state["num_slots"] != self.num_slots:
            s.carry = Carry.of(int(state["num_slots"]), slots, carry)
            self.slots, self.consumed, self.due = {}, 0, 0
            return
        s.carry = carry
        # This rank's slots only: a merged state holds every rank's, and a rank that kept the
        # others' would write their stale positions into its next checkpoint.
        self.slots = {k: SlotState(e, n) for k, (e, n) in slots.items() if k in self.own_slots}
        self.consumed = int(state["consumed"])
        if self.resumed_from is not None:  # the same slots, dealt to ranks another way
            self.consumed, self.due = 0, 0
            return
        # Checkpoints written before `due` was kept come from never-ending streams, where every
        # worker takes its turn and every rank takes as many batches: the turn is consumed % W.
        due = state.get("due", {}).get(str(s.rank))
        self.due = int(due) if due is not None else self.consumed % max(self.num_workers, 1)
