"""LoRA adapters (peft): wrap the student, save what trains, write the adapter and merged model.

With ``lora.r > 0`` the student's base weights are frozen and :func:`apply_lora` wraps it with
``peft.get_peft_model``. The lm_head stays frozen and is never adapted: the chunked loss
(train/chunked.py) multiplies the final hidden states by ``lm_head.weight`` itself, chunk by
chunk, so a LoRA delta or a trainable copy of the lm_head would be silently skipped. Listing
the lm_head (or, with tied embeddings, the input embeddings it shares its weight with) in
``lora.target_modules`` or ``lora.modules_to_save`` is refused before training.

Checkpoints hold only the trainable tensors (:func:`trainable_state`); the base weights come
from ``model.path`` again on resume.

With ``lora.load_in_4bit`` (QLoRA, Dettmers et al. 2023) :func:`load_4bit` loads the base
weights as 4-bit NF4 with double quantization through transformers' bitsandbytes integration
(bf16 compute), which leaves the lm_head unquantized, and ``peft.prepare_model_for_kbit_training``
readies it for adapters. ``final-merged/`` is then made from the base weights reloaded at full
precision on the CPU, since merging into NF4 weights would round the merged update.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from logitcache.cache.errors import InputError

from .config import LoraConfig

MERGED_NAME = "final-merged"


def _names(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _import_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise InputError(
            "lora.r > 0 needs peft: pip install 'logitcache[lora]' (or set lora.r 0 for full "
            "fine-tuning)"
        ) from None
    return peft


def _head_names(model: torch.nn.Module) -> set[str]:
    """Short names of the modules that hold the lm_head weight (the input embeddings too when
    they are tied to it)."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    out = set()
    for name, module in model.named_modules():
        if module is head or (weight is not None and getattr(module, "weight", None) is weight):
            out |= {name, name.rsplit(".", 1)[-1]}
    return out - {""}


def load_4bit(path: str, *, gradient_checkpointing: bool) -> torch.nn.Module:
    """The student at ``path`` with its linear layers in 4-bit NF4 on the current CUDA device,
    prepared for k-bit training (peft). Errors: no CUDA device, or bitsandbytes missing."""
    if not torch.cuda.is_available():
        raise InputError(
            "lora.load_in_4bit needs a CUDA device (bitsandbytes' 4-bit kernels) and torch sees "
            "none: train on a GPU, or set lora.load_in_4bit false"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise InputError(
            "lora.load_in_4bit needs bitsandbytes: pip install 'logitcache[qlora]' (or set "
            "lora.load_in_4bit false)"
        ) from None
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=quant,
        dtype=torch.bfloat16,
        device_map={"": torch.cuda.current_device()},
        local_files_only=True,
    )
    return _import_peft().prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def apply_lora(model: torch.nn.Module, lora: LoraConfig, *, seed: int) -> torch.nn.Module:
    """``model`` wrapped by peft with LoRA adapters as ``lora`` says, initialised from
    ``seed``; only they (and lora.modules_to_save) train. The adapter config names the base by
    its absolute path (``base_model_name_or_path``) when it is a local folder."""
    peft = _import_peft()
    heads = _head_names(model)
    targets = _names(lora.target_modules)
    save = _names(lora.modules_to_save)
    problems = [
        f"lora.{key} names {name!r}, which holds the lm_head weight; the chunked loss reads that "
        "weight directly, so it stays frozen: remove it from lora." + key
        for key, names in (("target_modules", targets), ("modules_to_save", save))
        for name in names
        if name in heads
    ]
    if problems:
        raise InputError("; ".join(problems))
    spec = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        modules_to_save=save or None,
        task_type="CAUSAL_LM",
    )
    try:
        # The adapters' random init (lora_A) depends on train.seed only, as a fresh student's.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            wrapped = peft.get_peft_model(model, spec)
    except ValueError as e:
        raise InputError(
            f"lora.target_modules={lora.target_modules!r}: peft cannot adapt the student ({e}); "
            "name its linear layers (e.g. q_proj,v_proj) or use all-linear"
        ) from None
    # peft records the base as model.path was typed: relative, the saved adapter would load
    # only from the folder training ran in. Its absolute path loads from anywhere.
    for adapter in wrapped.peft_config.values():
        base = adapter.base_model_name_or_path
        if base and Path(base).is_dir():
            adapter.base_model_name_or_path = os.path.abspath(base)
    return wrapped


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that train (a LoRA run's adapters), by parameter name, on the CPU."""
    return {
        name: p.detach().contiguous().cpu()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def load_trainable_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Copy ``tensors`` into the model's trainable parameters; returns what did not match."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    wrong = sorted(set(params) ^ set(tensors))
    if not wrong:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])
    return wrong


def save_final_lora(
    model: torch.nn.Module, folder: Path, *, merge: bool, base: str | None = None
) -> None:
    """The adapter folder (loads with ``PeftModel.from_pretrained(base, folder)``) and, with
    ``merge``, the adapters merged into the base weights next to it (``final-merged/``, plain
    transformers). Merging changes ``model`` in place: call it last. ``base``: a 4-bit run's
    ``model.path``, reloaded in fp32 on the CPU to merge into."""
    model.save_pretrained(folder)
    if merge and base is not None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        full = AutoModelForCausalLM.from_pretrained(
            base, dtype=torch.float32, local_files_only=True
        )
        model = PeftModel.from_pretrained(full, folder)
    if merge:
        merged = model.merge_and_unload()  # type: ignore[operator]
        merged.save_pretrained(folder.parent / MERGED_NAME)
