"""The logit-dataset format: schema, names, and what one example holds.

This module owns the contract that docs/FORMAT.md describes. A dataset is a folder holding
``manifest.json`` and Arrow IPC *file*-format shards with zstd buffer compression, one row per
example. Keep the two in step: a change here is a change of FORMAT.md (and maybe the version).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from .codecs import CODECS, Codec, id_bytes_for_vocab, order_within_segments, storage_dtype
from .errors import ManifestError

FORMAT_NAME = "logitcache"
FORMAT_VERSION = 3
"""The version this module writes; it reads every version in :data:`READ_VERSIONS`. Version 2
let positions hold a variable number of ids or draws (:attr:`TargetSpec.variable`); version 3
stores ids as their rank in a table that each shard carries (:data:`RANK_TABLE_KEYS`). A reader
of an older version would misread either, so each was a new version."""
READ_VERSIONS: tuple[int, ...] = (1, 2, 3)
MANIFEST_NAME = "manifest.json"
PARTS_DIR = "_parts"
SHARD_SUFFIX = ".arrow"
# A shard file name is a plain name inside the dataset folder: no separators, no "..".
SHARD_NAME_RE = re.compile(r"^shard-[A-Za-z0-9_]+-\d{6}\.arrow$")
WRITER_ID_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")
META_PREFIX = "logitcache."
RANK_TABLE_KEYS = {"topk": f"{META_PREFIX}topk_id_ranks", "sample": f"{META_PREFIX}sample_id_ranks"}
"""Schema-metadata key of a shard's rank table for its top-k ids and its drawn ids (version 3;
absent: the ids are stored as themselves, as in versions 1 and 2)."""
MAX_SAMPLE_DRAWS = 255  # counts and unique-id counts are stored as uint8

TargetKind = Literal["topk", "sampled"]
Sampling = Literal["systematic", "multinomial"]
SAMPLINGS: tuple[str, ...] = ("systematic", "multinomial")


@dataclass(frozen=True)
class TargetSpec:
    """What the teacher's per-position targets are and how they are stored.

    The one description of targets: the manifest's ``targets`` (as :meth:`stored`), and the
    ``targets`` flags of `logitcache build` (cache/capture_config.py wraps it, as given)."""

    kind: TargetKind
    """topk: the k most likely ids with their log-probs and the tail mass, plus n draws from the
    tail (n > 0); sampled: n draws from the whole distribution."""
    k: int = 0
    """Ids per position for top-k targets (unused for sampled targets)."""
    n: int = 0
    """Draws per position (≤ 255): for top-k targets from the teacher's distribution outside
    the top k (0: none, the tail is only its mass; top-k plus tail draws is an unbiased
    estimate of the full distribution whose only noise is in the tail); for sampled targets
    from the whole distribution."""
    codec: Codec = "u8"
    """Storage of top-k log-probs and the tail mass: f32, f16, u8 or u16 (see docs/FORMAT.md;
    unused for sampled targets)."""
    sampling: Sampling | None = "multinomial"
    """How the n draws are made: systematic (one uniform per position, n evenly spaced points on
    the CDF: counts within 1 of n·p for every id, lower variance) or multinomial (independent);
    both give unbiased counts. Without draws it means nothing and the manifest has none."""
    k_mass: float | None = None
    """Adaptive top-k: a position keeps the fewest of its most likely ids whose probabilities
    sum to at least this mass (0 < mass ≤ 1), then at least --k-min and at most --k ids; unset:
    every position keeps k. Near-certain positions then store one or two ids."""
    k_min: int | None = None
    """With --k-mass: the fewest ids a position keeps (default 1)."""
    n_rate: float | None = None
    """Tail draws by tail mass: a position whose tail holds mass m gets min(n, round(rate·m))
    draws, so a near-certain position gets none (its tail mass is then left out of the draws'
    estimate); unset: every position gets n. Draws proportional to the tail mass are the
    allocation that minimises the estimator's variance for a total budget (docs/FORMAT.md)."""

    @property
    def has_draws(self) -> bool:
        """Whether shards hold the sample columns: sampled targets, or top-k with tail draws."""
        return self.kind == "sampled" or self.n > 0

    @property
    def tail_draws(self) -> bool:
        """Whether these are top-k targets that also store draws from the tail."""
        return self.kind == "topk" and self.n > 0

    @property
    def adaptive_k(self) -> bool:
        """Whether positions keep a variable number of top-k ids (``k_mass`` is set)."""
        return self.kind == "topk" and self.k_mass is not None

    @property
    def variable(self) -> bool:
        """Whether positions hold a variable number of top-k ids or of tail draws: such a
        dataset needs format version 2 or later (a version-1 reader would misread it)."""
        return self.adaptive_k or (self.tail_draws and self.n_rate is not None)

    @property
    def min_k(self) -> int:
        """The fewest top-k ids a position holds: ``k_min`` (default 1) when adaptive, else k."""
        return (self.k_min or 1) if self.adaptive_k else self.k

    @property
    def label(self) -> str:
        """Short human name: "top-16 u8", "top-16 u8 + 16 tail draws", "sampled n=16",
        "top-≤32 @0.9 u8 + ≤32 tail draws @64/mass"."""
        if self.kind == "sampled":
            return f"sampled n={self.n}" + (" systematic" if self.sampling == "systematic" else "")
        rate = f" @{self.n_rate:g}/mass" if self.n_rate is not None else ""
        tail = f" + {'≤' if rate else ''}{self.n} tail draws{rate}" if self.n else ""
        head = f"≤{self.k} @{self.k_mass:g}" if self.adaptive_k else str(self.k)
        return f"top-{head} {self.codec}{tail}"

    @property
    def in_words(self) -> str:
        """What a position holds, in words (`logitcache inspect`, the dataset card)."""
        if self.kind == "sampled":
            return f"{self.n} {self.sampling} sampled draws per position (ids + counts)"
        n = f"min({self.n}, round({self.n_rate:g}·tail mass))" if self.n_rate else str(self.n)
        tail = f" + {n} {self.sampling} draws from the tail (ids + counts)" if self.n else ""
        head = f"top-{self.k}"
        if self.adaptive_k:
            head = (
                f"top-k (k = {self.min_k} to {self.k}: the fewest holding {self.k_mass:g} of the "
                "mass)"
            )
        return f"{head} ids + log-probs ({self.codec}) + tail mass{tail}"

    def stored(self) -> TargetSpec:
        """This spec as a dataset records it: without draws, no sampling scheme (None, and no
        "sampling" key in the manifest), so that two top-k datasets without draws compare
        equal whatever ``--sampling`` said. Manifests written before said "multinomial" there;
        they read as None too. An unknown word is kept, for :meth:`validate` to name. Sampled
        targets have no top-k: k = 0 whatever was asked for."""
        spec = replace(self, k=0) if self.kind == "sampled" else self
        if spec.kind == "sampled":  # no top-k: no adaptive head, and draws are always n
            spec = replace(spec, k_mass=None, k_min=None, n_rate=None)
        if spec.adaptive_k and spec.k_min is None:
            spec = replace(spec, k_min=1)
        if not spec.has_draws and spec.sampling in SAMPLINGS:
            return replace(spec, sampling=None, n_rate=None)
        return spec

    def validate(self, names: Mapping[str, str] | None = None) -> list[str]:
        """Every problem, each naming the field as the user wrote it, the value and the fix.

        ``names`` spells fields as the user typed them (`logitcache build`: ``{"k": "--k"}``
        ...); a field it leaves out is ``targets.<field>``, as in the manifest."""
        name = {f: f"targets.{f}" for f in asdict(self)} | dict(names or {})
        problems = []
        if self.kind not in ("topk", "sampled"):
            problems.append(f"{name['kind']} is {self.kind!r}; expected topk or sampled")
        if self.kind == "topk" and self.k < 1:
            problems.append(f"{name['k']} is {self.k}; top-k targets need k ≥ 1")
        if self.kind == "sampled" and not 1 <= self.n <= MAX_SAMPLE_DRAWS:
            problems.append(
                f"{name['n']} is {self.n}; sampled targets need 1 ≤ n ≤ {MAX_SAMPLE_DRAWS}"
            )
        if self.kind == "topk" and not 0 <= self.n <= MAX_SAMPLE_DRAWS:
            problems.append(
                f"{name['n']} is {self.n}; top-k tail draws need 0 ≤ n ≤ {MAX_SAMPLE_DRAWS} "
                "(0: none)"
            )
        if self.codec not in CODECS:
            problems.append(
                f"{name['codec']} is {self.codec!r}; expected one of {', '.join(CODECS)}"
            )
        if self.sampling not in SAMPLINGS and (self.has_draws or self.sampling is not None):
            problems.append(
                f"{name['sampling']} is {self.sampling!r}; expected one of {', '.join(SAMPLINGS)}"
            )
        return problems + self._adaptive_problems(name)

    def _adaptive_problems(self, name: Mapping[str, str]) -> list[str]:
        """Problems with k_mass, k_min and n_rate, each naming the flag and the fix."""
        problems = []
        if self.k_mass is not None and not (
            isinstance(self.k_mass, int | float) and 0 < self.k_mass <= 1
        ):
            problems.append(
                f"{name['k_mass']} is {self.k_mass!r}; expected a probability mass "
                "0 < mass ≤ 1 (e.g. 0.9), or leave it out for a fixed k"
            )
        if self.k_min is not None:
            if self.k_mass is None and self.kind == "topk":
                problems.append(
                    f"{name['k_min']} is {self.k_min} but {name['k_mass']} is not set; the floor "
                    f"applies to adaptive top-k only: add {name['k_mass']} (e.g. 0.9) or drop "
                    f"{name['k_min']}"
                )
            elif self.kind == "topk" and not 1 <= self.k_min <= max(self.k, 1):
                problems.append(
                    f"{name['k_min']} is {self.k_min}; expected 1 ≤ {name['k_min']} ≤ "
                    f"{name['k']} ({self.k})"
                )
        if self.n_rate is not None:
            if not (isinstance(self.n_rate, int | float) and 0 < self.n_rate < math.inf):
                problems.append(
                    f"{name['n_rate']} is {self.n_rate!r}; expected a finite number of draws per "
                    f"unit of tail mass > 0 (e.g. 64), or leave it out for {name['n']} draws at "
                    "every position"
                )
            elif self.kind == "topk" and self.n == 0:
                problems.append(
                    f"{name['n_rate']} is {self.n_rate} but {name['n']} is 0 (no tail draws); "
                    f"{name['n']} caps the draws of a position: set it (e.g. {name['n']} 32) or "
                    f"drop {name['n_rate']}"
                )
        for field_name in ("k_mass", "k_min", "n_rate"):
            if self.kind == "sampled" and getattr(self, field_name) is not None:
                problems.append(
                    f"{name[field_name]} applies to top-k targets only, not to sampled ones; "
                    f"drop it or use {name['kind']} topk"
                )
        return problems


@dataclass(frozen=True)
class DatasetInfo:
    """Everything that describes a dataset except its shards: what writers must agree on."""

    vocab_size: int
    """Size of the teacher's (= student's) vocabulary; every token id is below it."""
    tokenizer_fingerprint: str
    """sha256 over the tokenizer's vocab, merges and special tokens (see cache.tokenizer)."""
    targets: TargetSpec
    """Kind and encoding of the per-position targets."""
    teacher: dict[str, Any] = field(default_factory=dict)
    """name_or_path, revision and config_hash of the teacher."""
    capture: dict[str, Any] = field(default_factory=dict)
    """temperature, mode, templates (teacher and student views) and other capture settings."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", self.targets.stored())

    @property
    def id_bytes(self) -> int:
        return id_bytes_for_vocab(self.vocab_size)

    @property
    def token_type(self) -> pa.DataType:
        """Arrow type of prompt and response token ids: the narrowest that holds the vocab."""
        return pa.uint16() if self.vocab_size <= 1 << 16 else pa.uint32()

    def to_json(self) -> dict[str, Any]:
        return {
            "tokenizer": {
                "fingerprint": self.tokenizer_fingerprint,
                "vocab_size": self.vocab_size,
            },
            # No draws, no scheme: "sampling" is left out, so that readers that predate this
            # rule (which default it to "multinomial") still read the manifest.
            "targets": {
                **{k: v for k, v in asdict(self.targets).items() if v is not None},
                "id_bytes": self.id_bytes,
            },
            "teacher": self.teacher,
            "capture": self.capture,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> DatasetInfo:
        try:
            tok = obj["tokenizer"]
            tgt = dict(obj["targets"])
            tgt.pop("id_bytes", None)
            info = cls(
                vocab_size=int(tok["vocab_size"]),
                tokenizer_fingerprint=str(tok["fingerprint"]),
                targets=TargetSpec(**tgt),
                teacher=dict(obj.get("teacher", {})),
                capture=dict(obj.get("capture", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(
                f"{where}: missing or malformed field ({type(e).__name__}: {e}); "
                "the file was not written by logitcache format 1 or was edited by hand"
            ) from None
        problems = info.targets.validate()
        if info.vocab_size < 1:
            problems.append(f"tokenizer.vocab_size is {info.vocab_size}; expected ≥ 1")
        if problems:
            raise ManifestError(f"{where}: " + "; ".join(problems))
        return info

    def schema(self) -> pa.Schema:
        """The Arrow schema of every shard of this dataset, with self-describing metadata."""
        return shard_schema(self)


def counted(n: int, noun: str) -> str:
    """'1 shard', '3 shards': ``n`` and ``noun``, plural unless ``n`` is 1."""
    return f"{n} {noun}{'s' * (n != 1)}"


def sizes(shards: int, examples: int, positions: int) -> str:
    """'1 shard, 24 examples, 708 positions': a dataset's size as the commands print it."""
    return ", ".join(
        counted(n, noun)
        for n, noun in ((shards, "shard"), (examples, "example"), (positions, "position"))
    )


def min_format_version(targets: TargetSpec) -> int:
    """The oldest format version that can hold ``targets``: 2 when positions hold a variable
    number of ids or draws (a reader of version 1 would take every position to hold k ids and
    n draws, and misread them), else 1."""
    return 2 if targets.variable else 1


def id_plane_names(prefix: str, id_bytes: int) -> list[str]:
    return [f"{prefix}_id_b{b}" for b in range(id_bytes)]


def shard_schema(info: DatasetInfo) -> pa.Schema:
    tok = info.token_type
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt_ids", pa.list_(tok), nullable=False),
        pa.field("response_ids", pa.list_(tok), nullable=False),
    ]
    t = info.targets
    if t.kind == "topk":
        fields += [
            pa.field(n, pa.list_(pa.uint8()), nullable=False)
            for n in id_plane_names("topk", info.id_bytes)
        ]
        val = pa.from_numpy_dtype(storage_dtype(t.codec))
        fields += [
            pa.field("topk_logprobs", pa.list_(val), nullable=False),
            pa.field("tail_logmass", pa.list_(val), nullable=False),
        ]
        if t.adaptive_k:  # version 2: ids per position
            fields.append(pa.field("topk_count", pa.list_(pa.uint16()), nullable=False))
    if t.has_draws:
        fields += [
            pa.field(n, pa.list_(pa.uint8()), nullable=False)
            for n in id_plane_names("sample", info.id_bytes)
        ]
        fields += [
            pa.field("sample_counts", pa.list_(pa.uint8()), nullable=False),
            pa.field("sample_nunique", pa.list_(pa.uint8()), nullable=False),
        ]
    meta = {
        f"{META_PREFIX}format": FORMAT_NAME,
        f"{META_PREFIX}format_version": str(FORMAT_VERSION),
        f"{META_PREFIX}info": json.dumps(info.to_json(), sort_keys=True),
    }
    return pa.schema(fields, metadata=meta)


def shard_name(writer_id: str, seq: int) -> str:
    return f"shard-{writer_id}-{seq:06d}{SHARD_SUFFIX}"


def check_shard_name(name: str, where: str) -> str:
    """Refuse a shard name that could point outside the dataset folder."""
    if not isinstance(name, str) or not SHARD_NAME_RE.match(name):
        raise ManifestError(
            f"{where}: shard file name {name!r} is not a plain shard name "
            "(expected 'shard-<writer>-<6 digits>.arrow' inside the dataset folder); "
            "a manifest may not point outside its folder"
        )
    return name


@dataclass
class TopK:
    """Top-k targets of one example: P response positions, k ids each (adaptive top-k:
    ``counts[p]`` ≤ k ids at position p, the rest of its row padding)."""

    ids: np.ndarray
    """(P, k) int token ids (any order; adaptive: the kept ids first, padding after them)."""
    logprobs: np.ndarray
    """(P, k) float log-probs under the teacher's full-vocabulary softmax; -inf on padding."""
    tail_logmass: np.ndarray
    """(P,) float log(1 − Σ exp(logprobs)); -inf when the top-k hold all the mass."""
    tail_draws: Sampled | None = None
    """Draws from the teacher's distribution outside the top k (datasets with targets.n > 0):
    each drawn id weighs exp(tail_logmass) · count / n_p, n_p being the position's draws
    (the sum of its counts: n, or fewer with targets.n_rate). A position whose tail mass is
    zero, or that got no draws, has none."""
    counts: np.ndarray | None = None
    """(P,) int ids kept per position (adaptive top-k, targets.k_mass set); None: k each."""

    def by_id(self) -> TopK:
        """The same targets with each position's ids ascending (padding still last): one order
        for comparing targets read from shards whose ids are stored in another (version 3
        stores them by their rank in the shard)."""
        ids = np.asarray(self.ids)
        key = ids
        if self.counts is not None:
            kept = np.arange(ids.shape[1]) < np.asarray(self.counts)[:, None]
            key = np.where(kept, ids.astype(np.int64), np.iinfo(np.int64).max)  # padding last
        order = np.argsort(key, axis=1, kind="stable")
        return TopK(
            np.take_along_axis(ids, order, 1),
            np.take_along_axis(np.asarray(self.logprobs), order, 1),
            self.tail_logmass,
            None if self.tail_draws is None else self.tail_draws.by_id(),
            self.counts,
        )


@dataclass
class Sampled:
    """Sampled targets of one example: for each position, unique drawn ids with counts."""

    ids: np.ndarray
    """(U,) int ids: each position's ascending as written, or in the order a shard stores
    them when read (:meth:`by_id` sorts them)."""
    counts: np.ndarray
    """(U,) int draws of each id; each position's counts sum to N."""
    nunique: np.ndarray
    """(P,) int unique ids per position; sums to U."""

    def by_id(self) -> Sampled:
        """The same draws with each position's ids ascending (see :meth:`TopK.by_id`)."""
        ids = np.asarray(self.ids)
        order = order_within_segments(ids, self.nunique)
        return Sampled(ids[order], np.asarray(self.counts)[order], self.nunique)


@dataclass
class Example:
    """One row: a student prompt, a response, and the teacher's targets per response token.

    Target j is the teacher's distribution for response_ids[j], given its own full view and
    response_ids[:j]; the student learns it from prompt_ids + response_ids[:j].
    """

    id: str
    prompt_ids: np.ndarray
    response_ids: np.ndarray
    targets: TopK | Sampled

    @property
    def num_positions(self) -> int:
        return len(self.response_ids)

    def by_id(self) -> Example:
        """This example with each position's target ids ascending (:meth:`TopK.by_id`)."""
        return replace(self, targets=self.targets.by_id())
