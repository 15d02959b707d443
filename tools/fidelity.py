"""Issue 5's fidelity study: which stored targets reach online full-KD quality at the fewest bytes.

Same teacher, same student initialisation, same data, order and number of steps for every
configuration; only the training signal differs:

* ``online``: full-vocabulary forward KL with the teacher running in the loop (the reference);
* ``hard``: cross-entropy on the same tokens (``loss.alpha 0``);
* ``topk``: offline top-k for several k, with the tail as a bucket or renormalized away, and
  each log-prob codec; and top-k with N draws from the tail (``--tail-draws K:N``), the tail
  then trained on its draws;
* ``sampled``: offline RS-KD targets, N draws per position.

Configurations with draws are trained once per ``--sample-seeds`` seed (other draws, same data
order): the runs move by a few percent with the draws alone, so they are compared by their mean.

The teacher runs once over the training text; every offline dataset is derived from that pass
with the capture's own functions (``cache.targets``), written with :class:`DatasetWriter` and
trained on with ``train(Config)``, so bytes/position are real shard bytes and codec error is
in the loop. Quality is measured on held-out text against the teacher's *full* distribution:
mean KL(teacher ‖ student) per position, cross-entropy of the true next token, and top-1
agreement. A configuration "reaches online quality" when its held-out KL is at most
``(1 + tolerance)`` times the online run's.

    python -m logitcache.tools.fidelity          # SmolLM2 on KJV: 16 runs, ~1 h on 2 shared cores
    python -m logitcache.tools.fidelity --quick  # 5 runs on fewer sequences
    python -m logitcache.tools.fidelity --replot results.json   # table and plot only
    python -m logitcache.tools.fidelity --replot a.json b.json  # runs of several invocations

Results and how to read them: docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from logitcache.cache.codecs import Codec
from logitcache.cache.format import DatasetInfo, Example, TargetSpec, TopK

if TYPE_CHECKING:
    import torch

    from logitcache.train.config import Config

Kind = Literal["online", "hard", "topk", "sampled"]
TailMode = Literal["bucket", "renorm", "draws"]


@dataclass(frozen=True)
class Variant:
    """One training signal of the study."""

    kind: Kind
    k: int = 0
    n: int = 0
    codec: Codec = "u8"
    tail: TailMode = "bucket"
    sampling: str = "multinomial"
    """How sampled targets were drawn (see cache.targets.uniforms)."""
    seed: int = 0
    """Data-order seed (train.seed); a second seed estimates run-to-run noise."""
    sample_seed: int = 0
    """Seed of the stored draws (as `logitcache build --seed`); other draws, same data."""

    @property
    def config(self) -> Variant:
        """This variant with sample seed 0: what the runs at several sample seeds share."""
        return replace(self, sample_seed=0)

    @property
    def has_draws(self) -> bool:
        return self.kind == "sampled" or (self.kind == "topk" and self.n > 0)

    @property
    def name(self) -> str:
        codec = "" if self.codec == "u8" else f" {self.codec}"
        base = {
            "online": "online full KD",
            "hard": "hard labels (CE)",
            "topk": f"top-{self.k} + {self.n} tail draws{codec}"
            + (" systematic" if self.sampling == "systematic" else "")
            if self.n
            else f"top-{self.k} {self.tail} {self.codec}",
            "sampled": f"sampled n={self.n}"
            + (" systematic" if self.sampling == "systematic" else ""),
        }[self.kind]
        if self.sample_seed:
            base += f" [draws {self.sample_seed}]"
        return base if self.seed == 0 else f"{base} (seed {self.seed})"

    @property
    def dataset(self) -> tuple[TargetSpec, int]:
        """The stored targets this variant trains on and their draws' seed (hard and online
        read the n=1 set for the data order only: hard labels weight its KD term 0, online
        ignores it)."""
        if self.kind == "topk":
            spec = TargetSpec("topk", k=self.k, n=self.n, codec=self.codec, sampling=self.sampling)
            return spec, self.sample_seed if self.n else 0
        if self.kind == "sampled":
            return TargetSpec("sampled", n=self.n, sampling=self.sampling), self.sample_seed
        return TargetSpec("sampled", n=1), 0


@dataclass(frozen=True)
class Settings:
    """Training settings shared by every variant."""

    steps: int
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 2
    context: int = 0
    """Leading tokens of each sequence that only the teacher sees (context distillation): the
    student reads the rest, the teacher the whole sequence."""


@dataclass
class Row:
    """One measured variant."""

    variant: Variant
    bytes_per_position: float | None
    """Shard bytes / positions of its training set; None when nothing is stored (online)."""
    kl: float
    ce: float
    top1: float
    step_s: float
    """Median seconds per optimizer step (the first step excluded)."""
    unique_ids: float | None = None
    """Mean distinct ids per position (sampled targets)."""


def default_variants(
    ks: list[int],
    draws: list[int],
    codecs: list[Codec],
    codec_k: int,
    noise_seeds: list[int],
    tails: tuple[TailMode, ...] = ("bucket", "renorm"),
    samplings: tuple[str, ...] = ("multinomial",),
    hard: bool = True,
    seed: int = 0,
    tail_draws: tuple[tuple[int, int], ...] = (),
    sample_seeds: tuple[int, ...] = (0,),
) -> list[Variant]:
    """Online (the reference) and hard first, then top-k × tail (u8), the other codecs at
    ``codec_k``, top-k + tail draws (k, n), sampled N, all at data-order ``seed``, those with
    draws once per sample seed; then online at each noise seed."""
    out = [Variant("online")] + ([Variant("hard")] if hard else [])
    out += [Variant("topk", k=k, tail=t) for k in ks for t in tails]
    out += [Variant("topk", k=codec_k, codec=c) for c in codecs if c != "u8"]
    out += [
        Variant("topk", k=k, n=n, tail="draws", sampling=m)
        for m in samplings
        for k, n in tail_draws
    ]
    out += [Variant("sampled", n=n, sampling=m) for m in samplings for n in draws]
    out = [
        replace(v, seed=seed, sample_seed=d)
        for v in out
        for d in (sample_seeds if v.has_draws else (0,))
    ]
    return out + [Variant("online", seed=s) for s in noise_seeds]


# --------------------------------------------------------------------------- models and data


def make_student(teacher_dir: str | Path, layers: list[int], out: str | Path) -> Path:
    """A student of the teacher's ``layers`` (in order), embeddings, final norm and lm_head."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in layers]
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for key, value in teacher.state_dict().items():
        if ".layers." not in key:
            state[key] = value
            continue
        head, rest = key.split(".layers.", 1)
        index, tail = rest.split(".", 1)
        if int(index) in layers:
            state[f"{head}.layers.{layers.index(int(index))}.{tail}"] = value
    student.load_state_dict(state, strict=True)
    student.save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out)
    return Path(out)


def kjv_tokens(tokenizer: Any, count: int, length: int) -> np.ndarray:
    """(count, length) token ids of KJV passages spread over the whole book."""
    from .corpus import kjv_passages

    texts = kjv_passages(count, min_chars=length * 6)
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:length] for t in texts]
    return np.array(rows, dtype=np.int64)


def split_held_out(tokens: np.ndarray, held_out: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out): every (len/held_out)-th sequence is held out, so both span the book."""
    step = max(len(tokens) // held_out, 1)
    mask = np.zeros(len(tokens), dtype=bool)
    mask[::step][:held_out] = True
    return tokens[~mask], tokens[mask]


def _teacher_logits(
    teacher: Any, tokens: np.ndarray, batch: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first row, (B, L-1, V) fp32 logits) for each batch of ``tokens``."""
    import torch

    with torch.inference_mode():
        for i in range(0, len(tokens), batch):
            x = torch.from_numpy(tokens[i : i + batch])
            yield i, teacher(x).logits[:, :-1].float()


def teacher_log_probs(teacher: Any, tokens: np.ndarray, batch: int = 8) -> torch.Tensor:
    """(S, L-1, V) the teacher's full fp32 log-softmax at every next-token position."""
    import torch

    return torch.cat([lg.log_softmax(-1) for _, lg in _teacher_logits(teacher, tokens, batch)])


def build_datasets(
    teacher: Any,
    tokens: np.ndarray,
    specs: list[tuple[TargetSpec, int]],
    info: DatasetInfo,
    root: Path,
    batch: int = 8,
    context: int = 0,
) -> dict[tuple[TargetSpec, int], Path]:
    """One teacher pass over ``tokens``; every (spec, draws' seed) dataset written from it
    under ``root``.

    Each sequence is one example: prompt = its first token, response = the rest (bench_format's
    layout). Top-k, tail draws and draws come from ``cache.targets`` exactly as the capture
    computes them, keyed by example id, position and seed. With ``context`` C, the teacher reads
    whole sequences and the examples hold their last L - C tokens (context distillation).
    """
    import torch

    from logitcache.cache.targets import (
        STREAM_TARGETS,
        example_keys,
        log_probs,
        row_keys,
        sample_ids,
        topk_targets,
        uniforms,
    )
    from logitcache.cache.writer import DatasetWriter

    from .bench_format import _examples, _sampled

    P = tokens.shape[1] - context - 1
    # Example ids as _examples names them, keyed as the capture keys them (cache/capture.py).
    names = [f"r0-s{s}" for s in range(len(tokens))]
    keys = {seed: torch.from_numpy(example_keys(names, seed)) for _, seed in specs}  # (S,)
    parts: dict[tuple[TargetSpec, int], list[dict[str, np.ndarray]]] = {x: [] for x in specs}
    for first, logits in _teacher_logits(teacher, tokens, batch):
        logits = logits[:, context:]  # (B, P, V): the student's positions
        flat = logits.reshape(-1, logits.shape[-1])  # (B·P, V)
        pos = torch.arange(P).repeat(len(logits))
        logp = log_probs(flat, 1.0) if any(s.kind == "sampled" for s, _ in specs) else None
        plain: dict[int, Any] = {}  # top-k without draws, by k
        for spec, seed in specs:
            rows = keys[seed][first : first + len(logits)].repeat_interleave(P)
            u = None
            if spec.has_draws:
                u = uniforms(row_keys(rows, pos, STREAM_TARGETS), spec.n, spec.sampling)
            if spec.kind == "sampled":
                assert logp is not None and u is not None
                parts[spec, seed].append({"draws": sample_ids(logp, u).numpy()})
                continue
            if u is None:  # the codecs of one k share one top-k
                if spec.k not in plain:
                    plain[spec.k] = topk_targets(flat, spec.k, 1.0)
                t = plain[spec.k]
            else:
                t = topk_targets(flat, spec.k, 1.0, tail_uniforms=u)
            got = {"ids": t.ids.numpy(), "lp": t.logprobs.numpy(), "tail": t.tail.numpy()}
            if t.tail_draws is not None:
                got["draws"] = t.tail_draws.numpy()
            parts[spec, seed].append(got)
    out = {}
    for (spec, seed), chunks in parts.items():
        a = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        draws = _sampled(a["draws"]) if "draws" in a else None
        if spec.kind == "sampled":
            make: Callable[[slice], Any] = draws  # type: ignore[assignment]
        else:

            def make(sl: slice, a: dict[str, np.ndarray] = a, draws: Any = draws) -> TopK:
                tail = None if draws is None else draws(sl)
                return TopK(a["ids"][sl], a["lp"][sl], a["tail"][sl], tail)

        d = root / f"{spec.kind}-k{spec.k}-n{spec.n}-{spec.codec}-{spec.sampling}-s{seed}"
        with DatasetWriter(d, replace(info, targets=spec)) as w:
            for ex in _examples(tokens[:, context:], make):
                w.add(ex)
        out[spec, seed] = d
    return out


def token_bytes(examples: list[Example], info: DatasetInfo) -> int:
    """Bytes of a shard holding only the ids, prompts and responses (what hard labels need)."""
    import pyarrow as pa

    schema = pa.schema(list(info.schema())[:3])
    table = pa.table(
        {
            "id": [e.id for e in examples],
            "prompt_ids": [e.prompt_ids.tolist() for e in examples],
            "response_ids": [e.response_ids.tolist() for e in examples],
        },
        schema=schema,
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_table(table, max_chunksize=1024)
    return sink.getvalue().size


# --------------------------------------------------------------------------- training


def _config(v: Variant, data: Path, student: Path, out: Path, s: Settings) -> Config:
    from logitcache.train.config import (
        Config,
        DataConfig,
        LogConfig,
        LossConfig,
        ModelConfig,
        OptimConfig,
        TrainConfig,
    )

    cfg = Config(
        data=DataConfig(train=str(data), batch_size=s.batch_size, max_seq_len=4096),
        model=ModelConfig(path=str(student)),
        loss=LossConfig(alpha=0.0 if v.kind == "hard" else 1.0, tail=v.tail),
        optim=OptimConfig(lr=s.lr, warmup_steps=s.warmup_steps),
        train=TrainConfig(output=str(out), steps=s.steps, seed=v.seed, device="cpu"),
        log=LogConfig(progress=False),
    )
    problems = cfg.validate()
    if problems:
        raise ValueError("; ".join(problems))
    return cfg


def train_offline(
    v: Variant, data: Path, student: Path, out: Path, s: Settings
) -> tuple[Any, float]:
    """The project trainer on a stored dataset: (trained model, median step seconds)."""
    import torch
    from transformers import AutoModelForCausalLM

    from logitcache.train.trainer import FINAL_NAME, read_metrics, train

    train(_config(v, data, student, out, s))
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    model = AutoModelForCausalLM.from_pretrained(out / FINAL_NAME, dtype=torch.float32)
    return model, _median_step([r["tokens"] / r["tokens_per_s"] for r in steps])


def train_online(
    v: Variant,
    data: Path,
    student: Path,
    teacher: Any,
    out: Path,
    s: Settings,
    context_ids: np.ndarray | None = None,
) -> tuple[Any, float]:
    """Full-vocabulary forward KL with ``teacher`` in the loop, replicating the trainer's
    student, optimizer, schedule, clipping and data order (read from ``data``; its targets are
    ignored). ``context_ids`` (S, C): what the teacher reads before sequence s (example
    ``r0-s{s}``), never the student. Returns (trained model, median step seconds)."""
    import torch

    from logitcache.cache.reader import open_dataset
    from logitcache.train.student import Dist, DistillStudent, load_student, load_tokenizer
    from logitcache.train.trainer import lr_at, make_loader

    cfg = _config(v, data, student, out, s)
    info = open_dataset(data).info
    dist = Dist(0, 1, torch.device("cpu"))
    model = load_student(cfg, info)
    hidden_of = DistillStudent(model, cfg, info.targets.kind).hidden
    head = model.get_output_embeddings()
    o = cfg.optim
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        foreach=False,
    )
    pad_id = load_tokenizer(cfg).pad_token_id or 0  # as the trainer pads
    batches = iter(make_loader(cfg, str(data), info, dist, train=True, pad_id=pad_id))
    model.train()
    times = []
    for step in range(s.steps):
        t0 = time.perf_counter()
        b = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg, s.steps)
        ids, mask, pos = b.input_ids, b.attention_mask, b.positions
        if context_ids is not None:  # the teacher's view: its context, then the same tokens
            ctx = torch.from_numpy(context_ids[[int(i.rsplit("-s", 1)[1]) for i in b.ids]])
            T, C = ids.shape[1], ctx.shape[1]
            ids, mask = torch.cat([ctx, ids], 1), torch.cat([torch.ones_like(ctx), mask], 1)
            pos = pos // T * (C + T) + C + pos % T
        with torch.inference_mode():
            t_logits = teacher(input_ids=ids, attention_mask=mask).logits
            log_p = t_logits.flatten(0, 1).index_select(0, pos).float().log_softmax(-1)
        log_p = log_p.clone()  # (N, V), out of inference mode so autograd may read it
        log_q = head(hidden_of(b.input_ids, b.attention_mask, b.positions)).float().log_softmax(-1)
        kl = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none")
        kl.sum(-1).mean().backward()  # mean over positions of KL(p ‖ q), as the trainer's KD
        torch.nn.utils.clip_grad_norm_(params, o.grad_clip if o.grad_clip > 0 else math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return model, _median_step(times)


def _median_step(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


def evaluate_student(
    model: Any, tokens: np.ndarray, teacher_lp: torch.Tensor, batch: int = 8
) -> dict[str, float]:
    """Mean per position of KL(teacher ‖ student) over the full vocabulary, CE of the true next
    token and top-1 agreement with the teacher, on held-out ``tokens`` (S, L)."""
    import torch

    sums = np.zeros(3)
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(tokens), batch):
            x = torch.from_numpy(tokens[i : i + batch])
            log_q = model(x).logits[:, :-1].float().log_softmax(-1)  # (B, L-1, V)
            log_p = teacher_lp[i : i + batch]
            kl = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none")
            sums[0] += float(kl.sum(-1).double().sum())
            sums[1] -= float(log_q.gather(-1, x[:, 1:, None]).double().sum())
            sums[2] += float((log_q.argmax(-1) == log_p.argmax(-1)).sum())
    n = tokens.shape[0] * (tokens.shape[1] - 1)
    return {"kl": float(sums[0] / n), "ce": float(sums[1] / n), "top1": float(sums[2] / n)}


# --------------------------------------------------------------------------- the study


def run_study(
    teacher_dir: str | Path,
    student_dir: str | Path,
    train_tokens: np.ndarray,
    eval_tokens: np.ndarray,
    variants: list[Variant],
    settings: Settings,
    workdir: str | Path,
    log: Callable[[str], None] = print,
) -> tuple[list[Row], dict[str, float]]:
    """Train every variant and measure it; returns (rows, the untrained student's metrics)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from logitcache.cache.reader import open_dataset
    from logitcache.cache.tokenizer import tokenizer_fingerprint

    from .bench_format import _examples

    work = Path(workdir)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    info = DatasetInfo(
        vocab_size=teacher.config.vocab_size,
        tokenizer_fingerprint=tokenizer_fingerprint(tok),
        targets=TargetSpec("sampled", n=1),
        teacher={"name_or_path": str(teacher_dir)},
        capture={"temperature": 1.0, "mode": "score"},
    )
    t0 = time.perf_counter()
    specs = list(dict.fromkeys(v.dataset for v in variants))
    C = settings.context
    data = build_datasets(teacher, train_tokens, specs, info, work / "data", context=C)
    eval_lp = teacher_log_probs(teacher, eval_tokens)[:, C:]  # the teacher sees the context
    context_ids, train_tokens, eval_tokens = (
        train_tokens[:, :C],
        train_tokens[:, C:],
        eval_tokens[:, C:],
    )
    log(
        f"teacher pass over {len(train_tokens)} + {len(eval_tokens)} sequences: {time.perf_counter() - t0:.0f} s"
    )
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    initial = evaluate_student(student, eval_tokens, eval_lp)
    del student
    log(
        f"untrained student: KL {initial['kl']:.4f}  CE {initial['ce']:.4f}  top-1 {initial['top1']:.3f}"
    )
    hard_bytes = token_bytes(_examples(train_tokens, lambda sl: None), info)
    rows = []
    for v in variants:
        t0 = time.perf_counter()
        ds = data[v.dataset]
        out = work / "runs" / v.name.replace(" ", "_").replace("(", "").replace(")", "")
        if v.kind == "online":
            model, step_s = train_online(
                v, ds, Path(student_dir), teacher, out, settings, context_ids if C else None
            )
        else:
            model, step_s = train_offline(v, ds, Path(student_dir), out, settings)
        m = evaluate_student(model, eval_tokens, eval_lp)
        del model
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        shutil.rmtree(out / "final", ignore_errors=True)
        manifest = open_dataset(ds).manifest
        nbytes: float | None = manifest.num_bytes / manifest.num_positions
        if v.kind == "online":
            nbytes = None
        elif v.kind == "hard":
            nbytes = hard_bytes / manifest.num_positions
        unique = None
        if v.has_draws:
            unique = float(
                np.mean(
                    [len(b.sample_ids) / b.num_positions for b in open_dataset(ds).iter_batches()]
                )
            )
        rows.append(Row(v, nbytes, m["kl"], m["ce"], m["top1"], step_s, unique))
        log(
            f"{v.name:<28} KL {m['kl']:.4f}  CE {m['ce']:.4f}  top-1 {m['top1']:.3f}  "
            f"step {step_s:.2f} s  ({time.perf_counter() - t0:.0f} s)"
        )
    return rows, initial


def mean_rows(rows: list[Row]) -> list[tuple[Row, list[Row]]]:
    """One row per configuration, in first-seen order: the mean over its sample seeds (the
    variant with sample seed 0), with the runs it averages."""
    groups: dict[Variant, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.variant.config, []).append(r)
    out = []
    for config, runs in groups.items():
        if len(runs) == 1:
            out.append((replace(runs[0], variant=config), runs))
            continue

        def mean(key: str, runs: list[Row] = runs) -> Any:
            values = [getattr(r, key) for r in runs]
            return None if None in values else statistics.fmean(values)

        keys = ("bytes_per_position", "kl", "ce", "top1", "step_s", "unique_ids")
        out.append((Row(config, **{k: mean(k) for k in keys}), runs))
    return out


def reference(rows: list[Row]) -> Row:
    """The first online full-KD run: the others compare with it at its data-order seed."""
    return next(r for r in rows if r.variant.kind == "online")


def winner(rows: list[Row], tolerance: float = 0.01) -> Row | None:
    """The stored configuration whose held-out KL (mean over its sample seeds) is ≤
    (1 + tolerance) × online's (same data order), at the fewest bytes/position; None when no
    stored configuration gets there."""
    ref = reference(rows)
    ok = [
        r
        for r, _ in mean_rows(rows)
        if r.variant.kind in ("topk", "sampled")
        and r.variant.seed == ref.variant.seed
        and r.kl <= ref.kl * (1.0 + tolerance)
    ]
    return min(ok, key=lambda r: (r.bytes_per_position, r.kl), default=None)


def table(rows: list[Row], tolerance: float = 0.01) -> str:
    """The results as a Markdown table: configurations with draws as the mean over their
    sample seeds, with the range of KL ÷ online across them."""
    ref = reference(rows)
    lines = [
        "| configuration | B/position | held-out KL | KL ÷ online | over draws | CE | top-1 | step s | within 1%? |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r, runs in mean_rows(rows):
        b = "— (teacher in loop)" if r.bytes_per_position is None else f"{r.bytes_per_position:.1f}"
        if r.unique_ids is not None:
            b += f" (u={r.unique_ids:.1f})"
        is_ref = r.variant == ref.variant
        ok = "ref" if is_ref else ("yes" if r.kl <= ref.kl * (1 + tolerance) else "no")
        spread = "—"
        if len(runs) > 1:
            lo, hi = min(x.kl for x in runs) / ref.kl, max(x.kl for x in runs) / ref.kl
            spread = f"{len(runs)} runs: {lo:.3f}–{hi:.3f}"
        lines.append(
            f"| {r.variant.name} | {b} | {r.kl:.4f} | {r.kl / ref.kl:.3f} | {spread} | "
            f"{r.ce:.4f} | {r.top1:.3f} | {r.step_s:.2f} | {ok} |"
        )
    return "\n".join(lines)


def plot(
    rows: list[Row], initial: dict[str, float], png: str | Path, tolerance: float = 0.01
) -> None:
    """Held-out KL and CE against bytes/position (log x); online as a line with its tolerance
    band, online at other seeds dashed (the run-to-run noise), hard labels noted if off-scale.
    Configurations with draws are plotted at their mean, with a bar over their sample seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = reference(rows)
    means = [
        (r, runs)
        for r, runs in mean_rows(rows)
        if r.variant.seed == ref.variant.seed and r.bytes_per_position is not None
    ]
    same = [r for r, _ in means]
    topk = [r for r in same if r.variant.kind == "topk"]
    codec_k = {r.variant.k for r in topk if r.variant.codec != "u8"}
    series: dict[str, tuple[str, list[Row]]] = {
        "top-k + tail draws (u8)": ("*", [r for r in topk if r.variant.n > 0 and r.variant.sampling != "systematic"]),
        "top-k + tail draws, systematic (u8)": ("P", [r for r in topk if r.variant.n > 0 and r.variant.sampling == "systematic"]),
        "top-k, tail bucket (u8)": ("o", [r for r in topk if r.variant.tail == "bucket" and r.variant.codec == "u8"]),
        "top-k, renormalized (u8)": ("s", [r for r in topk if r.variant.tail == "renorm"]),
        "top-k codecs, bucket": ("D", [r for r in topk if r.variant.k in codec_k and r.variant.tail == "bucket"]),
        "sampled N": ("^", [r for r in same if r.variant.kind == "sampled" and r.variant.sampling != "systematic"]),
        "sampled N, systematic": ("v", [r for r in same if r.variant.kind == "sampled" and r.variant.sampling == "systematic"]),
        "hard labels": ("x", [r for r in same if r.variant.kind == "hard"]),
    }  # fmt: skip
    others = [r for r in rows if r.variant.kind == "online" and r is not ref]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, key in zip(axes, ("kl", "ce"), strict=True):
        y = getattr(ref, key)
        shown = [getattr(r, key) for r in same if r.variant.kind != "hard"]
        shown += [getattr(x, key) for r, runs in means if r.variant.kind != "hard" for x in runs]
        shown += [y] + [getattr(r, key) for r in others]
        lo, hi = min(shown), max(shown)
        lo, hi = lo - 0.05 * (hi - lo + 1e-3), hi + 0.08 * (hi - lo + 1e-3)
        for label, (marker, rs) in series.items():
            rs = sorted(rs, key=lambda r: r.bytes_per_position or 0.0)
            xs, ys = [r.bytes_per_position for r in rs], [getattr(r, key) for r in rs]
            ax.plot(xs, ys, marker=marker, label=label, alpha=0.85)
            for r, x_, y_ in zip(rs, xs, ys, strict=True):
                v = r.variant
                codec_tag = "" if v.codec == "u8" else v.codec  # its k is marked already
                tag = {"topk": f"k={v.k}" + (f"+{v.n}" if v.n else "") if label.endswith("(u8)") else codec_tag,
                       "sampled": f"N={v.n}", "hard": "hard"}[v.kind]  # fmt: skip
                if y_ > hi:  # off-scale: say where it is
                    tag, y_ = f"hard labels: {getattr(r, key):.2f} ↑", hi
                ax.annotate(tag, (x_, min(y_, hi)), fontsize=7, xytext=(3, -9 if y_ >= hi else 3),
                            textcoords="offset points")  # fmt: skip
        for r, runs in means:
            if len(runs) > 1:
                vals = [getattr(x, key) for x in runs]
                ax.vlines(r.bytes_per_position, min(vals), max(vals), color="0.4", lw=1)
        ax.axhline(y, color="k", lw=1, label=f"online full KD (seed {ref.variant.seed})")
        ax.axhspan(y, y * (1 + tolerance), color="k", alpha=0.12, label=f"online + {tolerance:.0%}")
        for r in others:
            ax.axhline(getattr(r, key), color="k", lw=1, ls="--",
                       label=f"online full KD, seed {r.variant.seed}")  # fmt: skip
        ax.axvline(16, color="g", ls=":", lw=1, label="goal: 16 B")
        ax.axvline(36, color="r", ls=":", lw=1, label="RS-KD: ~36 B")
        ax.set_xscale("log")
        ax.set_ylim(lo, hi)
        ax.set(xlabel="bytes / position (zstd shards, tokens included)",
               ylabel=f"held-out {key.upper()} (nats)")  # fmt: skip
    axes[0].set_title("KL(teacher ‖ student) over the full vocabulary")
    axes[1].set_title("cross-entropy of the true next token")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8)
    fig.suptitle(
        "Same student, data order and steps for every point; bars: the range over sample seeds "
        f"(untrained student: KL {initial['kl']:.2f}, CE {initial['ce']:.2f})",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(png, dpi=110)
    plt.close(fig)


def save_rows(rows: list[Row], initial: dict[str, float], path: str | Path) -> None:
    """Write what :func:`load_rows` reads."""
    rows_json = [{**asdict(r), "name": r.variant.name} for r in rows]
    Path(path).write_text(json.dumps({"initial": initial, "rows": rows_json}, indent=1))


def load_rows(path: str | Path) -> tuple[list[Row], dict[str, float]]:
    """Rows and the untrained student's metrics from a ``--json`` file."""
    obj = json.loads(Path(path).read_text())
    rows = []
    for d in obj["rows"]:
        fields = {k: v for k, v in d.items() if k not in ("variant", "name")}
        rows.append(Row(Variant(**d["variant"]), **fields))
    return rows, obj["initial"]


def merge_rows(
    results: list[tuple[list[Row], dict[str, float]]],
) -> tuple[list[Row], dict[str, float]]:
    """Rows of several invocations of the same setup as one list, in first-seen order; a
    variant measured again replaces its earlier row. The setups must agree: the untrained
    student's metrics (same teacher, student and held-out text) must match."""
    initial = results[0][1]
    merged: dict[Variant, Row] = {}
    for rows, init in results:
        if not all(math.isclose(init[k], initial[k], rel_tol=1e-6) for k in ("kl", "ce")):
            raise SystemExit(
                f"--replot: the files measure different setups (untrained student KL "
                f"{initial['kl']:.6f} vs {init['kl']:.6f}); merge only runs of one setup"
            )
        for r in rows:
            merged[r.variant] = r
    return list(merged.values()), initial


QUICK = {
    "train_seqs": 64,
    "eval_seqs": 16,
    "ks": "8",
    "draws": "16",
    "tail_draws": "8:8",
    "sample_seeds": "0",
    "codecs": "u8",
    "noise_seeds": "",
}
"""What --quick changes: one size of each kind, one seed of draws, no codec sweep, no noise
seed."""


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _pairs(text: str) -> tuple[tuple[int, int], ...]:
    """ "8:16,16:16" → ((8, 16), (16, 16))."""
    return tuple((int(a), int(b)) for a, b in (x.split(":") for x in text.split(",") if x))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--teacher", help="HF model folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--student-layers", default="0,10,20,29", help="teacher layers kept")
    ap.add_argument("--train-seqs", type=int, default=192, help="training sequences")
    ap.add_argument("--eval-seqs", type=int, default=32, help="held-out sequences")
    ap.add_argument("--length", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--context-tokens", type=int, default=0,
                    help="context distillation: the teacher also reads the C tokens of the "
                    "passage before each sequence, the student never does")  # fmt: skip
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps; 0 = one epoch")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    ap.add_argument("--ks", default="8,32,64", help="top-k sizes (u8, both tails)")
    ap.add_argument("--draws", default="8,16,32,64", help="sampled-target sizes N")
    ap.add_argument("--tails", default="bucket,renorm", help="top-k tail modes")
    ap.add_argument("--samplings", default="multinomial", help="sampled draw schemes (, separated)")
    ap.add_argument("--tail-draws", default="8:8,8:16,16:16,32:16,16:32,32:32,64:16",
                    help="top-k + tail draws as K:N pairs (, separated)")  # fmt: skip
    ap.add_argument("--sample-seeds", default="0,1,2",
                    help="seeds of the draws: each configuration with draws trains once per seed")  # fmt: skip
    ap.add_argument("--hard", action=argparse.BooleanOptionalAction, default=True,
                    help="include the hard-label run")  # fmt: skip
    ap.add_argument("--codecs", default="f32,f16,u16,u8", help="codecs compared at --codec-k")
    ap.add_argument("--codec-k", type=int, default=8, help="k of the codec comparison")
    ap.add_argument("--seed", type=int, default=0, help="data-order seed of every run")
    ap.add_argument("--noise-seeds", default="1", help="extra data-order seeds of online KD")
    ap.add_argument("--tolerance", type=float, default=0.01, help="relative KL margin")
    ap.add_argument("--quick", action="store_true", help=f"smaller study: {QUICK}")
    ap.add_argument("--workdir", help="datasets and runs go here (default: a temp dir)")
    ap.add_argument("--json", help="also write the rows as JSON here (with --replot: the merge)")
    ap.add_argument("--plot", default="docs/fidelity.png", help="PNG of quality vs bytes")
    ap.add_argument("--replot", metavar="JSON", nargs="+",
                    help="only redraw table and plot from --json files (several: merged, a "
                    "variant in a later file replacing the same variant in an earlier one)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.replot:
        rows, initial = merge_rows([load_rows(p) for p in args.replot])
        print(table(rows, args.tolerance))
        plot(rows, initial, args.plot, args.tolerance)
        if args.json:
            save_rows(rows, initial, args.json)
        return
    if args.quick:
        vars(args).update(QUICK)

    import torch
    from transformers import AutoTokenizer

    from .teachers import ensure_smollm2

    t0 = time.perf_counter()
    torch.manual_seed(0)
    teacher = args.teacher or str(ensure_smollm2())
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fidelity-"))
    tok = AutoTokenizer.from_pretrained(teacher)
    C = args.context_tokens
    tokens = kjv_tokens(tok, args.train_seqs + args.eval_seqs, C + args.length)
    train_tokens, eval_tokens = split_held_out(tokens, args.eval_seqs)
    steps = args.steps or math.ceil(len(train_tokens) / args.batch_size)
    settings = Settings(steps=steps, batch_size=args.batch_size, lr=args.lr, context=C)
    student = make_student(teacher, _ints(args.student_layers), work / "student")
    variants = default_variants(
        _ints(args.ks), _ints(args.draws), args.codecs.split(","), args.codec_k,
        _ints(args.noise_seeds), tuple(args.tails.split(",")), tuple(args.samplings.split(",")),
        args.hard, args.seed, _pairs(args.tail_draws), tuple(_ints(args.sample_seeds)),
    )  # fmt: skip
    print(
        f"teacher {teacher}; student: its layers {args.student_layers}; "
        f"{len(train_tokens)} train + {len(eval_tokens)} held-out KJV sequences of "
        f"{args.length} tokens"
        + (f" (the teacher also reads the {C} tokens before each)" if C else "")
        + f"; {steps} steps of {args.batch_size}; lr {args.lr}; "
        f"{len(variants)} runs; workdir {work}"
    )
    rows, initial = run_study(teacher, student, train_tokens, eval_tokens, variants, settings, work)
    print()
    print(table(rows, args.tolerance))
    ref, best = reference(rows), winner(rows, args.tolerance)
    for r in rows:
        if r.variant.kind == "online" and r is not ref:
            print(
                f"online KL, seed {r.variant.seed} vs {ref.variant.seed}: "
                f"{(r.kl - ref.kl) / ref.kl:+.2%}"
            )
    if best is None:
        print(f"no stored configuration is within {args.tolerance:.0%} of online full KD")
    else:
        print(
            f"winner: {best.variant.name}, {best.bytes_per_position:.1f} B/position, "
            f"KL ÷ online {best.kl / ref.kl:.4f}"
        )
    if args.json:
        save_rows(rows, initial, args.json)
    if args.plot:
        plot(rows, initial, args.plot, args.tolerance)
        print(f"plot: {args.plot}")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
