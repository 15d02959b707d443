"""What every run of the fidelity study starts from: the student (layers of the teacher) and the
token sequences of real text, split into training and held-out sets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def make_student(teacher_dir: str | Path, layers: list[int], out: str | Path) -> Path:
    """A student of the teacher's ``layers`` (in order), embeddings, final norm and lm_head."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in layers]
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for key, value in teacher.state_dict().items():
        if ".layers." not in key:
            state[key] = value
            continue
        head, rest = key.split(".layers.", 1)
        index, tail = rest.split(".", 1)
        if int(index) in layers:
            state[f"{head}.layers.{layers.index(int(index))}.{tail}"] = value
    student.load_state_dict(state, strict=True)
    student.save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out)
    return Path(out)


def kjv_tokens(tokenizer: Any, count: int, length: int) -> np.ndarray:
    """(count, length) token ids of KJV passages spread over the whole book."""
    from ...corpus import kjv_passages

    texts = kjv_passages(count, min_chars=length * 6)
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:length] for t in texts]
    return np.array(rows, dtype=np.int64)


def split_held_out(tokens: np.ndarray, held_out: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out): every (len/held_out)-th sequence is held out, so both span the book."""
    step = max(len(tokens) // held_out, 1)
    mask = np.zeros(len(tokens), dtype=bool)
    mask[::step][:held_out] = True
    return tokens[~mask], tokens[mask]
