"""Output paths checked before any work: a file given as a folder, a path under a file, a
folder given as a plot file, and a plot name matplotlib cannot tell the format of."""

from __future__ import annotations

import pytest

from logitcache.cache.errors import InputError
from logitcache.cache.export import export_dataset
from logitcache.cache.paths import make_parents, output_problem, plot_problem

from .test_export import _dataset


def test_an_output_path_that_can_be_made_is_fine_and_its_parents_are_made(tmp_path):
    assert output_problem(tmp_path / "a" / "b", "--out a/b", folder=True) is None
    assert output_problem(tmp_path / "a" / "b.png", "--plot a/b.png", folder=False) is None
    assert output_problem("s3://bucket/x", "--out s3://bucket/x", folder=True) is None
    assert plot_problem(tmp_path / "a" / "b.png", "--plot a/b.png") is None
    path = make_parents(tmp_path / "a" / "b" / "c.png")
    assert path.parent.is_dir() and not path.exists()


def test_a_file_a_folder_or_a_path_under_a_file_is_refused_naming_it(tmp_path):
    (tmp_path / "score.jsonl").write_text("{}\n")
    (tmp_path / "plots").mkdir()
    f, d = tmp_path / "score.jsonl", tmp_path / "plots"
    assert output_problem(f, "--out score.jsonl", folder=True) == (
        "--out score.jsonl is an existing file, not a folder; choose a new folder name (or "
        "move the file away)"
    )
    assert output_problem(f / "a" / "b", "--out score.jsonl/a/b", folder=True) == (
        f"--out score.jsonl/a/b: {f} is a file, not a folder, so nothing can be written under "
        "it; choose a path under a folder (or move the file away)"
    )
    assert output_problem(d, "--plot plots", folder=False) == (
        f"--plot plots is a folder; name a file in it, e.g. {d / 'plot.png'}"
    )
    for name, seen in (("loss", "no extension"), ("loss.xyz", "the extension .xyz")):
        problem = plot_problem(d / name, f"--plot plots/{name}")
        assert problem is not None and problem.startswith(
            f"--plot plots/{name}: matplotlib cannot tell the image format from {seen}; end "
            "the name with one of "
        )
        assert ", .png, " in problem


def test_export_into_a_file_or_under_one_is_refused(tmp_path):
    src = _dataset(tmp_path / "ds")
    (tmp_path / "score.jsonl").write_text("{}\n")
    with pytest.raises(InputError, match=r"score.jsonl is an existing file, not a folder"):
        export_dataset(src, tmp_path / "score.jsonl")
    with pytest.raises(InputError, match=r"score.jsonl is a file, not a folder, so nothing"):
        export_dataset(src, tmp_path / "score.jsonl" / "x")
