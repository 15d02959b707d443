"""CaptureConfig: every setting of `logitcache build`, grouped by concern, validated up front.

The command line mirrors these fields one for one (tools/cmd_build.py); the resolved config is
saved as ``capture_config.json`` inside the dataset folder. Fields that change what is stored
(teacher, views, targets, generation) are also in the manifest's ``capture``/``teacher`` and
must match when a capture is resumed; the rest (batch size, device, progress) may change.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from .codecs import CODECS, Codec
from .format import MAX_SAMPLE_DRAWS, SAMPLINGS, Sampling

Mode = Literal["score", "generate"]
TargetKind = Literal["topk", "sampled"]
Render = Literal["chat", "plain"]
Truncation = Literal["error", "left", "drop"]
OnError = Literal["raise", "skip"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
CONFIG_NAME = "capture_config.json"


@dataclass(frozen=True)
class InputConfig:
    """Where the prompts come from and how they become the two views."""

    prompts: tuple[str, ...]
    """--prompts: JSONL, JSONL.zst, Parquet files, `datasets` folders, globs or fsspec URLs."""
    context: str | None = None
    """--context: shared teacher-only context file (text, or a JSON list of chat messages)."""
    render: Render = "chat"
    """--render: how text prompts are shown, through the chat template or as plain text."""
    on_error: OnError = "raise"
    """--on-error: stop on a malformed record, or skip it (listed in the manifest's extra)."""
    max_length: int | None = None
    """--max-length: tokens per view (prompt + response); default: the teacher's context size."""
    truncation: Truncation = "error"
    """--truncation: over-long examples raise, lose teacher context from the left, or are dropped."""


@dataclass(frozen=True)
class TeacherConfig:
    """Which teacher and how it runs."""

    path: str
    """--teacher: local folder of a causal LM (config.json + *.safetensors)."""
    tokenizer: str | None = None
    """--tokenizer: folder of the tokenizer; default: the teacher folder."""
    dtype: Dtype = "auto"
    """--dtype: auto is bfloat16 on GPU and float32 on CPU."""
    device: str = "auto"
    """--device: auto is cuda:LOCAL_RANK when CUDA is available, else cpu."""
    trust_remote_code: bool = False
    """--trust-remote-code: allow the folder's own modelling code (off by default)."""


@dataclass(frozen=True)
class TargetConfig:
    """What is stored per response position."""

    mode: Mode = "score"
    """--mode: score a given response (teacher forcing) or let the teacher generate it."""
    kind: TargetKind = "topk"
    """--targets: top-k log-probs with the tail mass and N draws from the tail (the default:
    see docs/RESULTS.md), or N draws from the whole distribution (sampled)."""
    k: int = 32
    """--k: ids per position for top-k targets."""
    n: int = 32
    """--n: draws per position (≤ 255): from the tail for top-k (0: none), or sampled."""
    sampling: Sampling = "systematic"
    """--sampling: systematic (low-variance, unbiased) or multinomial (independent) draws."""
    codec: Codec = "u8"
    """--codec: storage of top-k log-probs (f32, f16, u8, u16; see docs/FORMAT.md)."""
    temperature: float = 1.0
    """--temperature: targets are log_softmax(logits / temperature)."""


@dataclass(frozen=True)
class GenerateConfig:
    """How the teacher writes responses in generate mode."""

    max_new_tokens: int = 256
    """--max-new-tokens: response length limit."""
    temperature: float = 0.0
    """--gen-temperature: 0 is greedy; above 0 samples."""
    top_p: float = 1.0
    """--top-p: nucleus sampling mass (with --gen-temperature > 0)."""
    seed: int = 0
    """--seed: seeds generation sampling and sampled targets, per example id."""
    eos_token_ids: tuple[int, ...] | None = None
    """--eos-token-ids: ids that end a response; default: the teacher folder's
    generation_config.json, else its config.json, else the tokenizer's eos token."""


@dataclass(frozen=True)
class RunConfig:
    """Output, batching and how the work is split."""

    out: str
    """--out: dataset folder (local path or fsspec URL)."""
    max_batch_tokens: int = 8192
    """--max-batch-tokens: padded tokens per batch (generate: prompt + max new tokens)."""
    shard_positions: int = 1 << 20
    """--shard-positions: response positions per shard."""
    num_shards: int = 1
    """--num-shards: job-array parts (without torchrun); finalize with `logitcache finalize`."""
    shard_index: int = 0
    """--shard-index: this job's part, 0 ≤ index < num-shards."""
    progress: bool = True
    """--no-progress turns the progress bar off."""


@dataclass(frozen=True)
class CaptureConfig:
    """The whole resolved configuration of one capture."""

    input: InputConfig
    teacher: TeacherConfig
    run: RunConfig
    targets: TargetConfig = field(default_factory=TargetConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)

    def validate(self) -> list[str]:
        """Every problem, each naming the flag, the value seen and the fix."""
        p: list[str] = []
        i, t, g, r = self.input, self.targets, self.generate, self.run
        if not i.prompts:
            p.append("--prompts is required: one or more prompt files, folders or globs")
        if i.render not in ("chat", "plain"):
            p.append(f"--render is {i.render!r}; expected chat or plain")
        if i.on_error not in ("raise", "skip"):
            p.append(f"--on-error is {i.on_error!r}; expected raise or skip")
        if i.truncation not in ("error", "left", "drop"):
            p.append(f"--truncation is {i.truncation!r}; expected error, left or drop")
        if i.max_length is not None and i.max_length < 2:
            p.append(f"--max-length is {i.max_length}; expected ≥ 2 tokens")
        if t.mode not in ("score", "generate"):
            p.append(f"--mode is {t.mode!r}; expected score or generate")
        if t.kind not in ("topk", "sampled"):
            p.append(f"--targets is {t.kind!r}; expected topk or sampled")
        if t.kind == "topk" and t.k < 1:
            p.append(f"--k is {t.k}; top-k targets need k ≥ 1")
        if t.kind == "sampled" and not 1 <= t.n <= MAX_SAMPLE_DRAWS:
            p.append(f"--n is {t.n}; sampled targets need 1 ≤ n ≤ {MAX_SAMPLE_DRAWS}")
        if t.kind == "topk" and not 0 <= t.n <= MAX_SAMPLE_DRAWS:
            p.append(f"--n is {t.n}; top-k tail draws need 0 ≤ n ≤ {MAX_SAMPLE_DRAWS} (0: none)")
        if t.codec not in CODECS:
            p.append(f"--codec is {t.codec!r}; expected one of {', '.join(CODECS)}")
        if t.sampling not in SAMPLINGS:
            p.append(f"--sampling is {t.sampling!r}; expected one of {', '.join(SAMPLINGS)}")
        if not t.temperature > 0:
            p.append(f"--temperature is {t.temperature}; expected > 0 (1.0: the teacher as is)")
        if g.max_new_tokens < 1:
            p.append(f"--max-new-tokens is {g.max_new_tokens}; expected ≥ 1")
        if g.temperature < 0:
            p.append(f"--gen-temperature is {g.temperature}; expected ≥ 0 (0: greedy)")
        if not 0 < g.top_p <= 1:
            p.append(f"--top-p is {g.top_p}; expected 0 < top-p ≤ 1")
        if g.eos_token_ids is not None:
            shown = " ".join(str(e) for e in g.eos_token_ids)
            if t.mode != "generate":
                p.append(
                    f"--eos-token-ids {shown} applies to --mode generate only (score mode stores "
                    "the given responses); drop it"
                )
            if not g.eos_token_ids or min(g.eos_token_ids) < 0:
                p.append(f"--eos-token-ids is {shown!r}; expected one or more token ids ≥ 0")
        if r.max_batch_tokens < 1:
            p.append(f"--max-batch-tokens is {r.max_batch_tokens}; expected ≥ 1")
        if r.shard_positions < 1:
            p.append(f"--shard-positions is {r.shard_positions}; expected ≥ 1")
        if r.num_shards < 1:
            p.append(f"--num-shards is {r.num_shards}; expected ≥ 1")
        elif not 0 <= r.shard_index < r.num_shards:
            p.append(
                f"--shard-index is {r.shard_index}; expected 0 ≤ index < --num-shards {r.num_shards}"
            )
        if self.teacher.dtype not in ("auto", "float32", "bfloat16", "float16"):
            p.append(
                f"--dtype is {self.teacher.dtype!r}; expected auto, float32, bfloat16, float16"
            )
        return p

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def dumps(self) -> bytes:
        return (json.dumps(self.to_json(), indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str = "capture config") -> CaptureConfig:
        """Inverse of :meth:`to_json`; an unknown or missing key is an error naming it."""
        from .errors import InputError

        groups = {f.name: f.type for f in dataclasses.fields(cls)}
        classes = {
            "input": InputConfig,
            "teacher": TeacherConfig,
            "run": RunConfig,
            "targets": TargetConfig,
            "generate": GenerateConfig,
        }
        unknown = sorted(set(obj) - set(groups))
        parts: dict[str, Any] = {}
        for name, klass in classes.items():
            sub = dict(obj.get(name, {}))
            names = {f.name for f in dataclasses.fields(klass)}
            unknown += [f"{name}.{k}" for k in sorted(set(sub) - names)]
            if "prompts" in sub:
                sub["prompts"] = tuple(sub["prompts"])
            if sub.get("eos_token_ids") is not None:
                sub["eos_token_ids"] = tuple(sub["eos_token_ids"])
            try:
                parts[name] = klass(**{k: v for k, v in sub.items() if k in names})
            except TypeError as e:
                raise InputError(f"{where}: {name}: {e}") from None
        if unknown:
            raise InputError(f"{where}: unknown key(s) {unknown}; remove them")
        return cls(**parts)
