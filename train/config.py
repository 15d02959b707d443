"""The training config: frozen dataclasses grouped by concern, from YAML/JSON plus overrides.

Every field has a one-line docstring; the command line mirrors the fields as
``--section.field VALUE`` (and ``--set section.field=VALUE``), with those docstrings as help.
Unknown keys, wrong types and bad values are all reported at once, each naming the key, where
it came from (file and line, or flag), the value seen and the fix (cache/settings.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from logitcache.cache.errors import InputError
from logitcache.cache.settings import Source, build, file_sources, format_problems, sections


@dataclass(frozen=True)
class DataConfig:
    """What to train and evaluate on, and how it is streamed and batched."""

    train: str = ""
    """Training logit dataset: a folder or fsspec URL (required)."""
    eval: str | None = None
    """Held-out logit dataset for eval (KL, CE, top-1); none skips eval."""
    cache_dir: str | None = None
    """Local folder that keeps copies of remote shards (ignored for local datasets)."""
    verify: bool = False
    """Check each shard's sha256 before decoding it."""
    shuffle_buffer: int = 1024
    """Examples in each reader's shuffle buffer (bounds memory); 1 keeps the stored order."""
    batch_size: int = 8
    """Examples per micro-batch per rank; 0 to batch by data.max_tokens instead."""
    max_tokens: int = 0
    """Token budget per micro-batch (rows × longest row, padding included); 0 = off."""
    max_seq_len: int = 2048
    """Longest student sequence (prompt + response); longer responses are cut at the end."""
    num_workers: int = 0
    """DataLoader worker processes per rank; 0 reads in a background thread instead."""
    prefetch: int = 4
    """Micro-batches read ahead of the trainer per rank."""


@dataclass(frozen=True)
class ModelConfig:
    """The student."""

    path: str | None = None
    """Student folder for AutoModelForCausalLM.from_pretrained (or use model.config)."""
    config: str | None = None
    """config.json (or a folder holding one) for a freshly initialised student."""
    tokenizer: str | None = None
    """Tokenizer folder; defaults to model.path. Its fingerprint must match the dataset's."""
    gradient_checkpointing: bool = False
    """Recompute the student's layer activations in backward to save memory."""


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters (peft) instead of full fine-tuning; lm_head stays frozen (docs/TRAINING.md)."""

    r: int = 0
    """LoRA rank; 0 trains every weight (full fine-tuning). Needs pip install 'logitcache[lora]'."""
    alpha: float = 16.0
    """LoRA scaling numerator: the update is (alpha / r)·B·A."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    target_modules: str = "all-linear"
    """Comma-separated module names to adapt (e.g. q_proj,v_proj), or all-linear: every linear layer but lm_head."""
    modules_to_save: str = ""
    """Comma-separated modules trained in full and saved with the adapter (never lm_head)."""
    merge: bool = False
    """Also write final-merged/: the adapters merged into the base weights (plain transformers)."""
    load_in_4bit: bool = False
    """QLoRA: hold the frozen base weights in 4-bit NF4 (bitsandbytes, CUDA only; pip install 'logitcache[qlora]'); lm_head stays unquantized."""


@dataclass(frozen=True)
class LossConfig:
    """The distillation objective (see logitcache.train.losses)."""

    alpha: float = 1.0
    """Weight of the KD term: loss = alpha·KD + (1 − alpha)·CE on the response tokens."""
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    """forward_kl, reverse_kl or jsd (sampled targets: forward_kl only)."""
    beta: float = 0.5
    """JSD mixing weight in [0, 1]."""
    temperature: float = 1.0
    """KD temperature of the student (the KD term is scaled by its square); must equal the datasets' capture temperature."""
    allow_temperature_mismatch: bool = False
    """Train at a loss.temperature other than the datasets' capture temperature (refused otherwise)."""
    tail: Literal["auto", "draws", "bucket", "renorm"] = "auto"
    """Top-k tail: draws (stored tail draws; forward_kl), bucket (K+1 buckets), renorm, or auto (draws if stored, else bucket)."""
    chunk_size: int = 0
    """Loss positions per lm_head chunk (memory ∝ chunk_size × vocab); 0: about 2^25 logits."""


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay."""

    lr: float = 1e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of optim.lr."""
    warmup_steps: int = 0
    """Steps of linear warmup from 0 to optim.lr."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (per rank)."""


@dataclass(frozen=True)
class TrainConfig:
    """The run: where it writes, how long it runs, on what."""

    output: str = ""
    """Output folder: metrics, checkpoints, resolved config, final student (required)."""
    steps: int = 0
    """Optimizer steps; 0 derives them from train.epochs."""
    epochs: float = 1.0
    """Passes over the training set when train.steps is 0: each example exactly once per pass."""
    seed: int = 0
    """Seed of the data order and of a fresh student's initialisation."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto picks CUDA when available."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 autocast (weights stay fp32); auto = bf16 on CUDA, fp32 on CPU."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """With torchrun: ddp (a full copy per rank) or fsdp (FSDP2 shards weights and AdamW state; full fine-tuning only)."""
    stop_after: int = 0
    """Stop after this many steps as if interrupted (time-boxed jobs, tests); 0 = never; not saved with the run."""


@dataclass(frozen=True)
class LogConfig:
    """Metrics, eval, checkpoints and plots."""

    eval_every: int = 0
    """Evaluate every N steps (and at the start and end); 0 = only start and end."""
    eval_batches: int = 0
    """Micro-batches per eval; 0 = the whole eval set."""
    checkpoint_every: int = 0
    """Save a checkpoint every N steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    """Most recent checkpoints to keep."""
    plot: str | None = None
    """Write loss curves to this PNG at the end (needs matplotlib)."""
    tensorboard: bool = False
    """Also write TensorBoard event files to <train.output>/tensorboard (pip install 'logitcache[tensorboard]')."""
    progress: bool = True
    """Show a tqdm progress bar with tokens/s."""
    example_ids: bool = False
    """Also write examples-rank<R>.jsonl: the example ids of every step (audits the stream)."""


@dataclass(frozen=True)
class Config:
    """Everything `logitcache train` needs."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def dump(self, path: str | Path) -> None:
        """Write the resolved config as YAML (loadable with ``--config``)."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def validate(self) -> list[str]:
        """Every problem with values that are well typed but wrong together."""
        d, m, lo, o, t, lg = self.data, self.model, self.loss, self.optim, self.train, self.log
        p = []
        if not d.train:
            p.append("data.train is not set: pass --data.train PATH (a logit dataset folder/URL)")
        if not t.output:
            p.append("train.output is not set: pass --train.output DIR")
        if (m.path is None) == (m.config is None):
            p.append(
                f"set exactly one of model.path (a student folder) and model.config (a config for "
                f"a fresh student); got model.path={m.path!r}, model.config={m.config!r}"
            )
        if m.config is not None and m.tokenizer is None:
            p.append("model.config needs model.tokenizer (to check the dataset's fingerprint)")
        if (d.batch_size > 0) == (d.max_tokens > 0):
            p.append(
                f"set exactly one of data.batch_size and data.max_tokens to a positive number; "
                f"got {d.batch_size} and {d.max_tokens}"
            )
        for key, value, low in [
            ("data.shuffle_buffer", d.shuffle_buffer, 1),
            ("data.max_seq_len", d.max_seq_len, 2),
            ("data.prefetch", d.prefetch, 1),
            ("loss.chunk_size", lo.chunk_size, 0),
            ("optim.grad_accum", o.grad_accum, 1),
            ("log.keep_checkpoints", lg.keep_checkpoints, 1),
        ]:
            if value < low:
                p.append(f"{key}={value} must be ≥ {low}")
        for key, value in [
            ("data.batch_size", d.batch_size),
            ("data.max_tokens", d.max_tokens),
            ("data.num_workers", d.num_workers),
            ("train.steps", t.steps),
            ("train.stop_after", t.stop_after),
            ("optim.warmup_steps", o.warmup_steps),
            ("optim.weight_decay", o.weight_decay),
            ("optim.grad_clip", o.grad_clip),
            ("log.eval_every", lg.eval_every),
            ("log.eval_batches", lg.eval_batches),
            ("log.checkpoint_every", lg.checkpoint_every),
        ]:
            if value < 0:
                p.append(f"{key}={value} must be ≥ 0")
        if d.max_tokens and d.max_tokens < d.max_seq_len:
            p.append(
                f"data.max_tokens={d.max_tokens} is below data.max_seq_len={d.max_seq_len}: "
                "one longest sequence must fit in a batch; raise max_tokens or lower max_seq_len"
            )
        for key, value in [("loss.alpha", lo.alpha), ("loss.beta", lo.beta)]:
            if not 0.0 <= value <= 1.0:
                p.append(f"{key}={value} must be in [0, 1]")
        for key, value in [("loss.temperature", lo.temperature), ("optim.lr", o.lr)]:
            if not value > 0:
                p.append(f"{key}={value} must be > 0")
        if t.epochs <= 0 and t.steps == 0:
            p.append(f"train.epochs={t.epochs} must be > 0 (or set train.steps)")
        if not 0.0 <= o.min_lr_ratio <= 1.0:
            p.append(f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
        if self.lora.r < 0:
            p.append(f"lora.r={self.lora.r} must be ≥ 0 (0 = full fine-tuning)")
        if self.lora.r > 0 and m.path is None:
            p.append(
                "lora.r > 0 adapts a pretrained student: set model.path (model.config builds a "
                "fresh one whose base weights would not be saved anywhere)"
            )
        if t.parallel == "fsdp" and self.lora.r > 0:
            p.append(
                f"train.parallel=fsdp trains every weight; got lora.r={self.lora.r}: use "
                "train.parallel=ddp for LoRA, or lora.r=0 for full fine-tuning with FSDP"
            )
        if self.lora.load_in_4bit and self.lora.r == 0:
            p.append(
                "lora.load_in_4bit quantizes the frozen base weights under LoRA adapters "
                "(QLoRA): set lora.r (e.g. 16), or lora.load_in_4bit false"
            )
        if self.lora.load_in_4bit and t.device == "cpu":
            p.append(
                "lora.load_in_4bit needs a CUDA device (bitsandbytes' 4-bit kernels) but "
                "train.device=cpu: train on a GPU, or set lora.load_in_4bit false"
            )
        if not 0.0 <= self.lora.dropout < 1.0:
            p.append(f"lora.dropout={self.lora.dropout} must be in [0, 1)")
        if not self.lora.alpha > 0:
            p.append(f"lora.alpha={self.lora.alpha} must be > 0")
        if lo.tail in ("renorm", "draws") and lo.divergence != "forward_kl":
            p.append(f"loss.tail={lo.tail} needs loss.divergence=forward_kl, got {lo.divergence}")
        return p


SECTIONS: dict[str, type] = sections(Config)


def load_config(
    path: str | Path | None = None,
    overrides: list[tuple[str, str, str]] | None = None,
) -> Config:
    """Build the config from defaults, a YAML/JSON file, then ``(key, value, where)`` text
    overrides (``where`` is how the user typed it, e.g. ``--set`` or ``--optim.lr``).

    Raises InputError listing every problem.
    """
    sources = file_sources(path, Config) if path is not None else []
    sources += [Source(k, v, w, from_text=True) for k, v, w in overrides or []]
    cfg, problems = build(Config, sources, command="train", example="optim.lr", partial=True)
    if cfg is not None:  # the values' problems too, but none about a key already named mistyped
        mistyped = {s.key for s in sources if any(f"{s.key}=" in p for p in problems)}
        problems += [p for p in cfg.validate() if not any(key in p for key in mistyped)]
    if problems:
        raise InputError(format_problems(problems))
    return cfg
