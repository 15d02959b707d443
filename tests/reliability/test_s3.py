"""Datasets on S3 (moto on 127.0.0.1) through a proxy that fails requests on purpose.

Transient failures are retried (by botocore, s3fs and logitcache's own ``retry``) and leave
the dataset exactly as written: nothing lost, nothing duplicated. A failure that persists is an
OSError naming the operation and the object. Figures: `python -m logitcache.tools.reliability s3`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

from logitcache.cache import storage
from logitcache.cache.reader import committed_ids, open_dataset
from logitcache.cache.verify import verify_dataset
from logitcache.tools.reliability.s3 import FlakyS3, transient_policy
from logitcache.tools.synth import snapshot, synth_examples, synth_info, write_synth

INFO = synth_info("topk", k=8)
EXAMPLES = synth_examples(INFO, 40, seed=7)


@pytest.fixture(scope="module")
def s3():
    with FlakyS3() as flaky:
        flaky.make_bucket("bucket")
        yield flaky


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list:
    local = tmp_path_factory.mktemp("local") / "ds"
    write_synth(local, INFO, EXAMPLES, shard_positions=100)
    return snapshot(local)


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """logitcache's retry without its sleeps (the attempts are what is under test)."""
    monkeypatch.setattr(storage, "time", SimpleNamespace(sleep=lambda s: None))


def objects(s3: FlakyS3, prefix: str) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem(**s3.storage_options(direct=True))
    return sorted(p.removeprefix(f"bucket/{prefix}/") for p in fs.find(f"bucket/{prefix}"))


def s3_read(s3: FlakyS3, key: str) -> bytes:
    import s3fs

    return s3fs.S3FileSystem(**s3.storage_options(direct=True)).cat_file(f"bucket/{key}")


def test_transient_failures_lose_and_duplicate_nothing(s3, reference, tmp_path, no_backoff) -> None:
    from logitcache.train.stream import LogitStream

    s3.policy = transient_policy  # every object: its first 2-3 requests fail, one way or another
    # botocore's own retries (and their seconds of backoff) off: s3fs and logitcache recover.
    so = s3.storage_options(botocore_attempts=1)
    url = "s3://bucket/flaky"
    write_synth(url, INFO, EXAMPLES, shard_positions=100, storage_options=so)
    injected = s3.injected()
    assert injected["500-after"] > 0 and injected["reset"] > 0 and injected["503"] > 0

    cache = tmp_path / "cache"
    assert snapshot(url, storage_options=so, cache_dir=cache) == reference  # bit for bit
    report = verify_dataset(url, storage_options=so)
    assert report.ok and not report.warnings and report.examples == len(EXAMPLES)
    shards = [s["file"] for s in json.loads(s3_read(s3, "flaky/manifest.json"))["shards"]]
    # A PUT applied but reported failed was simply repeated: no stray or extra objects.
    assert objects(s3, "flaky") == sorted(["manifest.json", "README.md", "_parts/w0.json", *shards])
    assert committed_ids(url, so) == {e.id for e in EXAMPLES}

    # The trainer's stream reads it once each, from the local copies now in the cache.
    gets = Counter(m for m, k, *_ in s3.requests if k.endswith(".arrow"))["GET"]
    stream = LogitStream(url, seed=0, shuffle_buffer=8, storage_options=so, cache_dir=cache)
    ids = [item.example.id for item in stream.items(0, 1)]
    assert sorted(ids) == sorted(e.id for e in EXAMPLES)
    assert Counter(m for m, k, *_ in s3.requests if k.endswith(".arrow"))["GET"] == gets


def test_logitcache_retries_on_its_own(s3, reference, no_backoff) -> None:
    # botocore retries switched off: each request is one attempt, so only logitcache retries.
    so = s3.storage_options(botocore_attempts=1)
    s3.policy = lambda method, key, n: "pass"
    write_synth("s3://bucket/own", INFO, EXAMPLES, shard_positions=100, storage_options=so)
    s3.policy = lambda m, key, n: (
        "500" if m == "GET" and key.endswith(".arrow") and n <= 3 else "pass"
    )
    assert snapshot("s3://bucket/own", storage_options=so) == reference
    tries = Counter(k for m, k, *_ in s3.requests if m == "GET" and k.startswith("bucket/own/sh"))
    assert set(tries.values()) == {4}  # three failures, then success, for every shard


def with_one_dead_shard(s3: FlakyS3, name: str, so: dict) -> str:
    """Write the dataset to s3://bucket/<name>, then fail every GET of its second shard with
    a 500; returns that shard's key."""
    s3.policy = lambda method, key, n: "pass"
    write_synth(f"s3://bucket/{name}", INFO, EXAMPLES, shard_positions=100, storage_options=so)
    bad = f"bucket/{name}/shard-w0-000001.arrow"
    s3.policy = lambda method, key, n: "500" if method == "GET" and key == bad else "pass"
    return bad


def test_a_persistent_failure_names_the_object(s3, no_backoff) -> None:
    so = s3.storage_options(botocore_attempts=1)
    bad = with_one_dead_shard(s3, "down", so)
    with pytest.raises(OSError, match=rf"reading s3://{bad}: failed 5 times .*check the network"):
        list(open_dataset("s3://bucket/down", storage_options=so).iter_batches())
    assert sum(1 for m, k, *_ in s3.requests if m == "GET" and k == bad) >= 5
    report_error = None
    try:
        verify_dataset("s3://bucket/down", storage_options=so)
    except OSError as e:
        report_error = str(e)
    assert report_error is not None and bad in report_error


def test_verify_downloads_each_shard_once(s3, no_backoff) -> None:
    so = s3.storage_options()
    s3.policy = lambda method, key, n: "pass"
    write_synth("s3://bucket/once", INFO, EXAMPLES, shard_positions=100, storage_options=so)
    before = len(s3.requests)
    report = verify_dataset("s3://bucket/once", storage_options=so)
    assert report.ok and report.shards >= 2
    gets = Counter(k for m, k, *_ in s3.requests[before:] if m == "GET" and k.endswith(".arrow"))
    assert len(gets) == report.shards and set(gets.values()) == {1}


def test_a_dead_endpoint_is_reported_after_logitcache_retries_alone(s3, no_backoff) -> None:
    # Default options: logitcache turns botocore's retry layer off, so a persistent 500 costs
    # 5 requests (logitcache's attempts), not 25 (botocore × logitcache).
    so = s3.storage_options()
    assert "config_kwargs" not in so
    bad = with_one_dead_shard(s3, "dead", so)
    with pytest.raises(OSError, match=rf"reading s3://{bad}: failed 5 times"):
        list(open_dataset("s3://bucket/dead", storage_options=so).iter_batches())
    assert sum(1 for m, k, *_ in s3.requests if m == "GET" and k == bad) == 5
    # A caller's own botocore retry setting is left alone.
    mine = {"config_kwargs": {"retries": {"max_attempts": 9}}}
    assert storage.with_default_retries("s3://b/x", mine) == mine
    assert storage.with_default_retries("/local/x", {}) == {}


def test_capture_to_s3_through_failures(
    s3, tmp_path: Path, tiny_teacher_dir: Path, no_backoff
) -> None:
    from dataclasses import replace

    from logitcache.cache.capture import capture
    from logitcache.cache.capture_config import (
        DEFAULT_TARGETS,
        CaptureConfig,
        InputConfig,
        RunConfig,
        TargetConfig,
        TeacherConfig,
    )
    from logitcache.tools.reliability.crashes import write_prompts

    prompts = write_prompts(tmp_path / "p.jsonl", 12)
    s3.policy = transient_policy
    so = s3.storage_options(botocore_attempts=1)

    def cfg(out: str) -> CaptureConfig:
        return CaptureConfig(
            input=InputConfig(prompts=(str(prompts),)),
            teacher=TeacherConfig(path=str(tiny_teacher_dir), device="cpu"),
            run=RunConfig(out=out, max_batch_tokens=256, shard_positions=64, progress=False),
            targets=TargetConfig(spec=replace(DEFAULT_TARGETS, kind="topk", k=4, codec="f32")),
        )

    summary = capture(cfg("s3://bucket/captured"), storage_options=so)
    assert summary.finalized and summary.dataset_examples == 12
    capture(cfg(str(tmp_path / "local")))
    remote = open_dataset("s3://bucket/captured", storage_options=so, verify=True)
    got = {e.id: e for e in remote.iter_examples()}
    want = {e.id: e for e in open_dataset(tmp_path / "local").iter_examples()}
    assert sorted(got) == sorted(want) and len(got) == 12
    for i, e in want.items():
        assert (got[i].response_ids == e.response_ids).all()
        assert (got[i].targets.ids == e.targets.ids).all()
    assert verify_dataset("s3://bucket/captured", storage_options=so).ok
    assert s3.injected()["500-after"] > 0
