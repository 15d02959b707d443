"""Session-wide tiny tokenizer and models: built once locally, never downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from logitcache.tools.tiny import make_tiny_model, make_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with the tiny byte-level BPE tokenizer (vocab 384) and its chat template."""
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    make_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """Random Llama teacher: 2 layers, hidden 64, with the tiny tokenizer saved alongside."""
    out = tmp_path_factory.mktemp("tiny_teacher")
    return make_tiny_model(out, tiny_tokenizer_dir, layers=2, hidden=64, seed=0)


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """Random Llama student: 2 layers, hidden 32, same tokenizer as the teacher."""
    out = tmp_path_factory.mktemp("tiny_student")
    return make_tiny_model(out, tiny_tokenizer_dir, layers=2, hidden=32, seed=1)
