"""The training config: frozen dataclasses grouped by concern, from YAML/JSON plus overrides.

Every field has a one-line docstring; the command line mirrors the fields as
``--section.field VALUE`` (and ``--set section.field=VALUE``), with those docstrings as help.
Unknown keys, wrong types and bad values are all reported at once, each naming the key, where
it came from (file and line, or flag), the value seen and the fix.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import json
import textwrap
import types
import typing
from dataclasses import dataclass, field, fields, replace
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml

from logitcache.cache.errors import InputError
from logitcache.cache.format import TargetSpec


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

    @property
    def topk_tail(self) -> str:
        """What the losses take for top-k targets: renorm or bucket (with draws, the targets
        reach them as sampled targets, and held-out top-k sets are scored on the bucket)."""
        return "renorm" if self.tail == "renorm" else "bucket"

    def tail_for(self, targets: TargetSpec, url: str) -> str:
        """The tail mode training on ``targets`` (the dataset at ``url``) uses: ``auto``
        resolved; ``draws`` refused, naming the dataset, when it holds no tail draws."""
        has_draws = targets.kind == "topk" and targets.n > 0
        if self.tail == "auto":
            return "draws" if has_draws and self.divergence == "forward_kl" else "bucket"
        if self.tail == "draws" and not has_draws:
            raise InputError(
                f"loss.tail=draws, but {url} holds {targets.label} targets without tail draws; "
                "capture with `logitcache build --k K --n N` for tail draws, or set "
                "loss.tail=auto"
            )
        return self.tail


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
    progress: bool = True
    """Show a tqdm progress bar with tokens/s."""
    example_ids: bool = False
    """Also write examples-rank<R>.jsonl: the example ids of every step (audits the stream)."""


@dataclass(frozen=True)
class Config:
    """Everything `logitcache train` needs."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
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
        if lo.tail in ("renorm", "draws") and lo.divergence != "forward_kl":
            p.append(f"loss.tail={lo.tail} needs loss.divergence=forward_kl, got {lo.divergence}")
        return p


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "log": LogConfig,
}


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's one-line docstring (the string literal right after it in the class body)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in fields(cls)]


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    args = typing.get_args(tp)
    if type(None) in args:
        return " | ".join(_describe(a) for a in args if a is not type(None)) + " | null"
    return getattr(tp, "__name__", str(tp))


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def coerce(tp: Any, value: Any, *, from_text: bool) -> Any:
    """``value`` as type ``tp``; raises ValueError naming the expected type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"expected one of {_describe(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (from_text and value in ("none", "null"))):
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(inner[0], value, from_text=from_text)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
        raise ValueError("expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError("expected an integer")
        if isinstance(value, int):
            return value
        if from_text:
            try:
                return int(str(value))
            except ValueError:
                pass
        raise ValueError("expected an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        if isinstance(value, int | float):
            return float(value)
        if from_text:
            try:
                return float(str(value))
            except ValueError:
                pass
        raise ValueError("expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ValueError("expected a string")
    raise AssertionError(f"unsupported config type {tp}")


@dataclass
class _Source:
    """One value to apply: the dotted key, the value, where it came from."""

    key: str
    value: Any
    where: str
    from_text: bool


def _file_values(path: Path) -> list[_Source]:
    """``section.field`` values of a YAML/JSON file, each with its line number."""
    try:
        text = path.read_text()
    except OSError as e:
        raise InputError(
            f"--config {path}: cannot read it ({e.strerror}); check the path"
        ) from None
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        raise InputError(f"--config {path}: not valid YAML/JSON: {e}") from None
    if root is None:
        return []
    constructor = yaml.constructor.SafeConstructor()
    out: list[_Source] = []
    problems: list[str] = []
    if not isinstance(root, yaml.MappingNode):
        raise InputError(f"--config {path}: expected a mapping of sections ({', '.join(SECTIONS)})")
    for k_node, v_node in root.value:
        section, line = str(k_node.value), k_node.start_mark.line + 1
        if not isinstance(v_node, yaml.MappingNode):
            problems.append(f"{path}:{line}: {section} must be a mapping of fields")
            continue
        for fk, fv in v_node.value:
            out.append(
                _Source(
                    f"{section}.{fk.value}",
                    constructor.construct_object(fv, deep=True),
                    f"{path}:{fk.start_mark.line + 1}",
                    from_text=False,
                )
            )
        if not v_node.value:
            out.append(_Source(section, None, f"{path}:{line}", from_text=False))
    if problems:
        raise InputError("\n".join(problems))
    return out


def load_config(
    path: str | Path | None = None,
    overrides: list[tuple[str, str, str]] | None = None,
) -> Config:
    """Build the config from defaults, a YAML/JSON file, then ``(key, value, where)`` text
    overrides (``where`` is how the user typed it, e.g. ``--set`` or ``--optim.lr``).

    Raises InputError listing every problem.
    """
    sources = _file_values(Path(path)) if path is not None else []
    sources += [_Source(k, v, w, from_text=True) for k, v, w in overrides or []]
    values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    problems = []
    for src in sources:
        section, _, name = src.key.partition(".")
        if section in SECTIONS and not name and src.value is None:
            continue  # an empty section in a file
        cls = SECTIONS.get(section)
        if cls is None or name not in {f.name for f in fields(cls)}:
            problems.append(_unknown(src))
            continue
        tp = _field_type(cls, name)
        try:
            values[section][name] = coerce(tp, src.value, from_text=src.from_text)
        except ValueError as e:
            problems.append(f"{src.where}: {src.key}={src.value!r}: {e}")
    cfg = Config()
    if not problems:
        cfg = Config(**{s: replace(getattr(cfg, s), **v) for s, v in values.items()})
        problems = cfg.validate()
    if problems:
        raise InputError(_format(problems))
    return cfg


def _unknown(src: _Source) -> str:
    section, _, _ = src.key.partition(".")
    if section in SECTIONS:
        valid = ", ".join(f.name for f in fields(SECTIONS[section]))
        return f"{src.where}: unknown key {src.key!r}; valid keys of {section}: {valid}"
    return (
        f"{src.where}: unknown key {src.key!r}; keys are section.field with sections "
        f"{', '.join(SECTIONS)} (e.g. optim.lr); run `logitcache train --help` for all"
    )


def _format(problems: list[str]) -> str:
    if len(problems) == 1:
        return f"invalid config: {problems[0]}"
    return f"invalid config ({len(problems)} problems):\n  - " + "\n  - ".join(problems)


def describe_field(section: str, name: str) -> str:
    """Help text for ``--section.name``: its docstring, type and default."""
    cls = SECTIONS[section]
    default = getattr(cls(), name)
    tp = _describe(_field_type(cls, name))
    return f"{field_docs(cls).get(name, '')} [{tp}; default {json.dumps(default)}]"
