"""Section 2 of :mod:`logitcache.tools.gpu_check`: generated tokens/s of Hugging Face
``generate`` bare and with capture's targets, then of vLLM's ``LLM.generate`` bare and with
``logprobs=k`` (in its own process: the engine spawns workers and takes GPU memory)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .gpu_check import Report, Sizes


def _prompt_ids(tokenizer: Any, count: int) -> list[Any]:
    """Teacher-view ids of ``count`` demo prompts after the demo's few-shot context."""
    from logitcache.cache.prompts import parse_record
    from logitcache.cache.views import Context, ViewRenderer

    from .demo.behaviour import DEMO_CONTEXT, load_demo_prompts

    demo = load_demo_prompts()
    renderer = ViewRenderer(tokenizer, "chat", Context.load(str(DEMO_CONTEXT)), "gpu_check")
    recs = [
        parse_record(
            {"id": f"g{i}", "prompt": demo[i % len(demo)]["prompt"]},
            ("gpu_check", i + 1, None),
            f"g{i}",
            require_response=False,
        )
        for i in range(count)
    ]
    rendered, bad = renderer.render_all(recs)
    assert not bad, bad
    return rendered


def generate_section(report: Report, teacher_dir: Path, sizes: Sizes, device: str) -> None:
    """Generated tokens/s: Hugging Face's, then vLLM's, on the same prompts."""
    import torch

    rates, prompts = _hf_generate(teacher_dir, sizes, device)
    for name, rate in rates.items():
        report.add("generate", f"{name} tokens/s", rate, "tokens/s")
    ratio = rates["HF generate + targets"] / rates["HF generate"]
    report.add("generate", "HF generate + targets ÷ bare", ratio)
    if device == "cuda":
        torch.cuda.empty_cache()  # the HF teacher is gone: vLLM's process gets the memory
    if device == "cuda":
        _vllm_section(report, teacher_dir, prompts, sizes)
    else:
        report.skip("generate (vLLM)", "--smoke runs on the CPU")


def _hf_generate(
    teacher_dir: Path, sizes: Sizes, device: str
) -> tuple[dict[str, float], list[list[int]]]:
    """Hugging Face generate, bare and with capture's targets (cache/engine.generate_batch),
    on the same left-padded batch: tokens/s of each, and the prompts' ids."""
    import numpy as np
    import torch
    from transformers import GenerationConfig

    from logitcache.cache.capture_config import DEFAULT_TARGETS, GenerateConfig, TargetConfig
    from logitcache.cache.capture_config import TeacherConfig as TC
    from logitcache.cache.engine import generate_batch
    from logitcache.cache.targets import example_keys
    from logitcache.cache.teacher import load_teacher

    dev = torch.device(device)
    # No end-of-sequence ids: every response runs to the token limit, in both variants.
    teacher = load_teacher(TC(path=str(teacher_dir)), dev, eos_ids=[])
    examples = _prompt_ids(teacher.tokenizer, sizes.gen_prompts)
    gen = GenerateConfig(max_new_tokens=sizes.gen_tokens)
    targets = TargetConfig(mode="generate", spec=replace(DEFAULT_TARGETS, k=sizes.k))
    keys = example_keys([e.id for e in examples], 0)
    t_len = np.array([len(e.teacher_ids) for e in examples])
    ids = torch.full((len(examples), int(t_len.max())), teacher.pad_id)
    for b, e in enumerate(examples):  # left-padded, as generate_batch pads
        ids[b, ids.shape[1] - t_len[b] :] = torch.from_numpy(e.teacher_ids)
    mask = (
        torch.arange(ids.shape[1])[None, :] >= ids.shape[1] - torch.from_numpy(t_len)[:, None]
    ).long()
    config = GenerationConfig(
        max_new_tokens=sizes.gen_tokens, do_sample=False, pad_token_id=teacher.pad_id
    )

    def bare() -> int:
        out = teacher.model.generate(
            input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=config
        )
        return int((out.shape[1] - ids.shape[1]) * len(examples))

    def with_targets() -> int:
        result = generate_batch(teacher, examples, targets, gen, keys)
        result.to_examples()  # waits for the host copies
        return sum(len(r) for r in result.response_ids)

    variants = {"HF generate": bare, "HF generate + targets": with_targets}
    return rates_of(variants, sizes.repeats, dev), [e.teacher_ids.tolist() for e in examples]


def rates_of(fns: dict[str, Callable[[], int]], repeats: int, dev: Any) -> dict[str, float]:
    """Items/s of each function (it returns its item count, the same each call): medians over
    ``repeats`` turns after a warm-up (bench/train.py's ``median_times``)."""
    import torch

    from .bench.train import median_times

    counts: dict[str, int] = {}

    def counting(name: str, fn: Callable[[], int]) -> Callable[[], None]:
        return lambda: counts.__setitem__(name, fn())

    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    times = median_times({n: counting(n, fn) for n, fn in fns.items()}, repeats, sync)
    return {name: counts[name] / seconds for name, seconds in times.items()}


def _vllm_section(
    report: Report, teacher_dir: Path, prompts: list[list[int]], sizes: Sizes
) -> None:
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        report.skip("generate (vLLM)", f"vllm does not import ({e}); pip install 'vllm'")
        return
    spec = teacher_dir / "vllm_prompts.json"
    spec.write_text(json.dumps({"prompts": prompts, "tokens": sizes.gen_tokens, "k": sizes.k}))
    # Its own process: the engine spawns workers and takes GPU memory the others must not hold.
    done = subprocess.run(
        [sys.executable, "-m", "logitcache.tools.gpu_check", "--vllm-worker", str(teacher_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the vLLM worker failed:\n{done.stderr[-3000:]}")
    rates = json.loads(done.stdout.strip().splitlines()[-1])
    for name, rate in rates.items():
        report.add("generate (vLLM)", f"{name} tokens/s", rate, "tokens/s")
    report.add(
        "generate (vLLM)",
        "vLLM generate + logprobs ÷ bare",
        rates["vLLM generate + logprobs"] / rates["vLLM generate"],
    )


def vllm_worker(teacher_dir: Path) -> None:
    """vLLM's ``LLM.generate`` on the prompts the parent wrote, bare and with ``logprobs=k``;
    prints one JSON line of tokens/s (greedy, every response ``tokens`` long)."""
    from vllm import LLM, SamplingParams

    spec = json.loads((teacher_dir / "vllm_prompts.json").read_text())
    llm = LLM(
        model=str(teacher_dir),
        dtype="bfloat16",
        skip_tokenizer_init=True,
        max_model_len=4096,
        max_logprobs=spec["k"],
        gpu_memory_utilization=0.6,
    )
    prompts = [{"prompt_token_ids": p} for p in spec["prompts"]]
    common = dict(max_tokens=spec["tokens"], temperature=0.0, ignore_eos=True, detokenize=False)
    variants = {
        "vLLM generate": SamplingParams(**common),
        "vLLM generate + logprobs": SamplingParams(**common, logprobs=spec["k"]),
    }
    out = {}
    for name, params in variants.items():
        llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
        t0 = time.perf_counter()
        results = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        out[name] = sum(len(r.outputs[0].token_ids) for r in results) / seconds
    print(json.dumps(out))
