"""The student side of training: processes, tokenizer, model, and the loss module.

The student can refuse a run before a single step: one whose lm_head does not cover a
dataset's vocabulary, or whose logits are not ``lm_head(hidden)`` (soft-capping, scaling), which
the chunked loss assumes. (The tokenizer and the other settings are checked against the datasets
in :mod:`logitcache.train.compat`.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from logitcache.cache.errors import InputError
from logitcache.cache.format import DatasetInfo
from logitcache.cache.ranks import Ranks as Dist
from logitcache.cache.tokenizer import load_local_tokenizer  # training calls its ranks helper Dist

from .adapters import MERGED_NAME
from .chunked import chunked_distill_loss
from .config import Config
from .loss_inputs import Targets
from .loss_plan import LossPlan

# Set on a student's config when its logits are not just `hidden @ lm_head.T (+ bias)`.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier",
)


def setup_dist(cfg: Config) -> Dist:
    """Read torchrun's environment; init the process group when there are several ranks."""
    ranks = Dist.from_env()
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise InputError("train.device=cuda but torch sees no CUDA device; use train.device=cpu")
    cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{ranks.local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return ranks.start(device)


def model_folder_problem(path: str, name: str) -> str | None:
    """Why ``path`` is not a student folder that loads offline, or None: missing, holding
    neither config.json (a model) nor adapter_config.json (a LoRA run's final/), or an adapter
    whose base model (its ``base_model_name_or_path``) is no folder here. Students are read from
    local folders only, as ``logitcache build`` reads teachers: a Hub id is never downloaded.
    ``name`` is the path as the user typed it (``model.path='x'``, ``--student x``)."""
    folder = Path(path)
    fix = (
        "pass a folder saved with save_pretrained (e.g. a training run's <train.output>/final); "
        "students are loaded from local folders only, never downloaded"
    )
    if not folder.is_dir():
        return f"{name}: no such folder; {fix}"
    adapter = folder / "adapter_config.json"
    if not adapter.is_file():
        if not (folder / "config.json").is_file():
            return f"{name}: no config.json (or adapter_config.json) in the folder; {fix}"
        return None
    try:
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as e:
        return f"{name}: {adapter} is not a JSON object ({e}); save the adapter again"
    if isinstance(base, str) and Path(base).is_dir():
        return None
    relative = isinstance(base, str) and not Path(base).is_absolute()
    where = f" (read from the current folder, {Path.cwd()})" if relative else ""
    merged = folder.parent / MERGED_NAME
    return (
        f"{name} is a LoRA adapter whose base model {base!r} (base_model_name_or_path in "
        f"{adapter}) is no folder here{where}; set base_model_name_or_path there to the base "
        "model's folder (an absolute path loads from anywhere)"
        + (f", or pass {merged}, the adapters merged into the base" if merged.is_dir() else "")
    )


def student_problems(cfg: Config) -> list[str]:
    """Every problem with the student's paths (model.path, model.tokenizer, model.config),
    found before anything loads: each must be a local folder (or model.config a file)."""
    m = cfg.model
    problems = []
    if m.path is not None and (problem := model_folder_problem(m.path, f"model.path={m.path!r}")):
        problems.append(problem)
    if m.tokenizer is not None and not Path(m.tokenizer).is_dir():
        problems.append(
            f"model.tokenizer={m.tokenizer!r}: no such folder; point it at the student's "
            "tokenizer folder (one saved with tokenizer.save_pretrained)"
        )
    if m.config is not None:
        config = Path(m.config)
        if not (config.is_file() or (config / "config.json").is_file()):
            problems.append(
                f"model.config={m.config!r}: no such file (nor a folder holding config.json); "
                "point it at a student's config.json"
            )
    return problems


def load_tokenizer(cfg: Config, name: str | None = None) -> Any:
    """The student's tokenizer: model.tokenizer, else model.path's. ``name``: how an error
    names the folder (eval: ``--student DIR``); default the config key."""
    path = cfg.model.tokenizer or cfg.model.path
    if name is not None:
        fix = "save the student's tokenizer into the folder (tokenizer.save_pretrained)"
    else:
        key = "model.tokenizer" if cfg.model.tokenizer else "model.path"
        name, fix = f"{key}={path!r}", "point model.tokenizer at the student's tokenizer folder"
    return load_local_tokenizer(path, name, fix)


def load_student(
    cfg: Config,
    info: DatasetInfo,
    eval_info: DatasetInfo | None = None,
    *,
    frozen_dtype: torch.dtype = torch.float32,
    on_meta: bool = False,
    name: str | None = None,
) -> torch.nn.Module:
    """The student for training on ``info``'s dataset (and scoring ``eval_info``'s), refused
    when its lm_head does not cover either vocabulary or its logits are not lm_head(hidden);
    wrapped with LoRA adapters when ``lora.r > 0``, its frozen base weights in
    ``frozen_dtype`` (the adapters stay fp32: peft's ``autocast_adapter_dtype``).
    ``on_meta``: built from the config on the meta device (shapes, no memory), for an FSDP rank
    that receives its shards from rank 0. ``name``: how an error names model.path (eval:
    ``--student DIR``). Nothing is downloaded: :func:`student_problems` checks the paths first."""
    from transformers import AutoConfig, AutoModelForCausalLM

    m = cfg.model
    try:
        if m.path is not None and cfg.lora.load_in_4bit:
            from .adapters import load_4bit

            model = load_4bit(m.path, gradient_checkpointing=m.gradient_checkpointing)
        elif on_meta:
            config = AutoConfig.from_pretrained(
                m.path if m.path is not None else m.config, local_files_only=True
            )
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        elif m.path is not None:
            dtype = frozen_dtype if cfg.lora.r > 0 else torch.float32
            model = AutoModelForCausalLM.from_pretrained(m.path, dtype=dtype, local_files_only=True)
        else:
            config = AutoConfig.from_pretrained(m.config, local_files_only=True)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.train.seed)
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (OSError, ValueError) as e:
        if name is None:
            key, value = (
                ("model.path", m.path) if m.path is not None else ("model.config", m.config)
            )
            name = f"{key}={value!r}"
        raise InputError(f"{name}: cannot build the student ({e})") from None
    problems = []
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        problems.append("the student has no output embeddings (lm_head) to distil into")
    else:
        for key, ds in (("data.train", info), ("data.eval", eval_info)):
            if ds is not None and head.weight.shape[0] < ds.vocab_size:
                problems.append(
                    f"the student's lm_head has {head.weight.shape[0]} rows but {key}="
                    f"{getattr(cfg.data, key[5:])!r} has vocab {ds.vocab_size} (tokenizer."
                    "vocab_size in its manifest.json); the student must cover every teacher id"
                )
    for attr in _LOGIT_TRANSFORMS:
        value = getattr(model.config, attr, None)
        if value not in (None, 1, 1.0):
            problems.append(
                f"the student's config sets {attr}={value}: its logits are not lm_head(hidden), "
                "which the chunked loss assumes; this architecture is not supported yet"
            )
    if problems:
        where = name or f"student {m.path or m.config}"
        raise InputError(f"{where}: " + "; ".join(problems))
    model.config.use_cache = False
    if m.gradient_checkpointing and not cfg.lora.load_in_4bit:  # 4-bit: load_4bit did it
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if cfg.lora.r > 0:
        from .adapters import apply_lora

        # The base weights freeze; only the adapters train (the lm_head never: adapters.py).
        model = apply_lora(model, cfg.lora, seed=cfg.train.seed)
    return model


def final_hidden(
    model: torch.nn.Module,
    input_ids: torch.Tensor,  # (B, T)
    attention_mask: torch.Tensor,  # (B, T)
    positions: torch.Tensor,  # (N,)
) -> torch.Tensor:
    """(N, H) the model's final hidden states (after the last norm) at the loss positions."""
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state.flatten(0, 1).index_select(0, positions)  # (N, H)


class DistillStudent(torch.nn.Module):
    """The student plus the loss, as one module so DDP sees every parameter use in forward."""

    def __init__(self, model: torch.nn.Module, plan: LossPlan):
        super().__init__()
        self.model = model
        self.plan = plan

    def hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """(N, H) final hidden states (after the last norm) at the loss positions."""
        return final_hidden(self.model, input_ids, attention_mask, positions)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor,  # (B, T)
        positions: torch.Tensor,  # (N,)
        labels: torch.Tensor,  # (N,)
        targets: Targets,  # N rows
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = self.hidden(input_ids, attention_mask, positions)
        head = self.model.get_output_embeddings()
        lo = self.plan.loss
        out = chunked_distill_loss(
            hidden,
            head.weight,
            targets,
            labels,
            torch.ones_like(labels, dtype=torch.bool),
            alpha=lo.alpha,
            chunk_size=lo.chunk_size,
            lm_head_bias=getattr(head, "bias", None),
            divergence=lo.divergence,
            beta=lo.beta,
            temperature=lo.temperature,
            tail=self.plan.topk_tail,
        )
        return out.total, out.kd, out.ce
