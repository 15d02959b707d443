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
with the capture's own target assembly (``cache.targets.assemble_targets``), written with
:class:`DatasetWriter` and trained on with ``train(Config)``, so bytes/position are real shard
bytes and codec error is in the loop. Quality is measured on held-out text against the
teacher's *full* distribution: mean KL(teacher ‖ student) per position, cross-entropy of the
true next token, and top-1 agreement. A configuration "reaches online quality" when its
held-out KL is at most ``(1 + tolerance)`` times the online run's.

    python -m logitcache.tools.studies.fidelity          # SmolLM2 on KJV: 16 runs, ~1 h on 2 shared cores
    python -m logitcache.tools.studies.fidelity --quick  # 5 runs on fewer sequences
    python -m logitcache.tools.studies.fidelity --replot results.json   # table and plot only
    python -m logitcache.tools.studies.fidelity --replot a.json b.json  # runs of several invocations

Results and how to read them: docs/RESULTS.md. Modules: ``variants`` (what is compared),
``inputs`` (student and text), ``target_sets`` (the teacher pass and the datasets written from
it), ``runs`` (training one variant, measuring a student), ``study`` (all of it), ``report``
(means, the winner, the table, the plot, JSON); ``__main__`` holds the command line.
"""

from .inputs import kjv_tokens, make_student, split_held_out
from .report import (
    load_rows,
    mean_rows,
    merge_rows,
    plot,
    reference,
    save_rows,
    table,
    winner,
)
from .runs import evaluate_student, train_offline, train_online
from .study import run_study
from .target_sets import build_datasets, teacher_log_probs, token_bytes
from .variants import Row, Settings, Variant, default_variants

__all__ = [
    "Row",
    "Settings",
    "Variant",
    "build_datasets",
    "default_variants",
    "evaluate_student",
    "kjv_tokens",
    "load_rows",
    "make_student",
    "mean_rows",
    "merge_rows",
    "plot",
    "reference",
    "run_study",
    "save_rows",
    "split_held_out",
    "table",
    "teacher_log_probs",
    "token_bytes",
    "train_offline",
    "train_online",
    "winner",
]
