"""The dataset subcommands: verify, inspect, stats, merge, finalize, through the real CLI entry."""

from __future__ import annotations

import json

import numpy as np
import pytest

from logitcache.cache.reader import open_dataset
from logitcache.cache.writer import DatasetWriter
from logitcache.tools.cli import main

from ..cache.synth import make_examples, make_info


def _dataset(path, kind="topk", prefix="ex", teacher="tiny-teacher", count=12, **kw):
    info = make_info(kind, teacher=teacher, **kw)
    with DatasetWriter(path, info, shard_positions=80) as w:
        for ex in make_examples(info, count, prefix=prefix):
            w.add(ex)
    return path


def test_verify_ok(tmp_path, capsys):
    ds = _dataset(tmp_path / "ds")
    assert main(["verify", str(ds)]) == 0
    m = open_dataset(ds)
    out = capsys.readouterr().out
    assert out == f"ok: {len(m.shards)} shards, 12 examples, {m.num_positions} positions\n"
    one = _dataset(tmp_path / "one", count=1)
    assert main(["verify", str(one)]) == 0
    assert capsys.readouterr().out.startswith("ok: 1 shard, 1 example, ")


def test_verify_names_each_problem(tmp_path, capsys):
    ds = _dataset(tmp_path / "ds")
    shards = sorted(ds.glob("shard-*.arrow"))
    shards[0].unlink()
    data = bytearray(shards[1].read_bytes())
    data[200] ^= 1
    shards[1].write_bytes(bytes(data))
    assert main(["verify", str(ds)]) == 1
    out = capsys.readouterr().out
    assert f"problem: {shards[0].name}: file: expected present, found missing" in out
    assert f"problem: {shards[1].name}: sha256: expected " in out
    assert "FAILED: 2 problem(s)" in out


def test_verify_duplicate_ids(tmp_path, capsys):
    ds = _dataset(tmp_path / "ds")
    info = make_info("topk")
    w = DatasetWriter(ds, info, writer_id="again")
    for ex in make_examples(info, 2):  # same ids as the first writer's
        w.add(ex)
    w.close()
    assert main(["verify", str(ds)]) == 1
    assert (
        "shard-w0-000000.arrow: id: expected unique ids, found 'ex0' also in shard-again-000000.arrow"
        in capsys.readouterr().out
    )


def test_verify_missing_manifest(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 1
    assert "manifest.json not found" in capsys.readouterr().out


def test_inspect_and_stats(tmp_path, capsys):
    ds = _dataset(tmp_path / "ds")
    assert main(["inspect", str(ds), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "targets      top-8 ids + log-probs (u8) + tail mass" in out
    assert "example 'ex0'" in out
    plot = tmp_path / "stats.png"
    assert main(["stats", str(ds), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "top-k mass coverage mean" in out
    assert plot.stat().st_size > 1000


def test_stats_header_counts_in_words_and_the_plot_folders_are_made(tmp_path, capsys):
    ds = _dataset(tmp_path / "ds", count=3)
    plot = tmp_path / "deep" / "er" / "s.png"
    assert main(["stats", str(ds), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{ds}: 3 examples, ") and ", 1 shard, top-8 " in out
    assert plot.stat().st_size > 1000


def test_stats_refuses_bad_flags_before_reading(tmp_path, capsys):
    ds = _dataset(tmp_path / "ds", count=3)
    (tmp_path / "f.txt").write_text("x")
    assert main(["stats", str(ds), "--max-positions", "-5", "--plot", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "--max-positions -5: must be at least 1 (the positions sampled for coverage" in err
    assert f"--plot {tmp_path} is a folder; name a file in it, e.g. {tmp_path}/plot.png" in err
    assert main(["stats", str(ds), "--max-positions", "0"]) == 1
    assert "--max-positions 0: must be at least 1" in capsys.readouterr().err
    assert main(["stats", str(ds), "--plot", str(tmp_path / "f.txt" / "s.png")]) == 1
    assert "f.txt is a file, not a folder" in capsys.readouterr().err


def test_inspect_sampled(tmp_path, capsys):
    ds = _dataset(tmp_path / "ds", kind="sampled", n=12)
    assert main(["inspect", str(ds), "-n", "1"]) == 0
    assert "12 multinomial sampled draws per position" in capsys.readouterr().out


def test_inspect_stats_verify_and_merge_top_k_with_tail_draws(tmp_path, capsys):
    a = _dataset(tmp_path / "a", k=4, tail_draws=10, prefix="a")
    b = _dataset(tmp_path / "b", k=4, tail_draws=10, prefix="b")
    assert main(["inspect", str(a), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "top-4 ids + log-probs (u8) + tail mass + 10 multinomial draws from the tail" in out
    assert main(["stats", str(a)]) == 0
    out = capsys.readouterr().out
    assert "ids (k + draws)     mean " in out
    assert "tail draws          mean 10.000  p10 10  p50 10" in out
    # Every figure starts in one column, whatever its label.
    figures = [ln for ln in out.splitlines()[1:] if not ln.startswith("response token among")]
    assert {ln[19] for ln in figures} == {" "} and all(ln[20] != " " for ln in figures)
    assert "top-k ids kept" not in out  # every position keeps k = 4
    assert main(["merge", str(tmp_path / "m"), str(a), str(b)]) == 0
    assert main(["verify", str(tmp_path / "m")]) == 0
    merged = {e.id: e for e in open_dataset(tmp_path / "m").iter_examples()}
    for e in open_dataset(a).iter_examples():
        np.testing.assert_array_equal(merged[e.id].targets.tail_draws.ids, e.targets.tail_draws.ids)
    # A merge refuses to mix top-k with and without tail draws, as any other spec change.
    c = _dataset(tmp_path / "c", k=4, prefix="c")
    assert main(["merge", str(tmp_path / "m2"), str(a), str(c)]) == 1


def test_merge(tmp_path, capsys):
    a = _dataset(tmp_path / "a", prefix="a")
    b = _dataset(tmp_path / "b", prefix="b")
    assert main(["merge", str(tmp_path / "m"), str(a), str(b)]) == 0
    m = open_dataset(tmp_path / "m", verify=True)
    assert m.num_examples == 24
    assert sorted(e.id for e in m.iter_examples()) == sorted(
        [e.id for e in open_dataset(a).iter_examples()]
        + [e.id for e in open_dataset(b).iter_examples()]
    )
    assert main(["verify", str(tmp_path / "m")]) == 0


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"kind": "sampled"}, r"incompatible: targets top-8 u8 vs sampled n=16\. Datasets merge"),
        ({"codec": "f16"}, r"incompatible: targets top-8 u8 vs top-8 f16\. Datasets merge when"),
        (
            {"teacher": "other"},
            r"teacher 'tiny-teacher' vs 'other' \(pass --allow-different-teachers",
        ),
        ({"vocab": 2000}, r"vocab_size 1000 vs 2000"),
    ],
)
def test_merge_refuses_incompatible(tmp_path, capsys, kw, match):
    import re

    a = _dataset(tmp_path / "a", prefix="a")
    b = _dataset(tmp_path / "b", prefix="b", **kw)
    assert main(["merge", str(tmp_path / "m"), str(a), str(b)]) == 1
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "m" / "manifest.json").exists()


def test_merge_names_targets_the_label_does_not_tell_apart(tmp_path, capsys):
    from dataclasses import replace

    a = _dataset(tmp_path / "a", prefix="a", tail_draws=4)
    info = make_info("topk", tail_draws=4)
    info = replace(info, targets=replace(info.targets, sampling="systematic"))
    with DatasetWriter(tmp_path / "b", info) as w:
        for ex in make_examples(info, 3, prefix="b"):
            w.add(ex)
    assert main(["merge", str(tmp_path / "m"), str(a), str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert "incompatible: targets sampling=multinomial vs sampling=systematic. Datasets" in err
    assert "targets (kind, k, n, codec, sampling, k_mass, k_min, n_rate) and capture" in err


def test_merge_refuses_an_input_named_twice(tmp_path, capsys):
    a = _dataset(tmp_path / "a")
    assert main(["merge", str(tmp_path / "m"), str(a), f"{tmp_path}/./a/"]) == 1
    err = capsys.readouterr().err
    assert f"merge: {a} and {tmp_path}/./a/ are the same dataset ({a}), named twice; give" in err
    assert not (tmp_path / "m").exists()


def test_merge_into_an_existing_file_is_refused(tmp_path, capsys):
    a, b = _dataset(tmp_path / "a", prefix="a"), _dataset(tmp_path / "b", prefix="b")
    (tmp_path / "score.jsonl").write_text("{}\n")
    assert main(["merge", str(tmp_path / "score.jsonl"), str(a), str(b)]) == 1
    assert (
        f"logitcache merge: error: OUT {tmp_path}/score.jsonl is an existing file, not a folder; "
        "choose a new folder name"
    ) in capsys.readouterr().err
    assert (tmp_path / "score.jsonl").read_text() == "{}\n"


def test_merge_different_teachers_when_asked(tmp_path):
    a = _dataset(tmp_path / "a", prefix="a")
    b = _dataset(tmp_path / "b", prefix="b", teacher="other")
    assert main(["merge", str(tmp_path / "m"), str(a), str(b), "--allow-different-teachers"]) == 0
    m = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert [s["teacher"]["name_or_path"] for s in m["extra"]["merged_from"]] == [
        "tiny-teacher",
        "other",
    ]
    assert open_dataset(tmp_path / "m", verify=True).num_examples == 24


def test_merge_refuses_duplicate_ids(tmp_path, capsys):
    a = _dataset(tmp_path / "a")
    b = _dataset(tmp_path / "b")
    assert main(["merge", str(tmp_path / "m"), str(a), str(b)]) == 1
    assert "example id 'ex0' is in both" in capsys.readouterr().err


def test_finalize_command(tmp_path, capsys):
    info = make_info("topk")
    for r in range(2):
        w = DatasetWriter(tmp_path / "ds", info, writer_id=f"r{r}")
        for ex in make_examples(info, 3, prefix=f"{r}-"):
            w.add(ex)
        w.close(finalize_dataset=False)
    assert main(["finalize", str(tmp_path / "ds")]) == 0
    assert "6 examples" in capsys.readouterr().out
    assert open_dataset(tmp_path / "ds").num_examples == 6


def test_finalize_publishes_an_unfinished_writer_only_with_partial(tmp_path, capsys):
    info = make_info("topk")
    done = DatasetWriter(tmp_path / "ds", info, writer_id="r0")
    for ex in make_examples(info, 3, prefix="0-"):
        done.add(ex)
    done.close(finalize_dataset=False)
    stopped = DatasetWriter(tmp_path / "ds", info, writer_id="r1")
    for ex in make_examples(info, 2, prefix="1-"):
        stopped.add(ex)
    stopped.flush()  # committed, then the process dies: never closed
    assert main(["finalize", str(tmp_path / "ds")]) == 1
    err = capsys.readouterr().err
    assert "_parts/r1.json holds 2 examples but its writer has not finished its share" in err
    assert f"`logitcache finalize {tmp_path / 'ds'} --partial` to publish the 5 examples" in err
    assert not (tmp_path / "ds" / "manifest.json").exists()
    assert main(["finalize", str(tmp_path / "ds"), "--partial"]) == 0
    assert f"finalized {tmp_path / 'ds'} (partial): " in capsys.readouterr().out
    assert open_dataset(tmp_path / "ds").num_examples == 5
    assert main(["verify", str(tmp_path / "ds")]) == 0  # a warning still names the writer
    assert "warning: the capture is not complete: _parts/r1.json" in capsys.readouterr().out


def test_inspect_and_stats_of_a_dataset_without_positions(tmp_path, capsys):
    # A per-position figure over zero positions is not 0: it is left out, or "n/a".
    ds = _dataset(tmp_path / "ds", count=0)
    assert main(["inspect", str(ds)]) == 0
    out = capsys.readouterr().out
    assert "0 examples, 0 positions" in out and "B/position" not in out
    assert main(["stats", str(ds)]) == 0
    out = capsys.readouterr().out
    assert "top-k mass coverage n/a" in out and "0.0" not in out


def test_inspect_adaptive_shows_each_positions_kept_ids_and_draws(tmp_path, capsys):
    from dataclasses import replace

    from logitcache.cache.format import TargetSpec

    from ..cache.test_adaptive import adaptive_examples

    spec = TargetSpec("topk", k=12, n=16, codec="u8", sampling="systematic", k_mass=0.85,
                      n_rate=24.0)  # fmt: skip
    info = replace(make_info("topk", k=12, n=16, vocab=300, tail_draws=16), targets=spec)
    examples = [e for e in adaptive_examples(spec, 30, 300) if e.num_positions >= 3]
    with DatasetWriter(tmp_path / "ds", info) as w:
        w.add(examples[0])
    assert main(["inspect", str(tmp_path / "ds"), "-n", "1", "--positions", "3"]) == 0
    out = capsys.readouterr().out
    assert "targets      top-k (k = 1 to 12: the fewest holding 0.85 of the mass) ids" in out
    assert "size         1 example, " in out and " positions, 1 shard, " in out
    t = examples[0].targets
    lines = [ln for ln in out.splitlines() if ln.startswith("  [")]
    assert len(lines) == 3
    for j, line in enumerate(lines):  # the kept ids only (at most 5 shown), never the padding
        kept = int(t.counts[j])
        assert f"(k={kept}); tail " in line
        assert line.split(": ", 1)[1].split(" (k=")[0].count(",") == min(kept, 5) - 1
        draws = int(
            t.tail_draws.counts[t.tail_draws.nunique[:j].sum() :][: t.tail_draws.nunique[j]].sum()
        )
        assert (f", {draws} draws: " if draws else ", no draws") in line
    assert main(["stats", str(tmp_path / "ds")]) == 0
    out = capsys.readouterr().out
    kept = np.asarray(t.counts, float)
    assert f"top-k ids kept      mean {kept.mean():.3f}" in out
    assert "tail draws          mean " in out
