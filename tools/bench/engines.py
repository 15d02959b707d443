"""Generate-mode capture on three engines, each ÷ its own bare generation, side by side.

    python -m logitcache.tools.bench.engines [--prompts 16] [--new 32] [--k 32] [--repeats 2]

Run it in the environment `make test-vllm` builds (.venv-vllm: vLLM and the project); without
vLLM only the Hugging Face rows are measured. Teacher: SmolLM2-135M-Instruct (fp32 on CPU).
The same rendered prompts (the demo's prompts in the chat template, no context) go through:

- **hf**: bare = ``model.generate`` greedy, nothing recorded; capture = the capture's
  ``generate_batch`` (a logits processor computing the top-k targets every step) plus cutting
  the results into examples, on the same batches (``--max-batch-tokens``);
- **vllm** (in process): bare = ``LLM.generate`` without log-probs; capture = the engine's
  ``generate_batch`` (``logprobs = k``, raw log-probs) plus the conversion into targets;
- **served**: ``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1, started here;
  bare = the same completions without log-probs; capture = ``--teacher-url``'s
  ``generate_batch`` (``logprobs = k`` by token id) plus the conversion; and **server** = the
  capture's own requests with the answers read but not decoded, so capture ÷ server is the
  client's share (decoding, conversion) and server ÷ bare the server's (producing the log-probs).

Every response runs to ``--new`` tokens (no end-of-sequence stop), so every variant generates
the same count. Figures: generated tokens/s and captured positions/s (here equal: one position
per generated token) and capture ÷ bare per engine; after one untimed warm-up run of each, the
variants alternate, ``--repeats`` times, best of each kept. The engines differ in batching (HF: static batches; vLLM: continuous), so
compare engines by their own bare rows, and the ratios within an engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MEMORY = 0.25  # fraction of host memory vLLM's CPU build may reserve (the box is shared)


def _rendered(teacher: str, n: int, tmp: Path) -> tuple[Any, list[Any]]:
    from ...cache.capture_config import TeacherConfig
    from ...cache.prompts import read_prompts
    from ...cache.teacher import load_tokenizer
    from ...cache.views import ViewRenderer
    from ..demo.behaviour import load_demo_prompts

    prompts = load_demo_prompts()
    path = tmp / "p.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "prompt": prompts[i % len(prompts)]["prompt"]}) + "\n"
            for i in range(n)
        )
    )
    tok = load_tokenizer(TeacherConfig(path=teacher))
    recs = read_prompts([str(path)], require_response=False).records
    rendered, bad = ViewRenderer(tok, "chat", None, teacher).render_all([r for _, r in recs])
    assert not bad
    return tok, rendered


def _cfg(teacher: str, out: Path, k: int, new: int, **te: Any) -> Any:
    from ...cache.capture_config import (
        CaptureConfig,
        GenerateConfig,
        InputConfig,
        RunConfig,
        TargetConfig,
        TeacherConfig,
    )
    from ...cache.format import TargetSpec

    return CaptureConfig(
        input=InputConfig(prompts=("-",)),
        teacher=TeacherConfig(path=teacher, **te),
        run=RunConfig(out=str(out)),
        targets=TargetConfig("generate", TargetSpec("topk", k=k, n=0, codec="u8", sampling=None)),
        generate=GenerateConfig(max_new_tokens=new),
    )


def _best(times: dict[str, list[float]], counts: dict[str, int]) -> dict[str, float]:
    return {v: counts[v] / min(t) for v, t in times.items()}


def _alternate(
    variants: dict[str, Any], repeats: int
) -> tuple[dict[str, list[float]], dict[str, int]]:
    times: dict[str, list[float]] = {v: [] for v in variants}
    counts: dict[str, int] = {}
    for fn in variants.values():  # warm-up: lazy initialisation, compiled graphs, caches
        fn()
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            counts[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return times, counts


def bench_hf(
    teacher: str, rendered: list[Any], k: int, new: int, batch_tokens: int, repeats: int
) -> dict[str, float]:
    import torch
    from transformers import GenerationConfig

    from ...cache.engine import generate_batch, plan_batches
    from ...cache.targets import example_keys
    from ...cache.teacher import load_teacher

    cfg = _cfg(teacher, Path("-"), k, new)
    tch = load_teacher(cfg.teacher, torch.device("cpu"), eos_ids=[])  # no stop: --new tokens each
    lengths = np.array([len(e.teacher_ids) + new for e in rendered])
    batches = plan_batches(lengths, batch_tokens)
    keys = example_keys([e.id for e in rendered], 0)

    def bare() -> int:
        n = 0
        for idx in batches:
            exs = [rendered[i] for i in idx]
            T = max(len(e.teacher_ids) for e in exs)
            ids = torch.full((len(exs), T), tch.pad_id)
            mask = torch.zeros((len(exs), T), dtype=torch.long)
            for b, e in enumerate(exs):
                ids[b, T - len(e.teacher_ids) :] = torch.from_numpy(e.teacher_ids)
                mask[b, T - len(e.teacher_ids) :] = 1
            gc = GenerationConfig(
                max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tch.pad_id
            )
            with torch.inference_mode():
                out = tch.model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
            n += (out.shape[1] - T) * len(exs)
        return n

    def capture() -> int:
        n = 0
        for idx in batches:
            r = generate_batch(
                tch, [rendered[i] for i in idx], cfg.targets, cfg.generate, keys[idx]
            )
            n += sum(len(e.response_ids) for e in r.to_examples())
        return n

    times, counts = _alternate({"bare": bare, "capture": capture}, repeats)
    return _best(times, counts)


def bench_external(
    teacher_obj: Any,
    bare_fn: Any,
    rendered: list[Any],
    cfg: Any,
    batch: int,
    repeats: int,
    server_fn: Any = None,
) -> dict[str, float]:
    from ...cache.targets import example_keys

    keys = example_keys([e.id for e in rendered], 0)
    chunks = [np.arange(i, min(i + batch, len(rendered))) for i in range(0, len(rendered), batch)]

    def capture() -> int:
        n = 0
        for idx in chunks:
            r = teacher_obj.generate_batch(
                [rendered[i] for i in idx], cfg.targets, cfg.generate, keys[idx]
            )
            n += sum(len(e.response_ids) for e in r.to_examples())
        return n

    def bare() -> int:
        return sum(bare_fn([rendered[i] for i in idx]) for idx in chunks)

    variants = {"bare": bare, "capture": capture}
    if server_fn is not None:
        variants["server"] = lambda: sum(
            server_fn([rendered[i] for i in idx], keys[idx]) for idx in chunks
        )
    times, counts = _alternate(variants, repeats)
    return _best(times, counts)


def bench_vllm(
    teacher: str, tok: Any, rendered: list[Any], k: int, new: int, repeats: int
) -> dict[str, float]:
    from vllm import SamplingParams

    from ...cache.vllm_engine import VLLMTeacher

    cfg = _cfg(teacher, Path("-"), k, new, engine="vllm", gpu_memory_utilization=MEMORY)
    eng = VLLMTeacher(cfg, tok, [])
    params = SamplingParams(
        max_tokens=new, min_tokens=new, temperature=0.0, detokenize=False, ignore_eos=True
    )

    def bare(exs: list[Any]) -> int:
        outs = eng._run([[int(i) for i in e.teacher_ids] for e in exs], [params] * len(exs))
        return sum(len(o.outputs[0].token_ids) for o in outs)

    try:
        return bench_external(eng, bare, rendered, cfg, len(rendered), repeats)
    finally:
        eng.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_served(
    teacher: str, tok: Any, rendered: list[Any], k: int, new: int, repeats: int, log: Path
) -> dict[str, float]:
    import httpx

    from ...cache.served import ServedTeacher

    port = _free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", teacher,
        "--host", "127.0.0.1", "--port", str(port), "--max-logprobs", "64",
        "--gpu-memory-utilization", str(MEMORY), "--max-model-len", "2048", "--dtype", "float32",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            if proc.poll() is not None or time.time() - t0 > 900:
                raise RuntimeError(f"the server did not start: {log.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        cfg = _cfg(teacher, Path("-"), k, new, url=url, max_in_flight=len(rendered))
        eng = ServedTeacher(cfg, tok, [])  # no end ids: ignore_eos, --new tokens each

        def bare(exs: list[Any]) -> int:
            bodies = [
                {"model": eng.model, "prompt": [int(i) for i in e.teacher_ids], "max_tokens": new,
                 "temperature": 0.0, "return_token_ids": True, "ignore_eos": True}
                for e in exs
            ]  # fmt: skip
            return sum(len(a["choices"][0]["token_ids"]) for a in eng.post_many(bodies))

        def server(exs: list[Any], keys: np.ndarray) -> int:
            """The capture's requests, answers read but not decoded: the server's own cost."""
            prompts = [[int(i) for i in e.teacher_ids] for e in exs]
            bodies = eng.generation_bodies(prompts, k, cfg.generate, keys)
            client = eng._http()

            async def go() -> list[Any]:
                return await asyncio.gather(
                    *(client.post("/v1/completions", json=b) for b in bodies)
                )

            for r in eng._run(go()):
                r.raise_for_status()
            return new * len(exs)  # ignore_eos: --new tokens each

        try:
            return bench_external(eng, bare, rendered, cfg, len(rendered), repeats, server)
        finally:
            eng.close()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--new", type=int, default=32, help="generated tokens per prompt")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-batch-tokens", type=int, default=8192, help="HF batches")
    p.add_argument("--engines", default="hf,vllm,served")
    args = p.parse_args(argv)
    from ..teachers import ensure_smollm2

    teacher = str(ensure_smollm2())
    tmp = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    tok, rendered = _rendered(teacher, args.prompts, tmp)
    engines = args.engines.split(",")
    rows: dict[str, dict[str, float]] = {}
    try:
        import vllm  # noqa: F401
    except ModuleNotFoundError:
        print("vLLM is not installed here (make test-vllm builds .venv-vllm): hf rows only")
        engines = [e for e in engines if e == "hf"]
    for name in engines:
        t0 = time.time()
        if name == "hf":
            rows[name] = bench_hf(
                teacher, rendered, args.k, args.new, args.max_batch_tokens, args.repeats
            )
        elif name == "vllm":
            rows[name] = bench_vllm(teacher, tok, rendered, args.k, args.new, args.repeats)
        else:
            rows[name] = bench_served(
                teacher, tok, rendered, args.k, args.new, args.repeats, tmp / "server.log"
            )
        print(f"{name}: done in {time.time() - t0:.0f} s (load included)", flush=True)
    print(
        f"\nSmolLM2-135M-Instruct fp32, {args.prompts} prompts × {args.new} new tokens, top-{args.k}, "
        f"best of {args.repeats}; load avg {os.getloadavg()[0]:.1f}"
    )
    print("| engine | bare gen tok/s | capture tok/s = positions/s | capture ÷ bare |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['bare']:.1f} | {r['capture']:.1f} | {r['capture'] / r['bare']:.3f} |")
    if "server" in rows.get("served", {}):
        r = rows["served"]
        print(
            f"\nserved, the capture's requests with answers read but not decoded: "
            f"{r['server']:.1f} tok/s = {r['server'] / r['bare']:.3f} of bare (the server's log-prob "
            f"output); the client's decoding and conversion: capture ÷ that = "
            f"{r['capture'] / r['server']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
