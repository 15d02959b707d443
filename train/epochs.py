"""How long a ``train.epochs`` run is: every example exactly once per epoch, counted exactly.

Each reader slot (one DataLoader worker of one rank) batches its own share of each epoch, and a
batch never spans two epochs, so every slot ends every epoch with a short batch: an epoch is
more micro-batches than ⌈examples / data.batch_size⌉, and how many more depends on the ranks,
the workers and, with ``data.max_tokens``, the examples' lengths. So the training stream of an
epochs run ends after its last epoch (:class:`~logitcache.train.stream.LogitStream`), and its
batches are counted here before the first step, for the learning-rate schedule:

* ``data.batch_size``: ⌈n / batch_size⌉ per slot and epoch, n the examples the slot emits
  in that epoch (its share; a fractional last epoch emits part of it);
* ``data.max_tokens``: the batcher's own grouping, run over the examples' lengths in the
  order the slot emits them (its shuffle replayed as index arithmetic). The lengths are read
  from each shard's token columns once; no targets are decoded.

A rank's micro-batches are the sum over its slots and epochs, and the run is ⌈the most any
rank has / optim.grad_accum⌉ optimizer steps. A rank whose batches run out before the others'
trains on an idle batch (:func:`~logitcache.train.batching.idle_batch`: no loss positions) in
each step it has nothing left for, so every rank runs every step's collectives and no example
is skipped or repeated.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from .batching import Batcher
from .stream import LogitStream, StreamLoader


def micro_batches(loader: StreamLoader) -> int:
    """The micro-batches ``loader`` yields from where it stands (a fresh loader: over the whole
    run) to the end of the run, its rank's share, counted without reading any targets. Its
    stream must end (``epochs`` set) and batch with a :class:`Batcher`. A resumed slot's
    epoch is batched afresh from its position, as the resumed stream batches it."""
    stream, batcher = loader.stream, loader.stream.make_batches
    assert stream.epochs is not None and isinstance(batcher, Batcher)
    lengths = _Lengths(stream, batcher) if batcher.max_tokens else None
    total = 0
    for slot in loader.own_slots:
        at = loader.slots.get(slot, stream.first_state)
        for epoch in range(at.epoch, math.ceil(stream.epochs)):
            skip = at.emitted if epoch == at.epoch else 0
            if lengths is None:
                n = stream.epoch_length(slot, loader.num_slots, epoch) - skip
                total += math.ceil(n / batcher.batch_size)
            else:
                rows = itertools.islice(
                    stream.epoch_rows(slot, loader.num_slots, epoch), skip, None
                )
                total += batcher.count(lengths.of(shard, row) for shard, row in rows)
    return total


def steps_for(shares: list[int], grad_accum: int) -> int:
    """Optimizer steps in which every rank takes all of its ``shares[rank]`` micro-batches."""
    return math.ceil(max(shares) / grad_accum)


class _Lengths:
    """Each example's length as ``batcher`` counts it, read shard by shard on first use."""

    def __init__(self, stream: LogitStream, batcher: Batcher):
        self.stream, self.batcher = stream, batcher
        self._shards: dict[int, np.ndarray] = {}

    def of(self, shard: int, row: int) -> int:
        if shard not in self._shards:
            self._shards[shard] = self._read(shard)
        return int(self._shards[shard][row])

    def _read(self, shard: int) -> np.ndarray:
        reader = self.stream.dataset.shard(shard)
        parts = []
        for i in range(reader.num_batches):
            rb = reader.record_batch(i)
            prompt = rb.column("prompt_ids").value_lengths().to_numpy()
            response = rb.column("response_ids").value_lengths().to_numpy()
            parts += [
                self.batcher.length(int(p), int(r)) for p, r in zip(prompt, response, strict=True)
            ]
        return np.asarray(parts, dtype=np.int64)
