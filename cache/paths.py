"""Local output paths the user names (folders, plot files): checked before any work is done,
and their missing parent folders made when they are written.

A run must not end in an error (or lose what it computed) because of where it was told to
write: every command checks its output paths up front with :func:`output_problem` (and
:func:`plot_problem` for a plot) and writes a file with :func:`make_parents` first.
"""

from __future__ import annotations

import os
from pathlib import Path


def output_problem(path: str | os.PathLike[str], name: str, *, folder: bool) -> str | None:
    """Why ``path`` cannot be written as an output folder (``folder``) or file, or None.

    Refused: an existing file given as a folder, an existing folder given as a file, and a
    path under an existing file. Missing parent folders are fine (:func:`make_parents`
    makes them); fsspec URLs (``s3://...``) are not checked. ``name`` is the path as the user
    typed it, flag and all (``--out DIR``, ``train.output='DIR'``)."""
    text = os.fspath(path)
    if "://" in text:
        return None
    p = Path(text)
    above = next((a for a in p.parents if a.exists()), None)
    if above is not None and not above.is_dir():
        return (
            f"{name}: {above} is a file, not a folder, so nothing can be written under "
            "it; choose a path under a folder (or move the file away)"
        )
    if folder and p.exists() and not p.is_dir():
        return (
            f"{name} is an existing file, not a folder; choose a new folder name (or "
            "move the file away)"
        )
    if not folder and p.is_dir():
        return f"{name} is a folder; name a file in it, e.g. {p / 'plot.png'}"
    return None


def plot_problem(path: str | os.PathLike[str], name: str) -> str | None:
    """Why the plot file ``path`` cannot be written, or None: :func:`output_problem`,
    matplotlib missing, or a file extension it cannot write (the format comes from it)."""
    problem = output_problem(path, name, folder=False)
    if problem is not None:
        return problem
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        return f"{name} needs matplotlib: pip install 'logitcache[plot]'"
    suffix = Path(path).suffix.lower().lstrip(".")
    known = FigureCanvasBase.get_supported_filetypes()
    if suffix not in known:
        return (
            f"{name}: matplotlib cannot tell the image format from "
            f"{'no extension' if not suffix else 'the extension .' + suffix}; end the name "
            f"with one of .{', .'.join(sorted(known))} (e.g. .png)"
        )
    return None


def make_parents(path: str | os.PathLike[str]) -> Path:
    """``path``, once the folders above it exist (made as needed)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p
