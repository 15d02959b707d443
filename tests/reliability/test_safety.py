"""Safety: nothing is unpickled, no remote code by default, paths and permissions are confined."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from logitcache.cache.reader import open_dataset
from logitcache.cache.writer import DatasetWriter
from logitcache.tools.synth import snapshot, synth_examples, synth_info

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("cache", "train", "tools", "tests")

# Calls that can run code hidden in a file they load.
UNPICKLERS = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "cPickle.loads",
    "_pickle.load", "_pickle.loads", "dill.load", "dill.loads", "cloudpickle.load",
    "cloudpickle.loads", "joblib.load", "pd.read_pickle", "pandas.read_pickle", "shelve.open",
    "marshal.load", "marshal.loads", "yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all",
}  # fmt: skip
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Every call in ``source`` that could unpickle, run remote code or evaluate text."""
    found = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module in {"pickle", "cPickle", "dill"}
            and any(a.name in {"load", "loads", "Unpickler"} for a in node.names)
        ):
            found.append(f"{filename}:{node.lineno}: from {node.module} import load")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        where = f"{filename}:{node.lineno}: {name}"
        if name in UNPICKLERS or name in {"eval", "exec"}:
            found.append(where)
        elif name == "torch.load":
            w = _kw(node, "weights_only")
            if not (isinstance(w, ast.Constant) and w.value is True):
                found.append(f"{where} without weights_only=True")
        elif name in {"np.load", "numpy.load"}:
            a = _kw(node, "allow_pickle")
            if isinstance(a, ast.Constant) and a.value is True:
                found.append(f"{where} with allow_pickle=True")
        elif name in {"yaml.load", "yaml.load_all"}:
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or _dotted(loader).split(".")[-1] not in SAFE_YAML_LOADERS:
                found.append(f"{where} without a safe Loader")
        t = _kw(node, "trust_remote_code")
        if isinstance(t, ast.Constant) and t.value is True:
            found.append(f"{where} with trust_remote_code=True")
    return found


def test_the_scanner_finds_what_it_looks_for() -> None:
    bad = """
import pickle, torch, yaml, numpy as np
from transformers import AutoModel
pickle.loads(b"")
torch.load("x.bin")
torch.load("x.bin", weights_only=False)
np.load("a.npy", allow_pickle=True)
yaml.load(open("c.yaml"))
eval("1 + 1")
AutoModel.from_pretrained("m", trust_remote_code=True)
"""
    good = """
import torch, yaml, numpy as np, ast
torch.load("x.pt", weights_only=True)
np.load("a.npy")
yaml.load(open("c.yaml"), Loader=yaml.SafeLoader)
yaml.safe_load("a: 1")
ast.literal_eval("[1]")
model.eval()
"""
    assert len(unsafe_calls(bad)) == 7
    assert unsafe_calls(good) == []


def test_no_code_ever_unpickles_or_trusts_remote_code() -> None:
    files = [p for d in SOURCES for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 40
    found = [hit for p in files for hit in unsafe_calls(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == []


def test_remote_code_is_off_by_default_in_capture_and_train() -> None:
    from logitcache.cache.capture_config import TeacherConfig
    from logitcache.tools.cli import build_parser
    from logitcache.train.config import Config

    assert TeacherConfig(path="teacher").trust_remote_code is False
    argv = ["build", "--teacher", "t", "--prompts", "p.jsonl", "--out", "o"]
    assert build_parser(argv).parse_args(argv).trust_remote_code is False
    assert (
        build_parser([*argv, "--trust-remote-code"])
        .parse_args([*argv, "--trust-remote-code"])
        .trust_remote_code
    )
    # Training has no switch for it at all: students load with transformers' default (off).
    flat = {f"{s}.{k}": v for s, fields in Config().to_dict().items() for k, v in fields.items()}
    assert not [k for k in flat if "remote_code" in k]


def _modes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode)
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077], ids=["022", "002", "077"])
def test_written_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    info = synth_info("topk")
    old = os.umask(umask)
    try:
        with DatasetWriter(tmp_path / "ds", info, shard_positions=50) as w:
            for ex in synth_examples(info, 12):
                w.add(ex)
    finally:
        os.umask(old)
    modes = _modes(tmp_path / "ds")
    assert {"manifest.json", "_parts/w0.json"} <= set(modes)
    assert sum(name.startswith("shard-") for name in modes) >= 2
    assert not [n for n in modes if ".tmp-" in n]
    # Shards, journal and manifest get the mode open() would give them (0o644 under the usual
    # umask): atomic writes go through mkstemp's 0o600 files, which would otherwise hide a
    # dataset from the training job's user, or ignore a private umask of 0o077.
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_a_manifest_checksum_cannot_steer_the_shard_cache_outside_its_folder(tmp_path) -> None:
    pytest.importorskip("fsspec.implementations.memory")
    info = synth_info("topk")
    url = f"memory://{tmp_path.name}/ds"  # a remote-like filesystem: the reader caches shards
    with DatasetWriter(url, info, shard_positions=1000) as w:
        for ex in synth_examples(info, 8):
            w.add(ex)
    reference = snapshot(url)
    import fsspec

    fs = fsspec.filesystem("memory")
    manifest = json.loads(fs.cat_file(f"/{tmp_path.name}/ds/manifest.json"))
    entry = manifest["shards"][0]
    cache = tmp_path / "cache"
    cache.mkdir()
    planted = tmp_path / "planted.arrow"  # what "../planted" resolves to from the cache
    planted.write_bytes(b"\0" * entry["bytes"])
    entry["sha256"] = "../planted"
    fs.pipe_file(f"/{tmp_path.name}/ds/manifest.json", json.dumps(manifest).encode())
    # The planted file is never read: the shard comes from storage (and fails verification).
    assert snapshot(url, cache_dir=cache) == reference
    assert not any(p.name.startswith("..") for p in cache.iterdir())
    with pytest.raises(Exception, match="sha256"):
        list(open_dataset(url, cache_dir=cache, verify=True).iter_batches())
    assert (
        hashlib.sha256(planted.read_bytes()).hexdigest()
        == hashlib.sha256(b"\0" * entry["bytes"]).hexdigest()
    )
