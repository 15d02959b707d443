"""CaptureConfig: every setting of `logitcache build`, grouped by concern, validated up front.

The command line is generated from these fields (cache/settings.py): each field's docstring is
its help and its flag is ``--field-name`` unless its metadata spells it otherwise. The
resolved config is saved as ``capture_config.json`` inside the dataset folder, and
``logitcache build --config`` reads it back. Fields that change what is stored (teacher, views,
targets, generation) are also in the manifest's ``capture``/``teacher`` and must match when a
capture is resumed; the rest (batch size, device, progress) may change.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from .errors import InputError
from .format import MANIFEST_NAME, PARTS_DIR, TargetSpec
from .settings import (
    Source,
    build,
    file_sources,
    flag,
    format_problems,
    inline,
    mapping_sources,
    settings,
    to_dict,
)
from .storage import Location

Mode = Literal["score", "generate"]
Render = Literal["chat", "plain"]
Truncation = Literal["error", "left", "drop"]
OnError = Literal["raise", "skip"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Engine = Literal["hf", "vllm"]
CONFIG_NAME = "capture_config.json"
log = logging.getLogger(__name__)

DEFAULT_TARGETS = TargetSpec("topk", k=32, n=32, codec="u8", sampling="systematic")
"""What `logitcache build` stores unless told otherwise: top-32 + 32 systematic tail draws, u8
(docs/RESULTS.md says why)."""


@dataclass(frozen=True)
class InputConfig:
    """Where the prompts come from and how they become the two views."""

    prompts: tuple[str, ...] = field(metadata=flag(metavar="SRC"))
    """Prompt records: *.jsonl, *.jsonl.zst, *.parquet, a datasets save_to_disk folder, a folder
    of such files, a glob, or an fsspec URL."""
    context: str | None = field(default=None, metadata=flag(metavar="FILE"))
    """Shared context shown to the teacher only: plain text (a system prompt), or a JSON list of
    chat messages (a few-shot block)."""
    render: Render = "chat"
    """Text prompts through the chat template, or as plain text; 'messages' records always use
    the chat template."""
    on_error: OnError = "raise"
    """On a malformed record: stop, or skip it and list it in the manifest's extra.skipped."""
    max_length: int | None = field(default=None, metadata=flag(metavar="N"))
    """Tokens per view, prompt + response; default: the teacher's context size."""
    truncation: Truncation = "error"
    """Over-long examples: raise, cut the teacher context from the left, or drop them (counted
    in the manifest)."""


@dataclass(frozen=True)
class TeacherConfig:
    """Which teacher and how it runs."""

    path: str = field(metadata=flag("--teacher", metavar="DIR"))
    """Local folder of a causal LM: config.json + *.safetensors."""
    tokenizer: str | None = field(default=None, metadata=flag(metavar="DIR"))
    """Folder of the tokenizer; default: the teacher folder."""
    dtype: Dtype = "auto"
    """auto is bfloat16 on GPU and float32 on CPU."""
    device: str = "auto"
    """auto is cuda:LOCAL_RANK when CUDA is available, else cpu."""
    trust_remote_code: bool = False
    """Allow the model folder's own modelling code (off by default)."""
    engine: Engine = "hf"
    """hf: Hugging Face transformers in this process (every target kind); vllm: vLLM in this
    process (continuous batching, its own tensor parallelism with --tp, prefix caching; top-k
    targets without tail draws: --n 0). See docs/CAPTURE.md for which engine fits which teacher."""
    tp: int = field(default=1, metadata=flag(metavar="T"))
    """Tensor parallel: split the teacher over T devices. --engine hf: groups of T torchrun ranks
    (transformers' tensor parallelism, the model's own plan), each group capturing its share of
    the prompts; T must divide the number of processes. --engine vllm: vLLM's
    tensor_parallel_size (vLLM starts its own workers). 1: a whole teacher per process."""
    url: str | None = field(default=None, metadata=flag("--teacher-url", metavar="URL"))
    """A served teacher: base URL of an OpenAI-compatible server that returns log-probs (vLLM,
    SGLang), e.g. http://host:8000; --teacher is then the local folder of its config.json and
    tokenizer (no weights). Top-k targets without tail draws (--n 0)."""
    gpu_memory_utilization: float | None = field(default=None, metadata=flag(metavar="F"))
    """--engine vllm: fraction of the device's memory vLLM may reserve (its
    gpu_memory_utilization; on a CPU build, of host memory); default: vLLM's."""
    max_in_flight: int = 64
    """--teacher-url: requests in flight at once."""
    request_timeout: float = field(default=600.0, metadata=flag(metavar="S"))
    """--teacher-url: seconds one request may take before it is retried."""
    request_retries: int = 8
    """--teacher-url: retries of a request (exponential backoff) on connection errors, timeouts,
    429 and 5xx, before the build stops (rerun to resume)."""


@dataclass(frozen=True)
class TargetConfig:
    """What is stored per response position, and how the teacher makes it."""

    mode: Mode = "score"
    """score: teacher-force each record's response; generate: the teacher writes it."""
    spec: TargetSpec = field(default=DEFAULT_TARGETS, metadata=inline(kind="--targets"))
    """The targets as given (kind, k, n, codec, sampling: the flags --targets, --k, --n, --codec,
    --sampling); the manifest holds what they mean for the data (:meth:`stored`)."""
    temperature: float = 1.0
    """Targets are log_softmax(logits / temperature)."""

    def stored(self) -> TargetSpec:
        """The dataset's targets (:meth:`TargetSpec.stored`)."""
        return self.spec.stored()


@dataclass(frozen=True)
class GenerateConfig:
    """How the teacher writes responses in generate mode (--mode generate)."""

    max_new_tokens: int = 256
    """Response length limit."""
    temperature: float = field(default=0.0, metadata=flag("--gen-temperature"))
    """0 is greedy; above 0 samples at this temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass (with --gen-temperature > 0)."""
    seed: int = 0
    """Seeds generation sampling and the draws of the targets, per example id."""
    eos_token_ids: tuple[int, ...] | None = field(default=None, metadata=flag(metavar="ID"))
    """Ids that end a response; default: the teacher folder's generation_config.json, else its
    config.json, else the tokenizer's eos token."""


@dataclass(frozen=True)
class RunConfig:
    """Output, batching and how the work is split."""

    out: str = field(metadata=flag(metavar="DIR"))
    """Dataset folder (local path or fsspec URL)."""
    max_batch_tokens: int = 8192
    """Padded tokens per batch (generate: prompt + max new tokens)."""
    shard_positions: int = 1 << 20
    """Response positions per shard."""
    num_shards: int = 1
    """Split the prompts into this many job-array parts (without torchrun); finalize with
    `logitcache finalize OUT` after the last one."""
    shard_index: int = 0
    """This job's part, 0 ≤ index < num-shards."""
    progress: bool = True
    """Show a progress bar (--no-progress turns it off)."""
    license: str | None = field(default=None, metadata=flag(metavar="ID"))
    """License of the dataset for its card (README.md), as a Hugging Face license id such as
    apache-2.0 or cc-by-4.0; default: none stated."""


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
        p += t.spec.validate(target_flags())
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
        p += self.teacher_problems()
        if self.teacher.dtype not in ("auto", "float32", "bfloat16", "float16"):
            p.append(
                f"--dtype is {self.teacher.dtype!r}; expected auto, float32, bfloat16, float16"
            )
        return p

    def teacher_problems(self) -> list[str]:
        """The engine settings' problems: an external engine stores top-k without draws."""
        te, p = self.teacher, []
        if te.engine not in ("hf", "vllm"):
            p.append(f"--engine is {te.engine!r}; expected hf or vllm")
        if te.tp < 1:
            p.append(f"--tp is {te.tp}; expected ≥ 1 (1: no tensor parallelism)")
        if te.url is not None:
            if not te.url.startswith(("http://", "https://")):
                p.append(f"--teacher-url is {te.url!r}; expected http://HOST:PORT or https://…")
            if te.engine != "hf":
                p.append(
                    "--teacher-url and --engine vllm both given: a served teacher runs in its "
                    "server; drop --engine"
                )
        gmu = te.gpu_memory_utilization
        if gmu is not None and not 0 < gmu <= 1:
            p.append(f"--gpu-memory-utilization is {gmu}; expected 0 < F ≤ 1")
        if te.max_in_flight < 1:
            p.append(f"--max-in-flight is {te.max_in_flight}; expected ≥ 1")
        if not te.request_timeout > 0:
            p.append(f"--request-timeout is {te.request_timeout}; expected > 0 seconds")
        if te.request_retries < 0:
            p.append(f"--request-retries is {te.request_retries}; expected ≥ 0")
        if te.url is not None or te.engine == "vllm":
            from .external import check_targets

            p += check_targets(self.targets, "--teacher-url" if te.url else "--engine vllm")
        return p

    def to_json(self) -> dict[str, Any]:
        """Five groups of settings, the targets' fields in the ``targets`` group."""
        return to_dict(self)

    def dumps(self) -> bytes:
        return (json.dumps(self.to_json(), indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str = "capture config") -> CaptureConfig:
        """Inverse of :meth:`to_json`; unknown keys, wrong types and missing keys are errors
        naming them."""
        sources, problems = mapping_sources(obj, where)
        cfg, more = build(cls, sources, command="build", example="targets.k")
        if problems or more:
            raise InputError(format_problems(problems + more))
        return cfg


def target_flags() -> dict[str, str]:
    """The flag of each TargetSpec field: what validation calls it (``{"k": "--k", ...}``)."""
    return {s.path[2]: s.flag for s in settings(CaptureConfig) if s.path[:2] == ("targets", "spec")}


def load_capture_config(path: str | Path | None, flags: list[Source]) -> CaptureConfig:
    """The capture's settings: defaults, then the file at ``path`` (a ``capture_config.json``,
    or YAML of the same groups), then ``flags``; raises InputError listing every problem.

    A dataset's own ``capture_config.json`` resumes that dataset: without ``--out``, its
    folder is the output even when the ``run.out`` it stores names another place (the folder
    was moved, or a relative --out was given from elsewhere)."""
    sources = file_sources(path, CaptureConfig) if path is not None else []
    cfg, problems = build(CaptureConfig, sources + flags, command="build", example="targets.k")
    if problems:
        raise InputError(format_problems(problems))
    if path is not None and not any(f.key == "run.out" for f in flags):
        folder, out = _dataset_folder_of(str(path)), cfg.run.out
        if folder is not None and folder != (
            out.rstrip("/") if "://" in out else os.path.abspath(out)
        ):
            log.warning(
                "--config %s: writing to the dataset folder it is in, %s (its run.out %s names "
                "another place; pass --out to choose)",
                path,
                folder,
                out,
            )
            cfg = replace(cfg, run=replace(cfg.run, out=folder))
    return cfg


def _dataset_folder_of(path: str) -> str | None:
    """The dataset folder (absolute path or URL) that holds the config file ``path``: a
    ``capture_config.json`` beside a manifest or writer journals; None for a config elsewhere."""
    folder, _, name = path.rpartition("/")
    if name != CONFIG_NAME:
        return None
    loc = Location(folder or ".")
    if not (loc.exists(MANIFEST_NAME) or loc.exists(PARTS_DIR)):
        return None
    return loc.url_of()
