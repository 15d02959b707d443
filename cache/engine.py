"""The teacher on the device: load it, batch examples by length, and turn batches into targets.

Score mode pads on the right (positions stay 0..T-1, so no position ids are needed) and runs
one forward pass in which only the target positions go through the LM head (a boolean
``logits_to_keep``; with older transformers, the window from the shortest prompt on, gathered
down to the target rows). Generate mode pads on the left and calls ``model.generate``; a
logits processor computes each step's targets from the raw logits of that very step, so
response and targets come from one pass and no (steps × vocab) logits are kept. Results are copied to pinned host memory without
blocking, so the next batch is queued before this one is unpacked.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .capture_config import GenerateConfig, TargetConfig, TeacherConfig
from .eos import folder_eos_ids
from .errors import InputError
from .format import Example, Sampled, TopK
from .targets import (
    STREAM_GENERATE,
    STREAM_TARGETS,
    chunk_rows,
    log_probs,
    row_keys,
    sample_ids,
    topk_targets,
    uniforms,
    unique_counts,
)
from .views import Rendered

log = logging.getLogger(__name__)
KeepMode = Literal["mask", "window", "none"]


# --------------------------------------------------------------------------- the teacher


@dataclass
class Teacher:
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


def resolve_device(spec: str) -> torch.device:
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
    from transformers import AutoTokenizer

    tok_dir = cfg.tokenizer or cfg.path
    try:
        return AutoTokenizer.from_pretrained(
            tok_dir, local_files_only=True, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        flag = "--tokenizer" if cfg.tokenizer else "--teacher"
        raise InputError(f"{flag} {tok_dir}: no loadable tokenizer ({e})") from None


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
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.path, attn_implementation="sdpa", **kwargs)
    except ValueError as e:
        if "sdpa" not in str(e).lower():
            raise InputError(f"--teacher {cfg.path}: cannot load the model ({e})") from None
        log.warning("%s does not support SDPA attention; using eager attention", cfg.path)
        model = AutoModelForCausalLM.from_pretrained(
            cfg.path, attn_implementation="eager", **kwargs
        )
    model.to(device).eval()
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
    keep = _logits_to_keep_support(model)
    return Teacher(model, tok, device, vocab, teacher_identity(cfg.path), int(pad), eos_ids, keep)


def _logits_to_keep_support(model: Any) -> KeepMode:
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


# --------------------------------------------------------------------------- batching


def plan_batches(lengths: np.ndarray, max_batch_tokens: int) -> list[np.ndarray]:
    """Group example indices by length so that batch size × longest ≤ ``max_batch_tokens``.

    Longest first, so an out-of-memory batch shows up at once rather than hours in. An example
    longer than the budget gets a batch of its own.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = int(lengths[order[start]])
        size = max(1, max_batch_tokens // max(longest, 1))
        batches.append(order[start : start + size])
        start += size
    return batches


# --------------------------------------------------------------------------- results


@dataclass
class BatchResult:
    """One batch's targets on the host (possibly still arriving) and the ids they belong to."""

    examples: list[Rendered]
    response_ids: list[np.ndarray]
    host: dict[str, torch.Tensor]
    event: Any = None
    tokens: int = 0
    """Teacher tokens in the batch (unpadded prompt + response)."""
    finished: int = 0
    """Generate mode: responses that ended with an end-of-sequence token."""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_examples(self, kind: str) -> list[Example]:
        """Wait for the host copies, then cut the flat arrays into one Example per row."""
        if self.event is not None:
            self.event.synchronize()
        h = {k: v.numpy() for k, v in self.host.items()}
        lengths = np.array([len(r) for r in self.response_ids], dtype=np.int64)
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        out = []
        ubounds = np.concatenate([[0], np.cumsum(h["nunique"])]) if "nunique" in h else None
        for i, ex in enumerate(self.examples):
            p0, p1 = bounds[i], bounds[i + 1]
            draws = None
            if ubounds is not None:
                u0, u1 = ubounds[p0], ubounds[p1]
                draws = Sampled(h["draw_ids"][u0:u1], h["counts"][u0:u1], h["nunique"][p0:p1])
            t: TopK | Sampled
            if kind == "topk":
                t = TopK(h["ids"][p0:p1], h["logprobs"][p0:p1], h["tail"][p0:p1], draws)
            else:
                assert draws is not None
                t = draws
            out.append(Example(ex.id, ex.student_ids, self.response_ids[i], t))
        return out


def _to_host(tensors: dict[str, torch.Tensor], device: torch.device) -> tuple[dict, Any]:
    if device.type != "cuda":
        return {k: v.contiguous() for k, v in tensors.items()}, None
    host = {}
    for k, v in tensors.items():
        buf = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
        host[k] = buf.copy_(v, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def assemble_targets(
    logits: torch.Tensor, spec: TargetConfig, keys: torch.Tensor, positions: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Targets of (P, V) logits, in row chunks; ``keys``/``positions`` (P,) seed sampling.

    The flat arrays :meth:`BatchResult.to_examples` cuts into examples. May overwrite ``logits``
    (pass a copy to keep them)."""
    parts: list[dict[str, torch.Tensor]] = []
    step = chunk_rows(logits.shape[-1])
    for i in range(0, max(len(logits), 1), step):
        sl = slice(i, i + step)
        parts.append(_row_targets(logits[sl], spec, keys[sl], positions[sl], inplace=True))
    return _finish(spec, {k: torch.cat([p[k] for p in parts]) for k in parts[0]})


def _row_targets(
    logits: torch.Tensor,
    spec: TargetConfig,
    keys: torch.Tensor,
    positions: torch.Tensor,
    inplace: bool = False,
) -> dict[str, torch.Tensor]:
    """Targets of (R, V) logits before draws are reduced to unique ids (see :func:`_finish`)."""
    u = None
    if spec.kind == "sampled" or spec.n:
        u = uniforms(row_keys(keys, positions, STREAM_TARGETS), spec.n, spec.sampling)
    if spec.kind == "sampled":
        assert u is not None
        return {"draws": sample_ids(log_probs(logits, spec.temperature), u)}
    # inplace: the model's logits (or our gathered copy) are ours to overwrite.
    t = topk_targets(logits, spec.k, spec.temperature, inplace=inplace, tail_uniforms=u)
    out = {"ids": t.ids, "logprobs": t.logprobs, "tail": t.tail}
    return out if t.tail_draws is None else {**out, "draws": t.tail_draws}


def _finish(spec: TargetConfig, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Draws (sampled, or top-k tail draws) → unique ids with counts; a top-k row whose tail
    holds no mass keeps none."""
    if "draws" not in out:
        return out
    keep = out["tail"] > float("-inf") if spec.kind == "topk" else None
    s = unique_counts(out.pop("draws"), keep)
    return {**out, "draw_ids": s.ids, "counts": s.counts, "nunique": s.nunique}


# --------------------------------------------------------------------------- score mode


@torch.inference_mode()
def score_batch(
    teacher: Teacher, examples: list[Rendered], spec: TargetConfig, ex_keys: np.ndarray
) -> BatchResult:
    """Teacher-force each example's response after its full view; targets at response positions."""
    B = len(examples)
    t_len = np.array([len(e.teacher_ids) for e in examples])
    r_len = np.array([len(e.response_ids) for e in examples])  # type: ignore[arg-type]
    T = int((t_len + r_len).max())
    ids = np.full((B, T), teacher.pad_id, dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.int64)
    for b, e in enumerate(examples):  # one copy per example, right-padded
        n = t_len[b] + r_len[b]
        ids[b, :n] = np.concatenate([e.teacher_ids, e.response_ids])  # type: ignore[list-item]
        mask[b, :n] = 1
    dev = teacher.device
    # Logits at position p predict token p + 1: target j of row b sits at t_len[b] - 1 + j.
    positions_np = np.concatenate([np.arange(r) for r in r_len])
    P = len(positions_np)
    kwargs: dict[str, Any] = {}
    if teacher.keep == "mask":  # the LM head runs on exactly the P target positions
        keep = np.zeros((B, T), dtype=bool)
        for b in range(B):
            keep[b, t_len[b] - 1 : t_len[b] - 1 + r_len[b]] = True
        kwargs["logits_to_keep"] = torch.from_numpy(keep).to(dev, non_blocking=True)
    start = int(t_len.min()) - 1  # window mode: from the shortest prompt's last position on
    if teacher.keep == "window":
        kwargs["logits_to_keep"] = T - start
    logits = teacher.model(
        input_ids=torch.from_numpy(ids).to(dev, non_blocking=True),
        attention_mask=torch.from_numpy(mask).to(dev, non_blocking=True),
        use_cache=False,
        **kwargs,
    ).logits
    if teacher.keep == "mask":
        if tuple(logits.shape[:-1]) != (P,):
            raise RuntimeError(f"the teacher returned logits of shape {tuple(logits.shape)}")
        selected = logits  # (P, V), row-major over the mask: example-major, positions ascending
    else:
        logits = logits[:, -(T - start) :]  # (B, T - start, V)
        rows = np.repeat(np.arange(B), r_len)
        cols = np.repeat(t_len - 1 - start, r_len) + positions_np
        # Indices known on the host: no device sync (a boolean mask would need one).
        selected = logits[
            torch.from_numpy(rows).to(dev, non_blocking=True),
            torch.from_numpy(cols).to(dev, non_blocking=True),
        ]  # (P, V), example-major, positions ascending
    keys = torch.from_numpy(np.repeat(ex_keys, r_len)).to(dev, non_blocking=True)
    positions = torch.from_numpy(positions_np).to(dev, non_blocking=True)
    host, event = _to_host(assemble_targets(selected, spec, keys, positions), dev)
    return BatchResult(
        examples,
        [e.response_ids for e in examples],  # type: ignore[misc]
        host,
        event,
        tokens=int((t_len + r_len).sum()),
    )


# --------------------------------------------------------------------------- generate mode


class _StepTargets:
    """Logits processor that stores each step's targets from the raw fp32 logits, unchanged."""

    def __init__(self, spec: TargetConfig, keys: torch.Tensor):
        self.spec, self.keys = spec, keys
        self.steps: list[dict[str, torch.Tensor]] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        pos = torch.full_like(self.keys, len(self.steps))
        self.steps.append(_row_targets(scores, self.spec, self.keys, pos))
        return scores


class _Sampler:
    """Logits processor that draws the next token itself, from counter-based uniforms.

    It returns 0 at the drawn id and -inf elsewhere, so generate's greedy argmax picks it:
    sampling then depends on (seed, example id, step) only, never on the batch it ran in.
    """

    def __init__(self, gen: GenerateConfig, keys: torch.Tensor):
        self.gen, self.keys, self.step = gen, keys, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = log_probs(scores, self.gen.temperature)  # (B, V)
        pos = torch.full_like(self.keys, self.step)
        u = uniforms(row_keys(self.keys, pos, STREAM_GENERATE), 1)  # (B, 1)
        self.step += 1
        if self.gen.top_p < 1.0:
            sorted_lp, order = logp.sort(dim=-1, descending=True)
            p = sorted_lp.exp()
            outside = (p.cumsum(-1) - p) >= self.gen.top_p  # mass before it already ≥ top-p
            token = order.gather(1, sample_ids(sorted_lp.masked_fill(outside, float("-inf")), u))
        else:
            token = sample_ids(logp, u)  # (B, 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


@torch.inference_mode()
def generate_batch(
    teacher: Teacher,
    examples: list[Rendered],
    spec: TargetConfig,
    gen: GenerateConfig,
    ex_keys: np.ndarray,
) -> BatchResult:
    """The teacher writes each response from its full view; targets come from the same steps."""
    from transformers import GenerationConfig, LogitsProcessorList

    B = len(examples)
    t_len = np.array([len(e.teacher_ids) for e in examples])
    T = int(t_len.max())
    ids = np.full((B, T), teacher.pad_id, dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.int64)
    for b, e in enumerate(examples):  # left-padded: every prompt ends at column T - 1
        ids[b, T - t_len[b] :] = e.teacher_ids
        mask[b, T - t_len[b] :] = 1
    dev = teacher.device
    keys = torch.from_numpy(ex_keys).to(dev)
    record = _StepTargets(spec, keys)
    processors: list[Any] = [record]
    if gen.temperature > 0:
        processors.append(_Sampler(gen, keys))
    config = GenerationConfig(
        max_new_tokens=gen.max_new_tokens,
        do_sample=False,
        eos_token_id=teacher.eos_ids or None,
        pad_token_id=teacher.pad_id,
    )
    seqs = teacher.model.generate(
        input_ids=torch.from_numpy(ids).to(dev),
        attention_mask=torch.from_numpy(mask).to(dev),
        generation_config=config,
        logits_processor=LogitsProcessorList(processors),
    )
    new = seqs[:, T:]  # (B, S)
    S = new.shape[1]
    if teacher.eos_ids:
        is_eos = torch.isin(new, torch.tensor(teacher.eos_ids, device=new.device))
        ended = is_eos.any(-1)
        lengths = torch.where(ended, is_eos.int().argmax(-1) + 1, S)  # response keeps its eos
    else:
        ended = torch.zeros(B, dtype=torch.bool, device=new.device)
        lengths = torch.full((B,), S, device=new.device)
    steps = record.steps[:S]  # generate may run a step past the end and undo it
    valid = torch.arange(S, device=new.device)[None, :] < lengths[:, None]  # (B, S)
    stacked = _finish(spec, {k: torch.stack([s[k] for s in steps], 1)[valid] for k in steps[0]})
    host, event = _to_host(stacked, dev)
    new_np, len_np = new.cpu().numpy(), lengths.cpu().numpy()
    responses = [new_np[b, : len_np[b]].astype(np.int64) for b in range(B)]
    return BatchResult(
        examples,
        responses,
        host,
        event,
        tokens=int(t_len.sum() + len_np.sum()),
        finished=int(ended.sum()),
    )


def describe_generation(gen: GenerateConfig, teacher: Teacher) -> dict[str, Any]:
    """Generation settings as recorded in the manifest."""
    return {
        "max_new_tokens": gen.max_new_tokens,
        "strategy": "greedy" if gen.temperature == 0 else "sample",
        "temperature": gen.temperature,
        "top_p": gen.top_p,
        "seed": gen.seed,
        "eos_token_ids": teacher.eos_ids,
        "sampler": "inverse CDF on counter-based uniforms of (seed, example id, step)",
    }
