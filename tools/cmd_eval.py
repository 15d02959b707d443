"""`logitcache eval --student DIR [--student DIR ...] --data HELDOUT`: students on held-out targets.

KL to the teacher (at the dataset's capture temperature; on sampled targets the cross-entropy to
the teacher's draws, KL + the teacher's entropy, labelled so), CE and top-1 agreement per student;
with --generate, their greedy answers beside the teacher's stored responses; with --expect, the
share of answers matching a regex. Writes report.md, kl.png and report.json (see logitcache.train.report).
"""

from __future__ import annotations

import argparse

HELP = "score students on a held-out logit dataset (KL, CE, top-1, answers) into a report"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--student",
        action="append",
        required=True,
        metavar="DIR",
        help="a student folder saved with save_pretrained, e.g. <train.output>/final; "
        "repeat the flag to compare several (the teacher's own folder scores the untrained start)",
    )
    p.add_argument(
        "--data",
        required=True,
        metavar="HELDOUT",
        help="held-out logit dataset (folder or fsspec URL) from `logitcache build`, "
        "never trained on",
    )
    p.add_argument(
        "--generate",
        action="store_true",
        help="also generate each student's greedy answers to the held-out prompts and show "
        "them beside the teacher's stored responses",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=64,
        metavar="N",
        help="longest generated answer, in tokens (default 64; with --generate)",
    )
    p.add_argument(
        "--expect",
        metavar="REGEX",
        help="report the share of answers in which this Python regex is found (re.search; "
        "'^Ahoy' asks for an opening); implies --generate",
    )
    p.add_argument(
        "--out",
        default="eval-report",
        metavar="DIR",
        help="folder for report.md, kl.png and report.json (default eval-report)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        metavar="N",
        help="examples per scoring batch (default 8; the same as training's data.batch_size "
        "gives the KL its run logged)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the students run (default auto: cuda when torch sees one)",
    )


def run(args: argparse.Namespace) -> int:
    from logitcache.cache.errors import InputError
    from logitcache.train.metrics import kl_label
    from logitcache.train.report import check_plot_available, evaluate_students, write_report

    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise InputError(
            f"--max-new-tokens {args.max_new_tokens} / --batch-size {args.batch_size}: "
            "both must be at least 1"
        )
    check_plot_available()
    result = evaluate_students(
        [(s, s) for s in args.student],
        args.data,
        generate=args.generate or args.expect is not None,
        max_new_tokens=args.max_new_tokens,
        expect=args.expect,
        batch_size=args.batch_size,
        device=args.device,
        out=args.out,
    )
    label = kl_label(result.kl_includes_teacher_entropy)
    for s in result.students:
        m = s.metrics
        kl = "n/a" if m["kl"] is None else f"{m['kl']:.4f}"
        ce = "n/a" if m["ce"] is None else f"{m['ce']:.4f}"
        top1 = "n/a" if m["top1"] is None else f"{m['top1']:.3f}"
        line = f"{s.name}: {label} {kl}  CE {ce}  top-1 {top1}"
        if s.expect_rate is not None:
            line += f"  {args.expect!r} found in {s.expect_rate:.0%} of answers"
        print(line)
    if result.teacher_expect_rate is not None:
        print(
            f"teacher (stored responses): {args.expect!r} found in {result.teacher_expect_rate:.0%}"
        )
    md, png = write_report(result, args.out)
    print(f"wrote {md} and {png}")
    return 0
