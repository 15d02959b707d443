"""What the fidelity study compares: its variants (training signals), the settings every run
shares, and the row one measured run gives."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from logitcache.cache.codecs import Codec
from logitcache.cache.format import TargetSpec

Kind = Literal["online", "hard", "topk", "sampled"]
TailMode = Literal["bucket", "renorm", "draws"]


@dataclass(frozen=True)
class Variant:
    """One training signal of the study."""

    kind: Kind
    k: int = 0
    n: int = 0
    codec: Codec = "u8"
    tail: TailMode = "bucket"
    sampling: str = "multinomial"
    """How sampled targets were drawn (see cache.targets.uniforms)."""
    seed: int = 0
    """Data-order seed (train.seed); a second seed estimates run-to-run noise."""
    sample_seed: int = 0
    """Seed of the stored draws (as `logitcache build --seed`); other draws, same data."""
    k_mass: float | None = None
    """Adaptive top-k: the mass a position's kept ids reach (at most k of them); None: k."""
    k_min: int | None = None
    """Adaptive top-k: the fewest ids a position keeps."""
    n_rate: float | None = None
    """Tail draws by tail mass: min(n, round(n_rate · tail mass)) per position; None: n."""

    @property
    def config(self) -> Variant:
        """This variant with sample seed 0: what the runs at several sample seeds share."""
        return replace(self, sample_seed=0)

    @property
    def has_draws(self) -> bool:
        return self.kind == "sampled" or (self.kind == "topk" and self.n > 0)

    @property
    def name(self) -> str:
        codec = "" if self.codec == "u8" else f" {self.codec}"
        if self.kind == "topk" and (self.k_mass is not None or self.n_rate is not None):
            return self._adaptive_name()
        base = {
            "online": "online full KD",
            "hard": "hard labels (CE)",
            "topk": f"top-{self.k} + {self.n} tail draws{codec}"
            + (" systematic" if self.sampling == "systematic" else "")
            if self.n
            else f"top-{self.k} {self.tail} {self.codec}",
            "sampled": f"sampled n={self.n}"
            + (" systematic" if self.sampling == "systematic" else ""),
        }[self.kind]
        if self.sample_seed:
            base += f" [draws {self.sample_seed}]"
        return base if self.seed == 0 else f"{base} (seed {self.seed})"

    def _adaptive_name(self) -> str:
        """ "top-≤32 @0.9 + ≤32 tail draws @64/mass": the cap, the mass, the draws' rule."""
        head = f"top-{self.k}" if self.k_mass is None else f"top-≤{self.k} @{self.k_mass:g}"
        if self.k_mass is not None and (self.k_min or 1) > 1:
            head += f" ≥{self.k_min}"
        tail = f" {self.tail}" if not self.n else ""
        if self.n:
            rate = f" @{self.n_rate:g}/mass" if self.n_rate is not None else ""
            tail = f" + {'≤' if rate else ''}{self.n} tail draws{rate}"
            tail += " systematic" if self.sampling == "systematic" else ""
        base = head + tail + ("" if self.codec == "u8" else f" {self.codec}")
        if self.sample_seed:
            base += f" [draws {self.sample_seed}]"
        return base if self.seed == 0 else f"{base} (seed {self.seed})"

    @property
    def dataset(self) -> tuple[TargetSpec, int]:
        """The stored targets this variant trains on and their draws' seed (hard and online
        read the n=1 set for the data order only: hard labels weight its KD term 0, online
        ignores it)."""
        if self.kind == "topk":
            spec = TargetSpec(
                "topk",
                k=self.k,
                n=self.n,
                codec=self.codec,
                sampling=self.sampling,  # type: ignore[arg-type]
                k_mass=self.k_mass,
                k_min=self.k_min,
                n_rate=self.n_rate,
            ).stored()  # without draws, no scheme: one target set whatever the sampling
            return spec, self.sample_seed if self.n else 0
        if self.kind == "sampled":
            return TargetSpec("sampled", n=self.n, sampling=self.sampling), self.sample_seed
        return TargetSpec("sampled", n=1), 0


@dataclass(frozen=True)
class Settings:
    """Training settings shared by every variant."""

    steps: int
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 2
    context: int = 0
    """Leading tokens of each sequence that only the teacher sees (context distillation): the
    student reads the rest, the teacher the whole sequence."""


@dataclass
class Row:
    """One measured variant."""

    variant: Variant
    bytes_per_position: float | None
    """Shard bytes / positions of its training set; None when nothing is stored (online)."""
    kl: float
    ce: float
    top1: float
    step_s: float
    """Median seconds per optimizer step (the first step excluded)."""
    unique_ids: float | None = None
    """Mean distinct ids per position (sampled targets)."""
    mean_k: float | None = None
    """Mean top-k ids kept per position (adaptive top-k)."""


def default_variants(
    ks: list[int],
    draws: list[int],
    codecs: list[Codec],
    codec_k: int,
    noise_seeds: list[int],
    tails: tuple[TailMode, ...] = ("bucket", "renorm"),
    samplings: tuple[str, ...] = ("multinomial",),
    hard: bool = True,
    seed: int = 0,
    tail_draws: tuple[tuple[int, int], ...] = (),
    sample_seeds: tuple[int, ...] = (0,),
    adaptive: tuple[tuple[float, int, int, float, int], ...] = (),
) -> list[Variant]:
    """Online (the reference) and hard first, then top-k × tail (u8), the other codecs at
    ``codec_k``, top-k + tail draws (k, n), adaptive targets (k_mass, k, n, n_rate, k_min;
    0 for a fixed k or n), sampled N, all at data-order ``seed``, those with
    draws once per sample seed; then online at each noise seed."""
    out = [Variant("online")] + ([Variant("hard")] if hard else [])
    out += [Variant("topk", k=k, tail=t) for k in ks for t in tails]
    out += [Variant("topk", k=codec_k, codec=c) for c in codecs if c != "u8"]
    out += [
        Variant("topk", k=k, n=n, tail="draws", sampling=m)
        for m in samplings
        for k, n in tail_draws
    ]
    out += [
        Variant(
            "topk",
            k=k,
            n=n,
            tail="draws" if n else "bucket",
            sampling=m,
            k_mass=mass if mass > 0 else None,
            k_min=k_min if mass > 0 else None,
            n_rate=rate if rate > 0 and n else None,
        )
        for m in samplings
        for mass, k, n, rate, k_min in adaptive
    ]
    out += [Variant("sampled", n=n, sampling=m) for m in samplings for n in draws]
    out = [
        replace(v, seed=seed, sample_seed=d)
        for v in out
        for d in (sample_seeds if v.has_draws else (0,))
    ]
    return out + [Variant("online", seed=s) for s in noise_seeds]
