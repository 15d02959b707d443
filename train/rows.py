"""Examples out of shards for the training stream: by a slot's position, or by (shard, row).

Examples are copied out of their record batch, so a buffered example does not keep the batch
alive; at most two shards of a slot are held at once (the one being read and the next, fetched in
the background), a few for a carried epoch (:mod:`logitcache.train.reslot`). Shards are read only
through :mod:`logitcache.cache.reader`.
"""

from __future__ import annotations

import bisect
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import fields, is_dataclass
from typing import Any

import numpy as np

from logitcache.cache.format import Example
from logitcache.cache.reader import LogitDataset, ShardReader


def standalone(x: Any) -> Any:
    """``x`` with every array in it copied (dataclasses field by field, whatever the kind of
    targets), so that a buffered example does not keep its whole record batch alive."""
    if isinstance(x, np.ndarray):
        return x.copy()
    if is_dataclass(x):
        return type(x)(*[standalone(getattr(x, f.name)) for f in fields(x)])
    return x


class OpenShard:
    """One shard's bytes, the row offset of each record batch, and the last decoded batch."""

    def __init__(self, reader: ShardReader):
        self.reader = reader
        rows = [reader.record_batch(i).num_rows for i in range(reader.num_batches)]
        self.starts = np.concatenate([[0], np.cumsum(rows)]).tolist()
        self._batch_index = -1
        self._batch: Any = None

    def example(self, row: int) -> Example:
        b = bisect.bisect_right(self.starts, row) - 1
        if b != self._batch_index:
            self._batch, self._batch_index = self.reader.batch(b), b
        return standalone(self._batch.example(row - self.starts[b]))


class RecentShards:
    """Examples by (shard, row), the last few shards kept open: a carried epoch reads each old
    slot's order, which moves among the shards of its shuffle buffer."""

    def __init__(self, ds: LogitDataset, keep: int = 3):
        self.ds, self.keep = ds, keep
        self._open: dict[int, OpenShard] = {}

    def example(self, shard: int, row: int) -> Example:
        if shard not in self._open:
            if len(self._open) == self.keep:
                del self._open[next(iter(self._open))]
            self._open[shard] = OpenShard(self.ds.shard(shard))
        else:
            self._open[shard] = self._open.pop(shard)  # most recently used last
        return self._open[shard].example(row)


class SlotSource:
    """Random access to one slot's range by its position ``0 … n-1``; fastest in order.

    While a shard is read, the next one is fetched in a background thread, so remote storage
    and the checksum overlap with decoding and training.
    """

    def __init__(self, ds: LogitDataset, segments: list[tuple[int, int, int]]):
        self.ds = ds
        self.segments = segments
        self.starts = np.concatenate([[0], np.cumsum([hi - lo for _, lo, hi in segments])])
        self.n = int(self.starts[-1])
        self._open: tuple[int, OpenShard] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: tuple[int, Future[ShardReader]] | None = None

    def locate(self, pos: int) -> tuple[int, int, int]:
        """(segment, shard, row in the shard) of position ``pos``; reads nothing."""
        seg = int(np.searchsorted(self.starts, pos, side="right")) - 1
        shard, lo, _ = self.segments[seg]
        return seg, shard, lo + pos - int(self.starts[seg])

    def get(self, pos: int) -> Example:
        seg, shard, row = self.locate(pos)
        if self._open is None or self._open[0] != shard:
            self._open = (shard, OpenShard(self._reader(shard)))
            self._read_ahead(seg + 1)
        return self._open[1].example(row)

    def _reader(self, shard: int) -> ShardReader:
        if self._ahead is not None and self._ahead[0] == shard:
            reader = self._ahead[1].result()
            self._ahead = None
            return reader
        return self.ds.shard(shard)

    def _read_ahead(self, seg: int) -> None:
        if seg >= len(self.segments):
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="logitcache-read-ahead")
        shard = self.segments[seg][0]
        self._ahead = (shard, self._pool.submit(self.ds.shard, shard))

    def close(self) -> None:
        self._open = self._ahead = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
