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
