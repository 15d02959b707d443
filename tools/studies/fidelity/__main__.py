"""The fidelity study's command line: ``python -m logitcache.tools.studies.fidelity --help``."""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from .. import fidelity
from .inputs import kjv_tokens, make_student, split_held_out
from .report import load_rows, merge_rows, plot, reference, save_rows, table, winner
from .study import run_study
from .variants import Settings, default_variants

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


def _adaptive(text: str) -> tuple[tuple[float, int, int, float, int], ...]:
    """ "0.9:32:32:64,0.95:16:16:0:2" → ((0.9, 32, 32, 64.0, 1), (0.95, 16, 16, 0.0, 2))."""
    out = []
    for item in (x for x in text.split(",") if x):
        parts = item.split(":")
        if len(parts) not in (4, 5):
            raise SystemExit(f"--adaptive {item!r}: expected MASS:K:N:RATE[:KMIN]")
        mass, k, n, rate = float(parts[0]), int(parts[1]), int(parts[2]), float(parts[3])
        out.append((mass, k, n, rate, int(parts[4]) if len(parts) == 5 else 1))
    return tuple(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m logitcache.tools.studies.fidelity",
        description=fidelity.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    ap.add_argument("--adaptive", default="",
                    help="adaptive targets as MASS:K:N:RATE[:KMIN] (, separated): the fewest ids "
                    "holding MASS (0: all K), at most K; min(N, round(RATE·tail mass)) tail "
                    "draws (RATE 0: N each); e.g. 0.9:32:32:64")  # fmt: skip
    ap.add_argument("--sample-seeds", default="0,1,2",
                    help="seeds of the draws: each configuration with draws trains once per seed")  # fmt: skip
    ap.add_argument("--online", action=argparse.BooleanOptionalAction, default=True,
                    help="include the online run (--no-online: merge with one that has it, "
                    "by --replot)")  # fmt: skip
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
        if args.plot:  # --plot "": no plot (matplotlib would write ".png")
            plot(rows, initial, args.plot, args.tolerance)
        if args.json:
            save_rows(rows, initial, args.json)
        return
    if args.quick:
        vars(args).update(QUICK)

    import torch
    from transformers import AutoTokenizer

    from ...teachers import ensure_smollm2

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
        _adaptive(args.adaptive),
    )  # fmt: skip
    if not args.online:
        variants = [v for v in variants if v.kind != "online"]
    print(
        f"teacher {teacher}; student: its layers {args.student_layers}; "
        f"{len(train_tokens)} train + {len(eval_tokens)} held-out KJV sequences of "
        f"{args.length} tokens"
        + (f" (the teacher also reads the {C} tokens before each)" if C else "")
        + f"; {steps} steps of {args.batch_size}; lr {args.lr}; "
        f"{len(variants)} runs; workdir {work}"
    )
    rows, initial = run_study(teacher, student, train_tokens, eval_tokens, variants, settings, work)
    if not any(r.variant.kind == "online" for r in rows):  # no reference here: keep the rows
        if args.json:
            save_rows(rows, initial, args.json)
        print(f"no online run: merge with one that has it (--replot BASE.json {args.json})")
        return
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
