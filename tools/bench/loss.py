"""Benchmark: peak memory and time of dense vs chunked distillation loss + backward.

Run ``python -m logitcache.tools.bench.loss``. For each vocabulary size it measures, side by
side in one run, ``distill_loss`` on materialised ``hidden @ W.T`` logits ("dense") and
``chunked_distill_loss`` on the hidden states ("chunked"), forward plus backward to the
hidden states and the lm_head, and prints a table with the chunked/dense ratios.

Each variant runs in a fresh subprocess so that its peak memory is its own: on CPU the peak
is the process's resident high-water mark (VmHWM, reset after the inputs are built where the
kernel allows it) minus the resident size once the inputs exist; on CUDA it is
``torch.cuda.max_memory_allocated`` minus the memory allocated for the inputs. Either way it
counts what the loss and its backward add on top of the model inputs, gradients included.
CPU workers run with MALLOC_MMAP_THRESHOLD_=1 MiB so that resident memory tracks live tensors,
and every worker makes one tiny warm-up call first so one-time imports are not counted.
Time is the fastest of ``--repeats`` runs; on a shared machine it is the noisier number.
The chunked peak cannot fall much below chunk_size / N of the dense one, plus one more
(V, H) gradient buffer (the per-chunk lm_head gradients are summed into it in the forward).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from logitcache.train.losses import (
    TopKTargets,
    auto_chunk_size,
    chunked_distill_loss,
    distill_loss,
)

_MIB = 2**20


def _inputs(
    n: int, v: int, h: int, k: int, device: str
) -> tuple[torch.Tensor, torch.Tensor, TopKTargets, torch.Tensor, torch.Tensor]:
    """Seeded synthetic inputs, built without any (N, V) temporary so the baseline is clean."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g)  # (N, H)
    weight = torch.randn(v, h, generator=g) / h**0.5  # (V, H)
    # K distinct ids per row: a random offset plus an evenly spaced stride.
    offsets = torch.randint(0, v, (n, 1), generator=g)
    ids = (offsets + torch.arange(k) * (v // k)) % v  # (N, K)
    buckets = (2.0 * torch.randn(n, k + 1, generator=g)).log_softmax(-1)  # (N, K + 1)
    targets = TopKTargets(ids.to(device), buckets[:, :k].to(device), buckets[:, k].to(device))
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    mask = torch.ones(n, dtype=torch.bool, device=device)
    return (
        hidden.to(device).requires_grad_(True),
        weight.to(device).requires_grad_(True),
        targets,
        labels,
        mask,
    )


def _rss_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status; this benchmark needs Linux")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _worker(args: argparse.Namespace) -> None:
    """Measure one variant at one vocabulary size; print one JSON line."""
    device = args.device
    kwargs = {"alpha": 0.5, "divergence": args.divergence}

    def step(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: TopKTargets,
        labels: torch.Tensor,
        mask: torch.Tensor,
    ) -> float:
        hidden.grad = weight.grad = None
        if args.worker == "dense":
            logits = hidden @ weight.T  # (N, V)
            out = distill_loss(logits, targets, labels, mask, **kwargs)
        else:
            out = chunked_distill_loss(
                hidden, weight, targets, labels, mask, chunk_size=args.chunk_size, **kwargs
            )
        out.total.backward()
        return out.total.item()

    # A tiny warm-up keeps one-time costs (lazy imports, allocator set-up) out of the numbers.
    step(*_inputs(8, 64, 8, 4, device))
    inputs = _inputs(args.positions, args.vocab, args.hidden, args.topk, device)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset = _reset_peak_rss()
        base = _rss_bytes("VmRSS")
        hwm_before = _rss_bytes("VmHWM")
    seconds = []
    loss = float("nan")
    for i in range(args.repeats):
        start = time.perf_counter()
        loss = step(*inputs)  # .item() synchronises on CUDA
        seconds.append(time.perf_counter() - start)
        if i == 0:  # peak of the first run: later runs only reuse freed memory
            if device == "cuda":
                peak = torch.cuda.max_memory_allocated() - base
                trusted = True
            else:
                peak = _rss_bytes("VmHWM") - base
                # Without a reset, a peak below the earlier high-water mark is unobservable.
                trusted = reset or _rss_bytes("VmHWM") > hwm_before
    print(
        json.dumps({"peak_bytes": peak, "trusted": trusted, "seconds": min(seconds), "loss": loss})
    )


def _run_variant(args: argparse.Namespace, variant: str, vocab: int, chunk_size: int) -> dict:
    cmd = [sys.executable, "-m", "logitcache.tools.bench.loss", "--worker", variant]
    cmd += ["--vocab", str(vocab), "--positions", str(args.positions)]
    cmd += ["--hidden", str(args.hidden), "--topk", str(args.topk)]
    cmd += ["--chunk-size", str(chunk_size), "--repeats", str(args.repeats)]
    cmd += ["--divergence", args.divergence, "--device", args.device]
    # Blocks over 1 MiB go straight to mmap and back to the OS when freed, so resident memory
    # tracks live tensors instead of glibc's heap high-water mark (its adaptive threshold
    # would otherwise keep some (V, H)-sized blocks on the heap).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(_MIB)}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} worker at V={vocab} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m logitcache.tools.bench.loss", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--vocab", type=int, nargs="+", default=[32_000, 128_256])
    parser.add_argument("--positions", type=int, default=4096, help="N loss positions")
    parser.add_argument("--hidden", type=int, default=256, help="H, the student's width")
    parser.add_argument("--topk", type=int, default=64, help="K cached teacher ids per row")
    parser.add_argument(
        "--chunk-size",
        type=int,
        nargs="+",
        default=[0, 1024],
        help="chunked variants to run; 0 is the library default, auto_chunk_size(V)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed runs; fastest is kept")
    parser.add_argument(
        "--divergence", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"]
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", choices=["dense", "chunked"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        args.vocab, args.chunk_size = args.vocab[0], args.chunk_size[0]
        _worker(args)
        return

    print(
        f"device={args.device} threads={torch.get_num_threads()} N={args.positions} "
        f"H={args.hidden} K={args.topk} divergence={args.divergence} "
        f"(distill loss + backward to hidden and lm_head; fastest of {args.repeats} run(s))"
    )
    compare(args)


def compare(args: argparse.Namespace) -> list[dict]:
    """Dense and each chunked variant at each vocabulary size, each in its own process; prints
    the table and the ratios and returns one dict per chunked variant: V, name, peak MiB of it
    and of dense, their ratio, time ratio and |loss - dense loss|."""
    header = f"{'V':>8} {'variant':>18} {'peak MiB':>10} {'seconds':>8} {'loss':>12}"
    rows, ratios, out = [header], [], []
    for vocab in args.vocab:
        dense = _run_variant(args, "dense", vocab, 0)
        results = {"dense": dense}
        for chunk_size in args.chunk_size:
            name = f"chunked@{chunk_size or f'auto {auto_chunk_size(vocab)}'}"
            results[name] = _run_variant(args, "chunked", vocab, chunk_size)
        for name, r in results.items():
            flag = "" if r["trusted"] else "  (peak not observable: lower bound)"
            rows.append(
                f"{vocab:>8} {name:>18} {r['peak_bytes'] / _MIB:>10.0f} "
                f"{r['seconds']:>8.2f} {r['loss']:>12.6f}{flag}"
            )
            if name != "dense":
                share = r["peak_bytes"] / dense["peak_bytes"]
                out.append(
                    {
                        "vocab": vocab,
                        "variant": name,
                        "peak_mib": r["peak_bytes"] / _MIB,
                        "dense_peak_mib": dense["peak_bytes"] / _MIB,
                        "peak_share": share,
                        "time_ratio": r["seconds"] / dense["seconds"],
                        "loss_diff": abs(r["loss"] - dense["loss"]),
                        "trusted": bool(r["trusted"] and dense["trusted"]),
                    }
                )
                ratios.append(
                    f"V={vocab} {name}: peak memory {share:.3f} of dense "
                    f"(goal <= 0.25: {'met' if share <= 0.25 else 'not met'}), "
                    f"time {r['seconds'] / dense['seconds']:.2f}x dense, "
                    f"|loss - dense loss| {abs(r['loss'] - dense['loss']):.1e}"
                )
    print("\n".join(rows))
    print("\n".join(ratios))
    return out


if __name__ == "__main__":
    main()
