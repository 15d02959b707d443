"""One epoch's order, as index arithmetic: which examples each reader slot emits, and when.

The order is fixed by ``(seed, epoch)``: the shards are permuted, their rows laid end to end,
and that sequence cut into ``world_size × num_workers`` contiguous, near-equal *slots* (sizes
differ by at most one example), so the slots are complete and disjoint and each reads about
1/slots of the bytes. Each slot then passes its range through a shuffle buffer of
``shuffle_buffer`` examples, seeded by ``(seed, epoch, slot)``. Nothing here reads a shard:
:mod:`logitcache.train.stream` reads the examples in this order.
"""

from __future__ import annotations

import numpy as np


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The order the shards are laid end to end in ``epoch``."""
    if not shuffle:
        return list(range(num_shards))
    return [int(i) for i in np.random.default_rng([seed, epoch, 0]).permutation(num_shards)]


def slot_range(num_examples: int, slot: int, num_slots: int) -> tuple[int, int]:
    """The contiguous range ``[lo, hi)`` of the epoch's sequence that ``slot`` reads."""
    return num_examples * slot // num_slots, num_examples * (slot + 1) // num_slots


def slot_segments(
    shard_rows: list[int], order: list[int], slot: int, num_slots: int
) -> list[tuple[int, int, int]]:
    """``(shard, row_lo, row_hi)`` pieces of shards, in order, that make up ``slot``'s range."""
    lo, hi = slot_range(sum(shard_rows), slot, num_slots)
    out, start = [], 0
    for shard in order:
        end = start + shard_rows[shard]
        a, b = max(lo, start), min(hi, end)
        if a < b:
            out.append((shard, a - start, b - start))
        start = end
    return out


class Shuffle:
    """The order in which a buffer of ``size`` emits source items ``0 … n-1``.

    The buffer first fills with ``size`` items; then each step emits a uniformly chosen
    buffered item and reads the next source item into its place; at the end it drains in
    random order. So item ``t`` of the output has source index ``< size + t`` and at most
    ``size`` items are ever pending. ``size ≤ 1`` keeps the source order.
    """

    def __init__(self, n: int, size: int, seed: list[int]):
        self.n, self.size = n, max(size, 1)
        self.rng = np.random.default_rng(seed)
        self.read = 0
        """Source items read into the buffer so far."""
        self.pending: list[int] = []
        self.emitted = 0
        self._draws = np.empty(0)
        self._next_draw = 0

    def fill(self) -> list[int]:
        """Read source items until the buffer is full; returns the newly read ones."""
        new = list(range(self.read, min(self.n, self.read + self.size - len(self.pending))))
        self.pending += new
        self.read += len(new)
        return new

    def emit(self) -> int | None:
        """The next item of the output (the caller refills afterwards), or None at the end."""
        if not self.pending:
            return None
        j = self._draw(len(self.pending)) if self.size > 1 else 0
        item = self.pending[j]
        if self.size > 1:
            self.pending[j] = self.pending[-1]
            self.pending.pop()
        else:
            self.pending.pop(0)
        self.emitted += 1
        return item

    def _draw(self, m: int) -> int:
        # Uniforms are drawn in blocks (one numpy call per 4096 steps); the sequence is the
        # same whether the steps are replayed or run for real.
        if self._next_draw == len(self._draws):
            self._draws, self._next_draw = self.rng.random(4096), 0
        u = self._draws[self._next_draw]
        self._next_draw += 1
        return min(int(u * m), m - 1)
