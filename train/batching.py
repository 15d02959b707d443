"""Examples to padded tensors: the student's input and, flattened, its loss positions.

The student reads ``prompt_ids + response_ids`` (its simplified prompt, then the teacher's
response). Target ``j`` is the teacher's distribution for ``response_ids[j]``, so the student
logit compared with it is the one at sequence index ``len(prompt) + j - 1``: response token 0
is predicted from the last prompt token. With an **empty prompt** no logit precedes response
token 0, so its target is dropped (counted in ``Batch.dropped_targets``); targets 1… are used.

Sequences are right-padded, so a real token never attends to padding. A sequence longer than
``max_seq_len`` loses the end of its response; a prompt that leaves no room for one response
token is cut from the left. Batches hold a fixed number of examples or, with a token budget,
as many as fit in ``rows × longest ≤ max_tokens`` (padding included).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import TypeVar

import numpy as np
import torch

from logitcache.cache.format import DatasetInfo, Example

from .loss_inputs import Targets, stack_targets
from .stream import StreamItem

_Item = TypeVar("_Item")


@dataclass
class Batch:
    """One micro-batch: B sequences padded to T, and N loss positions."""

    input_ids: torch.Tensor
    """(B, T) int64 prompt + response tokens, right-padded with ``pad_id``."""
    attention_mask: torch.Tensor
    """(B, T) int64, 1 on real tokens."""
    positions: torch.Tensor
    """(N,) int64 flat index ``b * T + t`` of the logit that predicts each target."""
    labels: torch.Tensor
    """(N,) int64 the response token at each loss position (for the CE term)."""
    targets: Targets
    """Teacher targets, N rows."""
    ids: list[str] = field(default_factory=list)
    """Example ids, in row order."""
    epoch: int = 0
    """Epoch the examples belong to (a batch never spans two)."""
    state: dict[str, int] | None = None
    """The producing slot's state after this batch: ``{"slot", "epoch", "emitted"}``."""
    truncated: int = 0
    """Examples cut to ``max_seq_len``."""
    dropped_targets: int = 0
    """Targets without a predicting logit (response token 0 after an empty prompt)."""

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def num_positions(self) -> int:
        return int(self.positions.numel())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """This batch with ``fn`` applied to each of its tensors, the targets' included."""
        return replace(
            self,
            input_ids=fn(self.input_ids),
            attention_mask=fn(self.attention_mask),
            positions=fn(self.positions),
            labels=fn(self.labels),
            targets=self.targets.map(fn),
        )


def fit_length(prompt_len: int, response_len: int, max_seq_len: int) -> tuple[int, int]:
    """(prompt, response) lengths kept so that their sum is at most ``max_seq_len``."""
    if prompt_len + response_len <= max_seq_len:
        return prompt_len, response_len
    keep_prompt = min(prompt_len, max_seq_len - min(response_len, 1))
    return keep_prompt, max_seq_len - keep_prompt


def collate(
    examples: list[Example],
    info: DatasetInfo,
    *,
    max_seq_len: int,
    pad_id: int = 0,
    tail_draws: bool = False,
) -> Batch:
    """Pad ``examples`` into one :class:`Batch` (see the module docstring for the layout).

    ``tail_draws``: a top-k dataset's tail draws are used (see
    :func:`~logitcache.train.loss_inputs.stack_targets`).
    """
    lengths = [fit_length(len(ex.prompt_ids), len(ex.response_ids), max_seq_len) for ex in examples]
    B, T = len(examples), max([p + r for p, r in lengths] + [1])
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.int64)
    positions, rows = [], []  # rows: (example, first target, last target + 1)
    truncated = dropped = 0
    for b, (ex, (L, P)) in enumerate(zip(examples, lengths, strict=True)):
        truncated += (len(ex.prompt_ids), len(ex.response_ids)) != (L, P)
        prompt = np.asarray(ex.prompt_ids)[len(ex.prompt_ids) - L :]
        input_ids[b, :L] = prompt
        input_ids[b, L : L + P] = np.asarray(ex.response_ids)[:P]
        mask[b, : L + P] = 1
        first = 1 if L == 0 else 0  # nothing predicts response token 0 without a prompt
        dropped += first if P > 0 else 0
        if first < P:
            positions.append(b * T + L - 1 + np.arange(first, P))
            rows.append((ex, first, P))
    pos = np.concatenate(positions) if positions else np.zeros(0, np.int64)
    spans = [np.asarray(ex.response_ids)[a:z] for ex, a, z in rows]
    labels = np.concatenate(spans) if spans else np.zeros(0, np.int64)
    return Batch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(mask),
        positions=torch.from_numpy(pos.astype(np.int64)),
        labels=torch.from_numpy(labels.astype(np.int64)),
        targets=stack_targets(rows, info.targets, tail_draws),
        ids=[ex.id for ex in examples],
        truncated=int(truncated),
        dropped_targets=int(dropped),
    )


def idle_batch(info: DatasetInfo, *, pad_id: int = 0, tail_draws: bool = False) -> Batch:
    """One pad token and no loss positions: what a rank whose batches have run out before the
    other ranks' runs, so that its collectives still match theirs. It adds nothing to the loss
    or the gradient; the token is there because a model cannot run on zero rows."""
    batch = collate([], info, max_seq_len=1, pad_id=pad_id, tail_draws=tail_draws)
    batch.input_ids = torch.full((1, 1), pad_id, dtype=torch.int64)
    batch.attention_mask = torch.ones((1, 1), dtype=torch.int64)
    return batch


@dataclass(frozen=True)
class Batcher:
    """Groups a slot's stream of examples into :class:`Batch` es; picklable for workers.

    Exactly one of ``batch_size`` (examples per batch) and ``max_tokens`` (padded tokens per
    batch) is positive. A batch never spans two epochs, so each epoch ends with a short one.
    """

    info: DatasetInfo
    max_seq_len: int
    batch_size: int = 0
    max_tokens: int = 0
    pad_id: int = 0
    tail_draws: bool = False
    """Use a top-k dataset's tail draws (see :func:`collate`)."""

    def __call__(self, items: Iterator[StreamItem]) -> Iterator[Batch]:
        for group in self._groups((it, self._tokens(it.example), it.end_of_epoch) for it in items):
            yield self._batch(group)

    def _tokens(self, ex: Example) -> int:
        return self.length(len(ex.prompt_ids), len(ex.response_ids))

    def length(self, prompt_len: int, response_len: int) -> int:
        """An example's tokens in the student's sequence (after cutting to max_seq_len)."""
        return sum(fit_length(prompt_len, response_len, self.max_seq_len))

    def count(self, lengths: Iterable[int]) -> int:
        """How many batches one slot's epoch makes whose examples have, in order, these
        :meth:`length` s: the same grouping as batching them, without the examples."""
        return sum(1 for _ in self._groups((None, n, False) for n in lengths))

    def _groups(self, sized: Iterable[tuple[_Item, int, bool]]) -> Iterator[list[_Item]]:
        """``(item, length, end_of_epoch)`` cut into batches: full, over the token budget, or
        at an epoch's end (and at the end of the stream)."""
        group: list[_Item] = []
        longest = 0
        for item, n, end in sized:
            if group and self.max_tokens and (len(group) + 1) * max(longest, n) > self.max_tokens:
                yield group
                group, longest = [], 0
            group.append(item)
            longest = max(longest, n)
            if end or (self.batch_size and len(group) == self.batch_size):
                yield group
                group, longest = [], 0
        if group:
            yield group

    def _batch(self, group: list[StreamItem]) -> Batch:
        batch = collate(
            [it.example for it in group],
            self.info,
            max_seq_len=self.max_seq_len,
            pad_id=self.pad_id,
            tail_draws=self.tail_draws,
        )
        last = group[-1]
        # The epoch of the examples (the state after an epoch's last example is the next one's).
        batch.epoch = last.state.epoch - 1 if last.end_of_epoch else last.state.epoch
        batch.state = {"slot": last.slot, "epoch": last.state.epoch, "emitted": last.state.emitted}
        return batch
