"""Resume a stream on another number of reader slots (ranks × ``data.num_workers``).

A checkpoint records where each slot stood, ``(epoch, emitted)``. Resumed on the same slots, each
slot continues its own order (:mod:`logitcache.train.stream`). On another number of slots, the
old slots' orders cannot simply continue, since every slot's range and shuffle depend on how many
slots there are, so the run *carries* the unfinished epochs over:

* the **carried epochs** are those the checkpoint had begun (from the least advanced slot's epoch
  to the most advanced one's, or to the last epoch an earlier carry covered);
* the rest of a carried epoch is each old slot's remaining examples, in that slot's own order
  (shuffle included), laid end to end by old slot; this sequence is cut into the new slots'
  contiguous, near-equal pieces (:func:`~logitcache.train.order.slot_range`), each read in order;
* later epochs are laid out afresh for the new number of slots.

So every example is still trained exactly once per epoch, and nothing read before the checkpoint
is read again in its epoch. A run resumed this way does not reproduce the losses of an
uninterrupted run on the old slots (micro-batches group other examples), only its data. A carry
records the old layout (and any carry that layout itself had), so a carried run can be resumed
again, on yet another number of slots. All of it is index arithmetic: nothing is read to plan it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .order import slot_range

if TYPE_CHECKING:
    from .stream import LogitStream


@dataclass(frozen=True)
class Carry:
    """The unfinished epochs ``first … last`` of an earlier layout of ``num_slots`` slots.

    ``states[s]`` is ``(epoch, emitted)`` of earlier slot ``s`` at the checkpoint; ``before``
    is the carry the earlier layout had itself (or None). New slots start at ``(first, 0)``;
    ``last < first`` carries nothing over (every begun epoch was finished).
    """

    num_slots: int
    states: tuple[tuple[int, int], ...]
    before: Carry | None
    first: int
    last: int

    @classmethod
    def of(cls, num_slots: int, slots: dict[int, tuple[int, int]], before: Carry | None) -> Carry:
        """The carry of a checkpoint whose ``num_slots`` slots stood at ``slots`` (a slot
        missing from it never handed over a batch: it stands at the layout's start)."""
        start = (before.first if before is not None else 0, 0)
        states = tuple(slots.get(s, start) for s in range(num_slots))
        first = min(e for e, _ in states)
        # An epoch was begun if a slot is past it or has emitted some of it.
        begun = [e - 1 for e, _ in states] + [e for e, n in states if n > 0]
        last = max([*begun, before.last if before is not None else -1])
        return cls(num_slots, states, before, first, last)

    def covers(self, epoch: int) -> bool:
        return self.first <= epoch <= self.last

    # ---------------------------------------------------------------- the rest of an epoch

    def _rest(self, stream: LogitStream, old_slot: int, epoch: int) -> tuple[int, int]:
        """(skip, count): the part of ``old_slot``'s order in ``epoch`` not yet emitted."""
        e, n = self.states[old_slot]
        length = layout_length(stream, self.before, old_slot, self.num_slots, epoch)
        if e > epoch:
            return length, 0
        skip = n if e == epoch else 0
        return skip, length - skip

    def _pieces(
        self, stream: LogitStream, slot: int, num_slots: int, epoch: int
    ) -> list[tuple[int, int, int]]:
        """(old slot, skip, count) that make up new ``slot``'s piece of ``epoch``."""
        rests = [self._rest(stream, s, epoch) for s in range(self.num_slots)]
        lo, hi = slot_range(sum(c for _, c in rests), slot, num_slots)
        out, start = [], 0
        for s, (skip, count) in enumerate(rests):
            a, b = max(lo, start), min(hi, start + count)
            if a < b:
                out.append((s, skip + a - start, b - a))
            start += count
        return out

    def length(self, stream: LogitStream, slot: int, num_slots: int, epoch: int) -> int:
        return sum(c for _, _, c in self._pieces(stream, slot, num_slots, epoch))

    def rows(
        self, stream: LogitStream, slot: int, num_slots: int, epoch: int
    ) -> Iterator[tuple[int, int]]:
        for old, skip, count in self._pieces(stream, slot, num_slots, epoch):
            rows = layout_rows(stream, self.before, old, self.num_slots, epoch)
            yield from itertools.islice(rows, skip, skip + count)

    # ---------------------------------------------------------------- in a checkpoint

    def to_json(self) -> dict[str, Any]:
        return {
            "num_slots": self.num_slots,
            "states": [list(s) for s in self.states],
            "before": None if self.before is None else self.before.to_json(),
            "first": self.first,
            "last": self.last,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Carry | None:
        if d is None:
            return None
        return cls(
            int(d["num_slots"]),
            tuple((int(e), int(n)) for e, n in d["states"]),
            cls.from_json(d["before"]),
            int(d["first"]),
            int(d["last"]),
        )


def layout_length(
    stream: LogitStream, carry: Carry | None, slot: int, num_slots: int, epoch: int
) -> int:
    """Examples ``slot`` of ``num_slots`` emits in ``epoch``, with ``carry`` (or none)."""
    if carry is not None and carry.covers(epoch):
        return carry.length(stream, slot, num_slots, epoch)
    return stream.plain_epoch_length(slot, num_slots, epoch)


def layout_rows(
    stream: LogitStream, carry: Carry | None, slot: int, num_slots: int, epoch: int
) -> Iterator[tuple[int, int]]:
    """(shard, row) of each example ``slot`` of ``num_slots`` emits in ``epoch``, in order."""
    if carry is not None and carry.covers(epoch):
        return carry.rows(stream, slot, num_slots, epoch)
    return stream.plain_epoch_rows(slot, num_slots, epoch)
