"""Trainer benchmark: offline KD vs plain CE, loader throughput, offline vs online KD.

    python -m logitcache.tools.bench.train            # about 2-4 minutes on 2 CPU cores
    python -m logitcache.tools.bench.train --quick    # smaller shapes, under a minute

Every figure is measured side by side in one run: the variants take turns within each
repetition (so drift in a shared machine hits them alike) and the median is reported.

* **KD ÷ CE**: one training step (forward, backward, AdamW) of the same student on the same
  batch. "CE (HF)" is the usual ``model(input_ids, labels=...)`` with full ``(B, T, V)`` logits;
  "KD (offline)" is the trainer's path (decoder hidden states at the loss positions, then
  ``chunked_distill_loss`` against cached top-k); "KD (dense)" is a diagnostic: the same loss
  on ``(N, V)`` logits at once, without chunking or its recompute in backward.
* **loader**: positions/s the :class:`StreamLoader` delivers from a zstd dataset on disk,
  against the positions/s the offline-KD step consumes.
* **online KD**: the offline step plus a teacher with about 4× the student's parameters
  running forward in the loop to produce the same top-k targets.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _llama(vocab: int, hidden: int, layers: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 2),
        num_key_value_heads=max(hidden // 128, 1),
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float()


def _synthetic_examples(
    vocab: int, k: int, n: int, prompt: int, response: int, seed: int, tail_draws: int = 0
):
    """``n`` examples of top-k targets, with ``tail_draws`` distinct tail ids per position."""
    from logitcache.cache.format import Example, Sampled, TopK

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ids = np.sort(rng.choice(vocab, size=(response, k)), axis=1)
        lp = np.sort(rng.normal(size=(response, k)).astype(np.float32))[:, ::-1] - 3.0
        tail = np.log1p(-np.minimum(np.exp(lp).sum(1), 0.99)).astype(np.float32)
        draws = None
        if tail_draws:  # ids need not avoid the top-k here: only shapes and speed matter
            tids = np.sort(rng.choice(vocab, size=(response, tail_draws)), axis=1).reshape(-1)
            ones = np.ones(len(tids), dtype=np.int64)
            draws = Sampled(tids, ones, np.full(response, tail_draws))
        out.append(
            Example(
                f"b{i}",
                rng.integers(0, vocab, prompt),
                rng.integers(0, vocab, response),
                TopK(ids, np.ascontiguousarray(lp), tail, draws),
            )
        )
    return out


def median_times(
    fns: dict[str, Callable[[], None]], reps: int, sync: Callable[[], None] = lambda: None
) -> dict[str, float]:
    """Median seconds of each function, taking turns; ``sync`` waits for the device (CUDA
    runs kernels asynchronously)."""
    for fn in fns.values():  # warm up (allocator, thread pools)
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_steps(args: argparse.Namespace) -> dict[str, float]:
    import torch

    from logitcache.cache.format import DatasetInfo, TargetSpec
    from logitcache.train.batching import collate
    from logitcache.train.config import load_config
    from logitcache.train.loss_plan import plan_loss
    from logitcache.train.losses import TopKTargets, chunked_distill_loss, distill_loss
    from logitcache.train.student import DistillStudent

    n = args.tail_draws
    info = DatasetInfo(args.vocab, "sha256:bench", TargetSpec("topk", k=args.k, n=n, codec="u8"))
    base = [("data.train", "x", ""), ("train.output", "x", ""), ("model.path", "x", "")]
    cfg = load_config(None, [*base, ("loss.chunk_size", str(args.chunk), "")])
    # loss.tail=auto: with tail draws, they reach the loss as one sparse distribution.
    plan = plan_loss(cfg.loss, info.targets)
    exs = _synthetic_examples(args.vocab, args.k, args.batch, args.prompt, args.response, 0, n)
    batch = collate(exs, info, max_seq_len=args.prompt + args.response, tail_draws=plan.tail_draws)
    device = torch.device(getattr(args, "device", "cpu"))
    batch = batch.to(device)
    student = _llama(args.vocab, args.hidden, args.layers, seed=1).to(device)
    teacher = _llama(args.vocab, args.teacher_hidden, args.teacher_layers, seed=2).to(device)
    teacher.eval()
    # As the trainer does (train.precision auto): bf16 autocast on CUDA, fp32 on CPU.
    bf16 = device.type == "cuda"
    n_s = sum(p.numel() for p in student.parameters())
    n_t = sum(p.numel() for p in teacher.parameters())
    kd_mod = DistillStudent(student, plan)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    # Plain CE labels: the response tokens, at the positions HF shifts them to.
    labels = torch.full_like(batch.input_ids, -100)
    labels.view(-1)[batch.positions + 1] = batch.labels

    def step(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
        """One training step: ``forward``'s loss (under autocast), backward, AdamW."""

        def run() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = forward()
            loss.backward()  # outside autocast, as in the trainer
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    def kd_offline() -> torch.Tensor:
        return kd_mod(
            batch.input_ids, batch.attention_mask, batch.positions, batch.labels, batch.targets
        )[0]

    def kd_dense() -> torch.Tensor:
        # Diagnostic: the same loss on (N, V) logits at once, no chunking or recompute.
        hidden = kd_mod.hidden(batch.input_ids, batch.attention_mask, batch.positions)
        logits = torch.nn.functional.linear(hidden, student.lm_head.weight)  # (N, V)
        mask = torch.ones_like(batch.labels, dtype=torch.bool)
        return distill_loss(logits, batch.targets, batch.labels, mask, alpha=1.0).total

    def ce_hf() -> torch.Tensor:
        return student(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels
        ).loss

    def kd_online() -> torch.Tensor:
        with torch.no_grad():
            h = teacher.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask
            ).last_hidden_state
            logp = (
                teacher.lm_head(h.flatten(0, 1)[batch.positions]).float().log_softmax(-1)
            )  # (N, V)
            top, ids = logp.topk(args.k, dim=-1)
            tail = torch.logsumexp(logp.scatter(1, ids, float("-inf")), dim=-1)
        t = TopKTargets(ids, top, tail)
        hidden = kd_mod.hidden(batch.input_ids, batch.attention_mask, batch.positions)
        out = chunked_distill_loss(
            hidden, student.lm_head.weight, t, batch.labels, torch.ones_like(batch.labels, dtype=torch.bool),
            alpha=1.0, chunk_size=args.chunk,
        )  # fmt: skip
        return out.total

    print(
        f"student {n_s / 1e6:.1f} M params (hidden {args.hidden}, {args.layers} layers), teacher "
        f"{n_t / 1e6:.1f} M ({n_t / n_s:.1f}×), vocab {args.vocab}, batch {args.batch}×"
        f"{args.prompt}+{args.response} tokens, {batch.num_positions} loss positions, "
        f"{info.targets.label}, "
        + (
            f"{torch.cuda.get_device_name(device)}, bf16 autocast"
            if device.type == "cuda"
            else f"torch threads {torch.get_num_threads()}"
        )
    )
    variants = {"CE (HF)": ce_hf, "KD (dense)": kd_dense, "KD (offline)": kd_offline}
    variants["KD (online)"] = kd_online
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    t = median_times({name: step(fn) for name, fn in variants.items()}, args.reps, sync)
    t["positions"] = batch.num_positions
    return t


def bench_loader(args: argparse.Namespace, folder: Path) -> dict[str, float]:
    from logitcache.cache.format import DatasetInfo, TargetSpec
    from logitcache.cache.writer import DatasetWriter
    from logitcache.train.batching import Batcher
    from logitcache.train.stream import LogitStream, StreamLoader

    n = args.tail_draws
    info = DatasetInfo(args.vocab, "sha256:bench", TargetSpec("topk", k=args.k, n=n, codec="u8"))
    ds = folder / "loader-ds"
    with DatasetWriter(ds, info, shard_positions=1 << 17) as w:
        for ex in _synthetic_examples(
            args.vocab, args.k, args.loader_examples, args.prompt, args.response, 1, n
        ):
            w.add(ex)
    out = {}
    for workers in (0, 1):
        stream = LogitStream(
            ds,
            seed=0,
            shuffle_buffer=256,
            epochs=1,
            make_batches=Batcher(
                info, args.prompt + args.response, batch_size=args.batch, tail_draws=n > 0
            ),
        )
        t0 = time.perf_counter()
        positions = sum(b.num_positions for b in StreamLoader(stream, num_workers=workers))
        out[f"workers={workers}"] = positions / (time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m logitcache.tools.bench.train", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="small shapes (under a minute)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--teacher-hidden", type=int, default=512)
    p.add_argument("--teacher-layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--response", type=int, default=192)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--tail-draws", type=int, default=0,
                   help="distinct tail draws per position, trained on as draws (the capture "
                   "default: --k 32 --tail-draws 32); 0: top-k with the tail bucket")  # fmt: skip
    p.add_argument("--chunk", type=int, default=0, help="loss.chunk_size (0: auto)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (bf16 autocast, as the trainer)")
    p.add_argument("--loader-examples", type=int, default=2000)
    args = p.parse_args(argv)
    if args.quick:
        args.vocab, args.hidden, args.teacher_hidden, args.layers, args.teacher_layers = (
            8192,
            128,
            256,
            2,
            4,
        )
        args.response, args.reps, args.loader_examples = 96, 3, 500

    t = bench_steps(args)
    pos = t.pop("positions")
    print(f"\n{'training step':<16}{'median s':>10}{'÷ CE (HF)':>12}")
    for name, s in t.items():
        print(f"{name:<16}{s:>10.3f}{s / t['CE (HF)']:>12.2f}")
    print(
        f"\noffline KD step ÷ plain CE step (HF): {t['KD (offline)'] / t['CE (HF)']:.2f} (goal ≤ 1.10)"
        f"\nonline KD step ÷ offline KD step: {t['KD (online)'] / t['KD (offline)']:.2f}"
        f"\ntrainer consumes {pos / t['KD (offline)']:,.0f} loss positions/s (offline KD)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        loader = bench_loader(args, Path(tmp))
    for name, rate in loader.items():
        print(
            f"loader ({name}): {rate:,.0f} positions/s = {rate / (pos / t['KD (offline)']):.0f}× what the step consumes"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
