"""Teacher logits → stored targets, on the device, from an fp32 log-softmax at temperature T.

Top-k: the k largest log-probs of ``log_softmax(logits / T)`` with their ids, plus the log of
the mass outside them, summed directly over the rest of the vocabulary (not as
``1 - Σ top-k``), so that k = vocab gives exactly -inf and small tails keep their digits.

Sampled: N draws per position from the same distribution, reduced to unique ids with counts.

Randomness is counter-based: every uniform number is a hash of (seed, example id, position,
draw). A draw therefore does not depend on batch composition, rank count or resume history,
so a crashed-and-resumed capture, or one on 2 ranks, stores what a single clean run stores.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .format import Sampled, TopK

if TYPE_CHECKING:
    from .capture_config import TargetConfig

_M32 = 0xFFFFFFFF
STREAM_TARGETS = 0x5A17
"""Salt of the uniforms that draw sampled targets."""
STREAM_GENERATE = 0x6E47
"""Salt of the uniforms that sample generated tokens."""


# --------------------------------------------------------------------------- counter RNG


def _mulmod32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2^32 for x < 2^32 held in int64, without overflowing int64."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche (lowbias32), on int64 tensors holding uint32."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mulmod32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mulmod32(x, 0x846CA68B)
    return x ^ (x >> 16)


def example_keys(ids: list[str], seed: int) -> np.ndarray:
    """One 32-bit key per example id and seed (int64 array)."""
    return np.array(
        [
            int.from_bytes(hashlib.sha256(f"{seed}\0{i}".encode()).digest()[:4], "little")
            for i in ids
        ],
        dtype=np.int64,
    )


def row_keys(ex_keys: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """Key of each (example, response position) row for one random stream: (R,) int64."""
    return mix32(mix32(ex_keys ^ stream) ^ mix32(positions + 0x9E3779B9))


def uniforms(keys: torch.Tensor, n: int, sampling: str = "multinomial") -> torch.Tensor:
    """(R, n) float64 uniforms in (0, 1), one row per key.

    ``"multinomial"``: column j from counter j, all independent. ``"systematic"``: one uniform
    u per row and the points (j + u) / n: each is uniform on its own n-th of (0, 1), so every
    draw still has the teacher's distribution (unbiased counts), while an id of probability p
    is drawn floor(n·p) or ceil(n·p) times instead of Binomial(n, p).
    """
    if sampling == "systematic":
        offset = uniforms(keys, 1)  # (R, 1)
        return (torch.arange(n, device=keys.device, dtype=torch.float64) + offset) / n
    if sampling != "multinomial":
        raise ValueError(f"sampling={sampling!r}; expected 'systematic' or 'multinomial'")
    cols = mix32(torch.arange(1, n + 1, device=keys.device, dtype=torch.int64) * 0x2545F491)
    return unit_interval(mix32(keys[:, None] ^ cols[None, :]))  # (R, n)


def unit_interval(h: torch.Tensor) -> torch.Tensor:
    """32-bit hashes → float64 in (0, 1): the top 24 bits, centred in their cell. In float32
    the largest cell would round to exactly 1.0, and an inverse-CDF draw at 1.0 picks the last
    id whatever its probability."""
    return ((h >> 8).to(torch.float64) + 0.5) / float(1 << 24)


# --------------------------------------------------------------------------- targets


@dataclass
class SampledTensors:
    """Sampled targets of P positions (a batch's, flat): unique drawn ids with counts."""

    ids: torch.Tensor
    """(U,) int32 unique drawn ids, ascending within each position."""
    counts: torch.Tensor
    """(U,) int32 draws of each id."""
    nunique: torch.Tensor
    """(P,) int32 unique ids per position."""

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> SampledTensors:
        """These targets with ``fn`` applied to every tensor (to move or pin them)."""
        return _map_tensors(self, fn)

    def split(self, bounds: np.ndarray) -> list[Sampled]:
        """One :class:`Sampled` per example; example i holds positions bounds[i]:bounds[i + 1]
        (host tensors; the arrays are views of them)."""
        ids, counts, nunique = self.ids.numpy(), self.counts.numpy(), self.nunique.numpy()
        ubounds = np.concatenate([[0], np.cumsum(nunique)])[bounds]  # (E + 1,) into ids
        return [
            Sampled(ids[u0:u1], counts[u0:u1], nunique[p0:p1])
            for p0, p1, u0, u1 in zip(
                bounds[:-1], bounds[1:], ubounds[:-1], ubounds[1:], strict=True
            )
        ]


@dataclass
class SampleDraws:
    """Sampled targets before :meth:`reduced`: the N drawn ids of each of P positions."""

    ids: torch.Tensor
    """(P, n) int64 drawn ids."""

    def reduced(self) -> SampledTensors:
        return unique_counts(self.ids)


@dataclass
class TopKTensors:
    """Top-k targets of P positions (a batch's, flat)."""

    ids: torch.Tensor
    """(P, k) int32 token ids, most likely first."""
    logprobs: torch.Tensor
    """(P, k) float32 log-probs."""
    tail: torch.Tensor
    """(P,) float32 log of the mass outside the top k."""
    tail_draws: torch.Tensor | None = None
    """(P, n) int64 ids drawn from the distribution outside the top k (renormalised there),
    when uniforms were given; rows whose tail holds no mass hold meaningless ids."""
    tail_sampled: SampledTensors | None = None
    """The tail draws as unique ids with counts (:meth:`reduced`); none where the tail is empty."""
    counts: torch.Tensor | None = None
    """(P,) int32 ids kept per row (adaptive top-k): row p's first counts[p] entries, the rest
    padding at log-prob -inf; None: all k."""
    draw_counts: torch.Tensor | None = None
    """(P,) int64 draws of each row (draws by tail mass): row p's first draw_counts[p] tail
    draws count, the rest are padding; None: all n."""

    def reduced(self) -> TopKTensors:
        """Tail draws reduced to unique ids with counts; a row whose tail holds no mass keeps
        none."""
        if self.tail_draws is None:
            return self
        keep = self.tail > float("-inf")  # (P,)
        sampled = unique_counts(self.tail_draws, keep, self.draw_counts)
        return replace(self, tail_draws=None, draw_counts=None, tail_sampled=sampled)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TopKTensors:
        """These targets with ``fn`` applied to every tensor (to move or pin them)."""
        return _map_tensors(self, fn)

    def split(self, bounds: np.ndarray) -> list[TopK]:
        """One :class:`TopK` per example; example i holds positions bounds[i]:bounds[i + 1]
        (host tensors, after :meth:`reduced`; the arrays are views of them)."""
        ids, logprobs, tail = self.ids.numpy(), self.logprobs.numpy(), self.tail.numpy()
        n = len(bounds) - 1
        draws = self.tail_sampled.split(bounds) if self.tail_sampled is not None else [None] * n
        counts = self.counts.numpy() if self.counts is not None else None
        return [
            TopK(
                ids[p0:p1],
                logprobs[p0:p1],
                tail[p0:p1],
                d,
                None if counts is None else counts[p0:p1],
            )
            for p0, p1, d in zip(bounds[:-1], bounds[1:], draws, strict=True)
        ]


RowTargets = TopKTensors | SampleDraws
"""Targets as computed, one row per position: what chunks and generation steps concatenate."""
BatchTargets = TopKTensors | SampledTensors
"""A batch's targets as stored, flat over its positions: :meth:`split` cuts them per example."""


def _map_tensors(t: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``t`` (target tensors) with ``fn`` applied to each tensor field, nested ones included."""
    out = {}
    for f in fields(t):
        v = getattr(t, f.name)
        if isinstance(v, torch.Tensor):
            out[f.name] = fn(v)
        elif v is not None:  # nested target tensors: a top-k batch's tail draws
            out[f.name] = v.map(fn)
    return replace(t, **out)


def log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 ``log_softmax(logits / T)`` over the last axis: (P, V)."""
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    return torch.log_softmax(x, dim=-1)


def topk_targets(
    logits: torch.Tensor,
    k: int,
    temperature: float,
    *,
    inplace: bool = False,
    tail_uniforms: torch.Tensor | None = None,
    k_mass: float | None = None,
    k_min: int = 1,
    n_rate: float | None = None,
    sampling: str = "multinomial",
) -> TopKTensors:
    """Top-k ids, log-probs and tail log-mass of (P, V) logits at temperature T; with
    ``tail_uniforms`` (P, n), also n inverse-CDF draws from the tail (the ids outside the top k,
    renormalised), from the same exponentials that sum the tail.

    Adaptive top-k (``k_mass``): row p keeps the fewest of its most likely ids whose mass
    reaches ``k_mass``, clamped to [k_min, k] (:func:`kept_per_row`); the other entries of its
    k are padding at log-prob -inf, and its tail is everything outside the kept ids. Draws by
    tail mass (``n_rate``): row p draws min(n, round(n_rate · tail mass)) times
    (:func:`draws_per_row`); ``sampling`` says how ``tail_uniforms`` were made, so that
    systematic points are respaced for the row's own number of draws.

    One exponential pass: e = exp(x - max) gives the normalizer Z and, with the top k zeroed,
    the tail mass summed directly (no 1 − Σ cancellation); the top-k log-probs are
    x - max - log Z, exact even where e underflows. Faster than log_softmax + a log-sum-exp
    of the rest, and closer to an fp64 reference (measured: ~2e-6 vs ~1e-5 at V = 49k).
    ``inplace=True`` lets it overwrite ``logits`` (25% faster on CPU: no fresh (P, V) buffer).
    """
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    elif not inplace and x is logits:
        x = x.clone()
    m = x.amax(dim=-1, keepdim=True)  # (P, 1)
    vals, idx = x.topk(k, dim=-1, sorted=True)  # (P, k), same order as the log-probs
    e = x.sub_(m).exp_()  # (P, V) = exp(x - max), in x's own storage
    log_z = e.sum(dim=-1).log()  # (P,)
    logprobs = vals - m - log_z[:, None]
    draws = counts = n_draws = None
    if k_mass is not None:
        counts = kept_per_row(logprobs, k_mass, k_min)  # (P,)
        kept = torch.arange(k, device=x.device) < counts[:, None]  # (P, k)
    if k == x.shape[-1] and counts is None:
        tail = torch.full_like(log_z, float("-inf"))
        if tail_uniforms is not None:
            draws = torch.zeros(tail_uniforms.shape, dtype=torch.int64, device=x.device)
    else:
        # (P, V) the tail's unnormalised probabilities: the kept ids zeroed
        e.scatter_(-1, idx, 0.0 if counts is None else e.gather(-1, idx).masked_fill_(kept, 0.0))
        tail = e.sum(dim=-1).log() - log_z  # (P,)
        if tail_uniforms is not None and n_rate is not None:
            n_draws = draws_per_row(tail, tail_uniforms.shape[-1], n_rate)  # (P,)
            if sampling == "systematic":  # points (j + u) / n_p instead of (j + u) / n
                scale = tail_uniforms.shape[-1] / n_draws.clamp(min=1).double()
                tail_uniforms = tail_uniforms * scale[:, None]
        if tail_uniforms is not None:
            draws = _inverse_cdf(e.double().cumsum_(-1), tail_uniforms)
    if counts is not None:
        logprobs = logprobs.masked_fill(~kept, float("-inf"))
    return TopKTensors(idx.to(torch.int32), logprobs, tail, draws, None, counts, n_draws)


def kept_per_row(logprobs: torch.Tensor, k_mass: float, k_min: int = 1) -> torch.Tensor:
    """(P,) int32 ids kept per row of (P, k) log-probs sorted most likely first: the fewest
    whose probabilities sum to at least ``k_mass``, clamped to [k_min, k]. A row whose k ids
    hold less than ``k_mass`` keeps all k."""
    cum = logprobs.double().exp().cumsum(-1)  # (P, k)
    reached = (cum < k_mass).sum(-1) + 1  # the first index at which the mass is reached, + 1
    return reached.clamp(min=k_min, max=logprobs.shape[-1]).to(torch.int32)


def draws_per_row(tail: torch.Tensor, n: int, n_rate: float) -> torch.Tensor:
    """(P,) int64 tail draws of each row from its (P,) tail log-mass: min(n, round(n_rate·m)).

    For a total budget of draws, this allocation (draws ∝ tail mass) minimises the summed
    variance of the tail estimates m · count / n_p when the tails are alike in spread:
    Var ∝ m_p² / n_p, minimised under Σ n_p = B at n_p ∝ m_p (Neyman allocation)."""
    return torch.round(tail.double().exp() * n_rate).clamp_(0, n).to(torch.int64)


def rate_for_budget(tail_mass: np.ndarray, budget: float, n: int) -> float:
    """The ``n_rate`` whose :func:`draws_per_row` spends ``budget`` draws per position on
    average over positions with tail masses ``tail_mass`` (P,), by bisection; each position
    gets at most ``n``. Raises ValueError when even n at every position with a tail is less."""
    m = np.asarray(tail_mass, dtype=np.float64)
    if not 0 < budget <= n:
        raise ValueError(f"budget {budget} must be in (0, n = {n}]")

    def spent(rate: float) -> float:
        return float(np.minimum(np.round(rate * m), n).mean())

    hi = 1.0
    while spent(hi) < budget:
        hi *= 2
        if hi > 1e12:
            raise ValueError(f"no rate spends {budget} draws per position (cap n = {n})")
    lo = 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if spent(mid) < budget else (lo, mid)
    return hi


def _inverse_cdf(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(P, n) ids where (P, V) unnormalised cumulative weights first exceed u · total."""
    v = u.double() * cdf[:, -1:]
    # right=True: the first id whose cumulative mass exceeds v; a zero-mass id is never drawn.
    return torch.searchsorted(cdf, v, right=True).clamp_(max=cdf.shape[-1] - 1)


def sample_ids(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws: for (P, V) log-probs and (P, n) uniforms, (P, n) int64 ids."""
    return _inverse_cdf(logp.double().exp().cumsum(-1), u)  # fp64: the last entries differ


def unique_counts(
    draws: torch.Tensor, keep: torch.Tensor | None = None, lengths: torch.Tensor | None = None
) -> SampledTensors:
    """(P, n) drawn ids → unique ids (ascending per row), their counts, and uniques per row.

    ``keep`` (P,) bool: rows where it is False get no ids (nunique 0), e.g. a top-k row whose
    tail holds no mass to draw from. ``lengths`` (P,): only the first lengths[p] draws of row
    p count (draws by tail mass); None: all n."""
    n = draws.shape[-1]
    if lengths is not None:  # uncounted draws sort last, past every id
        col = torch.arange(n, device=draws.device)
        draws = torch.where(col < lengths[:, None], draws, torch.iinfo(torch.int64).max)
    draws = draws.sort(dim=-1).values
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    if keep is not None:
        first &= keep[:, None]
    if lengths is not None:
        first &= col < lengths[:, None]
    starts = first.reshape(-1).nonzero().squeeze(1)  # (U,) flat index of each unique id
    # A kept row starts with a "first", so its runs never cross a row boundary; a dropped
    # row's entries would extend the run before it, so they are cut at each row's end.
    row = starts // n
    row_end = row * n + (n if lengths is None else lengths[row])
    nxt = torch.cat([starts[1:], torch.tensor([draws.numel()], device=draws.device)])
    return SampledTensors(
        ids=draws.reshape(-1)[starts].to(torch.int32),
        counts=(torch.minimum(nxt, row_end) - starts).to(torch.int32),
        nunique=first.sum(-1).to(torch.int32),
    )


def sampled_targets(
    logits: torch.Tensor,
    n: int,
    temperature: float,
    keys: torch.Tensor,
    sampling: str = "multinomial",
) -> SampledTensors:
    """N draws per row of (P, V) logits from ``log_softmax(logits / T)``, as unique ids + counts.

    ``keys`` (P,) are the rows' counter keys (see :func:`row_keys`); ``sampling`` as in
    :func:`uniforms`.
    """
    u = uniforms(keys, n, sampling)
    return unique_counts(sample_ids(log_probs(logits, temperature), u))


def chunk_rows(vocab_size: int, budget_elements: int = 1 << 27) -> int:
    """Rows of (rows, V) fp32 work per chunk, so the log-softmax temporaries stay bounded."""
    return max(1, budget_elements // vocab_size)


# --------------------------------------------------------------------------- assembly


def row_targets(
    logits: torch.Tensor,
    targets: TargetConfig,
    keys: torch.Tensor,
    positions: torch.Tensor,
    inplace: bool = False,
) -> RowTargets:
    """Targets of (R, V) logits, before draws are reduced to unique ids; ``keys``/``positions``
    (R,) seed the draws. ``inplace``: the logits are ours to overwrite."""
    spec = targets.spec
    if spec.kind == "sampled":
        u = uniforms(row_keys(keys, positions, STREAM_TARGETS), spec.n, spec.sampling)
        return SampleDraws(sample_ids(log_probs(logits, targets.temperature), u))
    u = None
    if spec.n:
        u = uniforms(row_keys(keys, positions, STREAM_TARGETS), spec.n, spec.sampling)
    return topk_targets(
        logits,
        spec.k,
        targets.temperature,
        inplace=inplace,
        tail_uniforms=u,
        k_mass=spec.k_mass,
        k_min=spec.min_k,
        n_rate=spec.n_rate,
        sampling=spec.sampling or "multinomial",
    )


def join_rows(parts: list[RowTargets], join: Callable[[list[torch.Tensor]], torch.Tensor]) -> Any:
    """One set of row targets from several of one kind: ``join`` combines each field's tensors."""
    first = parts[0]
    joined = {
        f.name: join([getattr(p, f.name) for p in parts])
        for f in fields(first)
        if getattr(first, f.name) is not None
    }
    return replace(first, **joined)


def assemble_targets(
    logits: torch.Tensor, targets: TargetConfig, keys: torch.Tensor, positions: torch.Tensor
) -> BatchTargets:
    """Targets of (P, V) logits, in row chunks; ``keys``/``positions`` (P,) seed the draws.

    What :meth:`~TopKTensors.split` cuts into examples. May overwrite ``logits`` (pass a copy
    to keep them)."""
    step = chunk_rows(logits.shape[-1])
    parts = []
    for i in range(0, max(len(logits), 1), step):
        sl = slice(i, i + step)
        parts.append(row_targets(logits[sl], targets, keys[sl], positions[sl], inplace=True))
    return join_rows(parts, torch.cat).reduced()


def stack_steps(steps: list[RowTargets], valid: torch.Tensor) -> BatchTargets:
    """Generation's per-step (B,) row targets → the (B, S) ``valid`` ones, example-major."""
    return join_rows(steps, lambda xs: torch.stack(xs, 1)[valid]).reduced()
