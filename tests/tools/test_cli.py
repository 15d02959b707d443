"""The command line's own behaviour: how flags are parsed and refused, before any command runs."""

from __future__ import annotations

import pytest

from logitcache.tools.cli import main


@pytest.mark.parametrize("argv", [["verify", "ds", "--bogus"], ["train", "--bogus"]])
def test_an_unknown_flag_is_reported_with_the_commands_usage(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: logitcache {argv[0]} " in err
    assert f"logitcache {argv[0]}: error: unrecognized arguments: --bogus" in err


@pytest.mark.parametrize("flag", ["-n", "--positions"])
@pytest.mark.parametrize("value", ["-1", "two"])
def test_inspect_refuses_counts_below_zero(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect", "ds", flag, value])
    assert e.value.code == 2
    assert f"expected a whole number ≥ 0, got '{value}'" in capsys.readouterr().err


def test_output_cut_short_by_the_reader_is_not_an_error_trace(tmp_path):
    """`logitcache inspect DS | head -1`: the pipe closes early; no traceback, exit 141."""
    import subprocess
    import sys

    from logitcache.cache.writer import DatasetWriter

    from ..cache.synth import make_examples, make_info

    info = make_info("topk")
    with DatasetWriter(tmp_path / "ds", info) as w:
        for ex in make_examples(info, 200):
            w.add(ex)
    more = ["-n", "200", "--positions", "1000"]  # more than a pipe holds: the write must fail
    cmd = [sys.executable, "-m", "logitcache.tools.cli", "inspect", str(tmp_path / "ds"), *more]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # as `head -1` does after its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_inspect_names_a_tokenizer_folder_that_does_not_load(tmp_path, capsys):
    from logitcache.cache.writer import DatasetWriter

    from ..cache.synth import make_examples, make_info

    info = make_info("topk")
    with DatasetWriter(tmp_path / "ds", info) as w:
        for ex in make_examples(info, 3):
            w.add(ex)
    assert main(["inspect", str(tmp_path / "ds"), "--tokenizer", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"logitcache inspect: error: --tokenizer {tmp_path / 'nope'}: no tok")
    assert "give the folder of the dataset's tokenizer" in err
