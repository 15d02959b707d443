"""The teacher: find and check its folder, load its tokenizer and model, and record its identity.

Loading states every setting capture relies on: dtype (bf16 on GPU, fp32 on CPU), SDPA
attention, a clean generation config, and how the forward pass can limit the LM head to the
target positions (:func:`logits_to_keep_support`). Scoring and generation are in
:mod:`logitcache.cache.engine`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .capture_config import TeacherConfig
from .eos import folder_eos_ids
from .errors import InputError
from .tokenizer import load_local_tokenizer

log = logging.getLogger(__name__)
KeepMode = Literal["mask", "window", "none"]


@dataclass
class Teacher:
    """A loaded teacher on its device, and what the manifest records about it."""

    model: Any
    tokenizer: Any
    device: torch.device
    vocab_size: int
    """Width of the teacher's logits: every stored id is below it."""
    identity: dict[str, Any]
    """name_or_path, revision (git sha or null) and config_hash, as the manifest records them."""
    pad_id: int
    eos_ids: list[int]
    keep: KeepMode = "none"
    """How the LM head is limited to target positions: a (B, T) boolean ``logits_to_keep``
    (transformers ≥ 5: exactly the target rows), an integer window, or not at all."""

    @property
    def context_size(self) -> int | None:
        """Positions the model was trained for (``max_position_embeddings``), if it says."""
        size = getattr(self.model.config, "max_position_embeddings", None)
        return int(size) if size else None


def resolve_device(spec: str) -> torch.device:
    """``--device``: "auto" is cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if spec != "auto":
        return torch.device(spec)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def teacher_identity(folder: str) -> dict[str, Any]:
    """name_or_path, revision and config_hash of a local model folder."""
    path = Path(folder)
    revision = None
    m = re.search(r"/snapshots/([0-9a-f]{40})(/|$)", str(path.resolve()))
    if m:  # a Hugging Face cache snapshot is named by its commit
        revision = m.group(1)
    elif (path / ".git" / "HEAD").is_file():
        head = (path / ".git" / "HEAD").read_text().strip()
        ref = path / ".git" / head[5:] if head.startswith("ref: ") else None
        revision = ref.read_text().strip() if ref is not None and ref.is_file() else head
        if not re.fullmatch(r"[0-9a-f]{40}", revision or ""):
            revision = None
    config = path / "config.json"
    return {
        "name_or_path": os.path.normpath(folder),
        "revision": revision,
        "config_hash": "sha256:" + hashlib.sha256(config.read_bytes()).hexdigest(),
    }


def check_teacher_folder(folder: str) -> None:
    """Refuse a missing or incomplete model folder before importing transformers."""
    path = Path(folder)
    fix = "pass --teacher a local folder holding config.json and *.safetensors (capture never downloads)"
    if not path.is_dir():
        raise InputError(f"--teacher {folder}: no such folder; {fix}")
    if not (path / "config.json").is_file():
        raise InputError(f"--teacher {folder}: no config.json in the folder; {fix}")
    if not any(path.glob("*.safetensors")):
        raise InputError(
            f"--teacher {folder}: no *.safetensors weights in the folder (pickled .bin weights "
            "are not loaded); convert them with save_pretrained(..., safe_serialization=True)"
        )


def load_tokenizer(cfg: TeacherConfig) -> Any:
    """The teacher's tokenizer (``--tokenizer``, else the teacher folder's), without the model.

    Capture renders and checks every record with it before the (slow) teacher loads.
    """
    tok_dir = cfg.tokenizer or cfg.path
    flag = "--tokenizer" if cfg.tokenizer else "--teacher"
    return load_local_tokenizer(
        tok_dir,
        f"{flag} {tok_dir}",
        "give a folder holding the teacher's tokenizer (saved with save_pretrained)",
        trust_remote_code=cfg.trust_remote_code,
    )


def load_teacher(
    cfg: TeacherConfig,
    device: torch.device,
    tokenizer: Any = None,
    eos_ids: list[int] | None = None,
) -> Teacher:
    """Load tokenizer (unless given) and model: bf16 on GPU, fp32 on CPU, SDPA attention, eval.

    ``eos_ids`` end generated responses; default: the folder's (:func:`folder_eos_ids`)."""
    check_teacher_folder(cfg.path)
    from transformers import AutoModelForCausalLM, GenerationConfig

    tok_dir = cfg.tokenizer or cfg.path
    tok = load_tokenizer(cfg) if tokenizer is None else tokenizer
    dtype = {
        "auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[cfg.dtype]
    kwargs = dict(
        dtype=dtype,
        local_files_only=True,
        use_safetensors=True,
        trust_remote_code=cfg.trust_remote_code,
    )
    if cfg.tp > 1:  # sharded over this rank's group as it loads (cache/tensor_parallel.py)
        from .tensor_parallel import sharded_loading

        loading = sharded_loading(cfg.tp, device)
    else:
        loading = nullcontext({})
    with loading as parallel:
        kwargs.update(parallel)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                cfg.path, attn_implementation="sdpa", **kwargs
            )
        except ValueError as e:
            if "sdpa" not in str(e).lower():
                raise InputError(f"--teacher {cfg.path}: cannot load the model ({e})") from None
            log.warning("%s does not support SDPA attention; using eager attention", cfg.path)
            model = AutoModelForCausalLM.from_pretrained(
                cfg.path, attn_implementation="eager", **kwargs
            )
    if cfg.tp == 1:
        model.to(device)
    model.eval()
    head = model.get_output_embeddings()
    vocab = int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)
    if len(tok) > vocab:
        raise InputError(
            f"--tokenizer {tok_dir} has {len(tok)} tokens but the teacher {cfg.path} has only "
            f"{vocab} logits; use the teacher's own tokenizer"
        )
    if eos_ids is None:
        eos_ids = folder_eos_ids(cfg, tok)[0]
    pad = tok.pad_token_id
    pad = model.generation_config.pad_token_id if pad is None else pad
    pad = (eos_ids[0] if eos_ids else 0) if pad is None else pad
    # A clean generation config: the folder's sampling defaults and penalties must not leak
    # into capture; generate mode states every setting it uses.
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=eos_ids or None, pad_token_id=pad
    )
    keep = logits_to_keep_support(model)
    return Teacher(model, tok, device, vocab, teacher_identity(cfg.path), int(pad), eos_ids, keep)


def logits_to_keep_support(model: Any) -> KeepMode:
    """How this model's forward can limit the LM head to the target positions.

    A boolean mask goes through transformers' ``slice_logits_to_keep`` (5.x); older versions
    and remote code index ``hidden_states[:, keep]``, which a 2-D tensor would broadcast
    silently, so they get the integer window (the last N positions) only.
    """
    import inspect

    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return "none"
    try:
        import transformers.modeling_utils as mu

        forward = inspect.getsource(type(model).forward)
        slicer = inspect.getsource(mu.slice_logits_to_keep)
    except (AttributeError, OSError, TypeError):
        return "window"
    return "mask" if "slice_logits_to_keep" in forward and "torch.bool" in slicer else "window"
