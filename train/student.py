"""The student side of training: processes, tokenizer, model, and the loss module.

The student can refuse a run before a single step: one whose lm_head does not cover a
dataset's vocabulary, or whose logits are not ``lm_head(hidden)`` (soft-capping, scaling), which
the chunked loss assumes. (The tokenizer and the other settings are checked against the datasets
in :mod:`logitcache.train.compat`.)
"""

from __future__ import annotations

from typing import Any

import torch

from logitcache.cache.errors import InputError
from logitcache.cache.format import DatasetInfo
from logitcache.cache.ranks import Ranks as Dist  # training calls its ranks helper Dist

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


def load_tokenizer(cfg: Config) -> Any:
    from transformers import AutoTokenizer

    path = cfg.model.tokenizer or cfg.model.path
    key = "model.tokenizer" if cfg.model.tokenizer else "model.path"
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise InputError(
            f"{key}={path!r}: no tokenizer could be loaded ({e}); point model.tokenizer at the "
            "student's tokenizer folder"
        ) from None


def load_student(
    cfg: Config,
    info: DatasetInfo,
    eval_info: DatasetInfo | None = None,
    *,
    frozen_dtype: torch.dtype = torch.float32,
    on_meta: bool = False,
) -> torch.nn.Module:
    """The student for training on ``info``'s dataset (and scoring ``eval_info``'s), refused
    when its lm_head does not cover either vocabulary or its logits are not lm_head(hidden);
    wrapped with LoRA adapters when ``lora.r > 0``, its frozen base weights in
    ``frozen_dtype`` (the adapters stay fp32: peft's ``autocast_adapter_dtype``).
    ``on_meta``: built from the config on the meta device (shapes, no memory), for an FSDP rank
    that receives its shards from rank 0."""
    from transformers import AutoConfig, AutoModelForCausalLM

    m = cfg.model
    try:
        if m.path is not None and cfg.lora.load_in_4bit:
            from .adapters import load_4bit

            model = load_4bit(m.path, gradient_checkpointing=m.gradient_checkpointing)
        elif on_meta:
            config = AutoConfig.from_pretrained(m.path if m.path is not None else m.config)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        elif m.path is not None:
            dtype = frozen_dtype if cfg.lora.r > 0 else torch.float32
            model = AutoModelForCausalLM.from_pretrained(m.path, dtype=dtype)
        else:
            config = AutoConfig.from_pretrained(m.config)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.train.seed)
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (OSError, ValueError) as e:
        key, value = ("model.path", m.path) if m.path is not None else ("model.config", m.config)
        raise InputError(f"{key}={value!r}: cannot build the student ({e})") from None
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
        where = m.path or m.config
        raise InputError(f"student {where}: " + "; ".join(problems))
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
