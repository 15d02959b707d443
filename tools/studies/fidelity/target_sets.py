"""The teacher's one pass over the study's text, and every stored target set written from it.

The targets are the capture's own: :func:`~logitcache.cache.targets.assemble_targets` on the
teacher's logits at the response positions, keyed by example id, position and seed as
`logitcache build` keys them, and cut into examples by the engine's :class:`BatchResult` as
capture cuts them. So a dataset here
holds what `logitcache build` would store for the same text, and its bytes are real shard bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from logitcache.cache.format import DatasetInfo, Example, TargetSpec

from ...corpus import sequence_examples

if TYPE_CHECKING:
    import torch

    from logitcache.cache.capture_config import TargetConfig


def _teacher_logits(
    teacher: Any, tokens: np.ndarray, batch: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first row, (B, L-1, V) fp32 logits) for each batch of ``tokens``."""
    import torch

    with torch.inference_mode():
        for i in range(0, len(tokens), batch):
            x = torch.from_numpy(tokens[i : i + batch])
            yield i, teacher(x).logits[:, :-1].float()


def teacher_log_probs(teacher: Any, tokens: np.ndarray, batch: int = 8) -> torch.Tensor:
    """(S, L-1, V) the teacher's full fp32 log-softmax at every next-token position."""
    import torch

    return torch.cat([lg.log_softmax(-1) for _, lg in _teacher_logits(teacher, tokens, batch)])


def _capture_targets(spec: TargetSpec) -> TargetConfig:
    """What `logitcache build` is asked for to store ``spec`` at temperature 1 (the codec
    aside: the writer applies it, so the codecs of one target set share its targets)."""
    from logitcache.cache.capture_config import TargetConfig

    # Without draws the sampling scheme is recorded as None and never used.
    sampling = spec.sampling or "multinomial"
    return TargetConfig(spec=replace(spec, codec="u8", sampling=sampling))


def build_datasets(
    teacher: Any,
    tokens: np.ndarray,
    specs: list[tuple[TargetSpec, int]],
    info: DatasetInfo,
    root: Path,
    batch: int = 8,
    context: int = 0,
) -> dict[tuple[TargetSpec, int], Path]:
    """One teacher pass over ``tokens``; every (spec, draws' seed) dataset written from it
    under ``root``.

    Each sequence is one example (:func:`sequence_examples`: prompt = its first token, response
    = the rest). With ``context`` C, the teacher reads whole sequences and the examples hold
    their last L - C tokens (context distillation).
    """
    import torch

    from logitcache.cache.engine import BatchResult
    from logitcache.cache.targets import assemble_targets, example_keys
    from logitcache.cache.views import Rendered
    from logitcache.cache.writer import DatasetWriter

    P = tokens.shape[1] - context - 1
    # The student's view of each sequence; its id keys the draws, as the capture keys them.
    seqs = sequence_examples(tokens[:, context:], lambda sl: None)
    views = [Rendered(e.id, "", e.prompt_ids, e.prompt_ids, e.response_ids) for e in seqs]
    responses = [e.response_ids for e in seqs]
    keys = {seed: example_keys([e.id for e in seqs], seed) for _, seed in specs}  # (S,)
    examples: dict[tuple[TargetSpec, int], list[Example]] = {x: [] for x in specs}
    # A dataset already written under root for the same targets (an earlier run with this
    # --workdir) is kept; the teacher runs only for the others, and not at all without any.
    out = {x: dataset_dir(root, *x) for x in specs if _written(dataset_dir(root, *x), x[0])}
    specs = [x for x in specs if x not in out]
    examples = {x: examples[x] for x in specs}
    for first, logits in _teacher_logits(teacher, tokens if specs else tokens[:0], batch):
        logits = logits[:, context:]  # (B, P, V): the student's positions
        flat = logits.reshape(-1, logits.shape[-1])  # (B·P, V)
        pos = torch.arange(P).repeat(len(logits))  # (B·P,)
        here = slice(first, first + len(logits))
        done: dict[tuple[TargetConfig, int], list[Example]] = {}
        for spec, seed in specs:
            cfg = _capture_targets(spec)
            if (cfg, seed) not in done:
                rows = torch.from_numpy(keys[seed][here]).repeat_interleave(P)  # (B·P,)
                targets = assemble_targets(flat.clone(), cfg, rows, pos)  # may overwrite logits
                result = BatchResult(views[here], responses[here], targets)
                done[cfg, seed] = result.to_examples()
            examples[spec, seed] += done[cfg, seed]
    for (spec, seed), exs in examples.items():
        d = dataset_dir(root, spec, seed)
        with DatasetWriter(d, replace(info, targets=spec)) as w:
            for ex in exs:
                w.add(ex)
        out[spec, seed] = d
    return out


def dataset_dir(root: Path, spec: TargetSpec, seed: int) -> Path:
    """The folder of one (targets, draws' seed) dataset: every field of the targets in its
    name, so that two target sets never share one."""
    name = f"{spec.kind}-k{spec.k}-n{spec.n}-{spec.codec}-{spec.sampling}"
    if spec.k_mass is not None:
        name += f"-mass{spec.k_mass:g}-kmin{spec.k_min}"
    if spec.n_rate is not None:
        name += f"-rate{spec.n_rate:g}"
    return root / f"{name}-s{seed}"


def _written(path: Path, spec: TargetSpec) -> bool:
    """Whether ``path`` holds a finished dataset of exactly ``spec``."""
    from logitcache.cache.errors import LogitCacheError
    from logitcache.cache.reader import open_dataset

    try:
        return open_dataset(path).info.targets == spec
    except (LogitCacheError, OSError):
        return False


def token_bytes(examples: list[Example], info: DatasetInfo) -> int:
    """Bytes of a shard holding only the ids, prompts and responses (what hard labels need)."""
    import pyarrow as pa

    schema = pa.schema(list(info.schema())[:3])
    table = pa.table(
        {
            "id": [e.id for e in examples],
            "prompt_ids": [e.prompt_ids.tolist() for e in examples],
            "response_ids": [e.response_ids.tolist() for e in examples],
        },
        schema=schema,
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_table(table, max_chunksize=1024)
    return sink.getvalue().size
