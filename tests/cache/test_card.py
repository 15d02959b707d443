"""The dataset card finalize writes: README.md beside the manifest, with the dataset's numbers."""

from __future__ import annotations

import json

from logitcache.cache.capture import capture
from logitcache.cache.card import MARK
from logitcache.cache.manifest import finalize
from logitcache.cache.storage import Location
from logitcache.cache.verify import verify_dataset
from logitcache.tools.cli import main

from .synth import make_examples, make_info
from .test_capture import make_cfg, records, write_jsonl


def _front_matter(card: str) -> str:
    assert card.startswith("---\n")
    return card.split("---\n")[1]


def test_capture_writes_a_card_with_its_numbers(tmp_path, tiny_teacher_dir, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", records(6))
    cfg = make_cfg(
        prompts, tiny_teacher_dir, tmp_path / "ds", targets=dict(k=4, n=0, codec="u16"),
        run=dict(license="cc-by-4.0"),
    )  # fmt: skip
    capture(cfg)
    ds = tmp_path / "ds"
    m = json.loads((ds / "manifest.json").read_text())
    card = (ds / "README.md").read_text()
    front = _front_matter(card)
    assert 'license: "cc-by-4.0"' in front
    assert "size_categories:\n- n<1K" in front and "path: shard-*.arrow" in front
    assert MARK in card
    assert f"| teacher | `{m['teacher']['name_or_path']}`" in card
    assert f"fingerprint `{m['tokenizer']['fingerprint']}`, vocabulary 384" in card
    assert "| targets | per response token: top-4 ids + log-probs (u16) + tail mass |" in card
    assert f"| size | 6 examples, {m['num_positions']} response positions, 1 shard, " in card
    assert f"(prompts: {prompts})" in card
    assert "| teacher view | chat rendering, context: none |" in card
    assert json.loads((ds / "capture_config.json").read_text())["run"]["license"] == "cc-by-4.0"
    report = verify_dataset(ds)
    assert not report.problems and not report.warnings


def test_card_leaves_inspect_and_stats_unchanged(tmp_path, capsys):
    from logitcache.cache.writer import DatasetWriter

    info = make_info("topk")
    ds = tmp_path / "ds"
    with DatasetWriter(ds, info, shard_positions=80) as w:
        for ex in make_examples(info, 10):
            w.add(ex)
    card = (ds / "README.md").read_text()
    assert "license" not in _front_matter(card)  # no --license: none stated
    assert "| size | 10 examples, " in card
    outputs = []
    for _ in range(2):
        assert main(["inspect", str(ds)]) == 0 and main(["stats", str(ds)]) == 0
        assert main(["verify", str(ds)]) == 0
        outputs.append(capsys.readouterr().out)
        (ds / "README.md").unlink(missing_ok=True)
    assert outputs[0] == outputs[1]
    assert "warning" not in outputs[0]


def test_finalize_keeps_a_hand_written_card(tmp_path):
    from logitcache.cache.writer import DatasetWriter

    info = make_info("topk")
    ds = tmp_path / "ds"
    with DatasetWriter(ds, info) as w:
        w.add(make_examples(info, 1)[0])
    (ds / "README.md").write_text("# our own card\n")
    finalize(Location(ds))
    assert (ds / "README.md").read_text() == "# our own card\n"
