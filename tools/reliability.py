"""Reliability trials (GitHub issue 6): corruption, flaky object storage, crashes, memory.

Each subcommand prints the figures that docs/RELIABILITY.md quotes:

    python -m logitcache.tools.reliability flips --all-footer-bits  # bit flips: verify vs plain
    python -m logitcache.tools.reliability s3             # S3 (moto) behind a fault-injecting proxy
    python -m logitcache.tools.reliability capture-crash  # SIGKILL `logitcache build`, rerun it
    python -m logitcache.tools.reliability train-crash    # SIGKILL `logitcache train`, --resume
    python -m logitcache.tools.reliability rss            # peak RSS streaming 1×/10×/100× buffer

Everything runs locally (moto serves S3 on 127.0.0.1; the models are tools/tiny.py's) and
nothing is downloaded. torch is imported only by the subcommands that capture, train or stream.
tests/reliability/ imports the helpers (synthetic datasets, bit flips, ``FlakyS3``, crash runs).
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from logitcache.cache.errors import LogitCacheError
from logitcache.cache.format import DatasetInfo, Example, Sampled, TargetSpec, TopK
from logitcache.cache.reader import open_dataset
from logitcache.cache.verify import verify_dataset
from logitcache.cache.writer import DatasetWriter

# --------------------------------------------------------------------------- synthetic data


def synth_info(
    kind: str = "topk", *, k: int = 8, n: int = 16, codec: str = "u8", vocab: int = 1000
) -> DatasetInfo:
    return DatasetInfo(
        vocab_size=vocab,
        tokenizer_fingerprint="sha256:" + "ab" * 32,
        targets=TargetSpec(
            kind, k=k if kind == "topk" else 0, n=n if kind == "sampled" else 0, codec=codec
        ),  # type: ignore[arg-type]
        teacher={"name_or_path": "synthetic", "revision": None, "config_hash": "0" * 8},
        capture={"temperature": 1.0, "mode": "score"},
    )


def synth_examples(
    info: DatasetInfo, count: int, *, max_len: int = 24, seed: int = 0, prefix: str = "ex"
) -> list[Example]:
    """Peaked random targets, cheap enough for 10^5 examples (no full-vocabulary softmax)."""
    rng = np.random.default_rng(seed)
    spec, V = info.targets, info.vocab_size
    out = []
    for i in range(count):
        P = int(rng.integers(1, max_len + 1))
        targets: TopK | Sampled
        if spec.kind == "topk":
            k = spec.k
            gaps = rng.integers(1, max(2, V // (2 * k)), size=(P, k))  # distinct ascending ids
            ids = rng.integers(0, V // 2, size=(P, 1)) + np.cumsum(gaps, axis=1)
            logits = rng.normal(size=(P, k + 1)) * 2.0
            logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)  # k ids + tail
            targets = TopK(ids, logp[:, :k].astype(np.float32), logp[:, k].astype(np.float32))
        else:
            nunique = rng.integers(1, min(spec.n, 8) + 1, size=P)
            ids = np.concatenate([np.sort(rng.choice(V, u, replace=False)) for u in nunique])
            counts = np.concatenate(
                [1 + rng.multinomial(spec.n - u, np.full(u, 1.0 / u)) for u in nunique]
            )
            targets = Sampled(ids, counts, nunique)
        prompt = rng.integers(0, V, size=int(rng.integers(1, 9)))
        out.append(Example(f"{prefix}{i}", prompt, rng.integers(0, V, size=P), targets))
    return out


def write_synth(
    url: str | Path,
    info: DatasetInfo,
    examples: list[Example],
    *,
    shard_positions: int,
    storage_options: dict[str, Any] | None = None,
) -> None:
    with DatasetWriter(
        url, info, shard_positions=shard_positions, batch_rows=8, storage_options=storage_options
    ) as w:
        for ex in examples:
            w.add(ex)


def snapshot(url: str | Path, **open_kwargs: Any) -> list[tuple[Any, ...]]:
    """Every decoded example as bytes, in stored order: equal snapshots are bit-for-bit equal."""
    rows = []
    for ex in open_dataset(url, **open_kwargs).iter_examples():
        t = ex.targets
        arrays = (
            (t.ids, t.logprobs, t.tail_logmass)
            if isinstance(t, TopK)
            else (t.ids, t.counts, t.nunique)
        )
        rows.append(
            (
                ex.id,
                *(
                    np.ascontiguousarray(a).tobytes()
                    for a in (ex.prompt_ids, ex.response_ids, *arrays)
                ),
            )
        )
    return rows


# --------------------------------------------------------------------------- bit flips


def read_outcome(url: str | Path, reference: list[tuple[Any, ...]], *, verify: bool) -> str:
    """How reading a damaged dataset ends: ``error`` (a named LogitCacheError), ``silent``
    (wrong data, no error), ``harmless`` (the same data) or ``foreign:<Type>`` (another error)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy casts of garbage
            got = snapshot(url, verify=verify)
    except LogitCacheError:
        return "error"
    except Exception as e:
        return f"foreign:{type(e).__name__}"
    return "harmless" if got == reference else "silent"


def in_child(fn: Callable[[], str]) -> str:
    """Run ``fn`` in a forked child: an abort inside Arrow kills the child, not the caller."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            result = fn()
        except BaseException as e:
            result = f"foreign:{type(e).__name__}"
        os.write(w, result.encode())
        os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        result = f.read().decode()
    return result or f"abort:signal {os.WTERMSIG(status) if os.WIFSIGNALED(status) else status}"


@contextmanager
def flipped(path: Path, bit: int) -> Iterator[None]:
    """The file at ``path`` with one bit flipped, restored afterwards."""
    original = path.read_bytes()
    data = bytearray(original)
    data[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))
    try:
        yield
    finally:
        path.write_bytes(original)


def bit_regions(data: bytes) -> dict[str, range]:
    """Bits of an Arrow IPC file: its header (magic + padding) and its footer (schema, block
    index, footer length, magic), the parts whose damage is most likely to abort a reader."""
    footer_len = int.from_bytes(data[-10:-6], "little")
    start = len(data) - 10 - footer_len
    return {
        "header": range(0, 64),
        "footer": range(8 * start, 8 * len(data)),
        "tail": range(8 * (len(data) - 10), 8 * len(data)),
    }


def flip_trial(
    ds: Path,
    shard: str,
    bit: int,
    reference: list[tuple[Any, ...]],
    *,
    plain: bool = True,
    fork: bool = True,
) -> dict[str, Any]:
    """Flip one bit of one shard; what verify, the verified reader and the plain reader say."""
    with flipped(ds / shard, bit):
        try:
            report = verify_dataset(ds)
            hit = any(p.where == shard and p.field == "sha256" for p in report.problems)
            by_verify = "caught" if hit else "missed"
        except Exception as e:  # a bug in verify, reported as such
            by_verify = f"verify raised {type(e).__name__}"
        try:
            snapshot(ds, verify=True)
            by_reader = "missed"
        except LogitCacheError as e:
            by_reader = "caught" if shard in str(e) and "sha256" in str(e) else "other error"
        out = {"shard": shard, "bit": bit, "verify": by_verify, "verified_read": by_reader}
        if plain:
            go = lambda: read_outcome(ds, reference, verify=False)  # noqa: E731
            out["plain"] = in_child(go) if fork else go()
    return out


def manifest_flip_outcome(ds: Path, reference: list[tuple[Any, ...]]) -> str:
    """What a flipped bit of manifest.json leads to (run with the bit flipped)."""
    try:
        open_dataset(ds)
    except LogitCacheError:
        return "refused at open"
    plain = in_child(lambda: read_outcome(ds, reference, verify=False))
    if plain == "error":
        return "error on read"
    if not verify_dataset(ds).ok:
        return f"caught by verify (plain read: {plain})"
    return f"undetected (plain read: {plain})"


def manifest_field_at(data: bytes, byte: int) -> str:
    """The field of an indented manifest.json that holds ``byte``, e.g.
    ``teacher.name_or_path (value)`` or ``shards[].rows (key)``."""
    lines = data.decode().splitlines(keepends=True)
    starts = np.cumsum([0] + [len(line.encode()) for line in lines])
    i = int(np.searchsorted(starts, byte, side="right")) - 1
    pattern = re.compile(r'^(\s*)"([^"]*)"\s*:')
    m = pattern.match(lines[i])
    if m is None:
        return "(punctuation)"
    part = "key" if byte - starts[i] < m.end() else "value"
    path, indent = [m.group(2)], len(m.group(1))
    for line in reversed(lines[:i]):
        d = len(line) - len(line.lstrip())
        if d >= indent:
            continue
        indent = d
        parent = pattern.match(line)
        if parent is not None:
            path.insert(0, parent.group(2) + ("[]" if line.rstrip().endswith("[") else ""))
    return f"{'.'.join(path)} ({part})"


def shard_sweep(
    ds: Path,
    reference: list[tuple[Any, ...]],
    args: argparse.Namespace,
    rng: np.random.Generator,
    every_footer_bit: bool,
) -> None:
    shards = [s["file"] for s in json.loads((ds / "manifest.json").read_text())["shards"]]
    results: list[dict[str, Any]] = []
    for shard in shards[: args.shards]:
        data = (ds / shard).read_bytes()
        regions = bit_regions(data)
        picks = [("random", int(b)) for b in rng.choice(8 * len(data), args.flips, replace=False)]
        if shard == shards[0]:  # one shard's header, and its footer (all or a sample)
            picks += [("header", b) for b in regions["header"]]
            footer = list(regions["footer"])
            if not every_footer_bit:
                footer = sorted(rng.choice(footer, min(args.flips, len(footer)), replace=False))
            picks += [("footer", int(b)) for b in footer]
        results += [
            {**flip_trial(ds, shard, bit, reference), "region": region} for region, bit in picks
        ]
    sizes = [(ds / s).stat().st_size for s in shards]
    print(
        f"\n{ds.name}: {len(shards)} shards of {min(sizes)}-{max(sizes)} bytes, "
        f"{len(results)} single-bit flips"
    )
    for region in ("random", "header", "footer"):
        rs = [r for r in results if r["region"] == region]
        plain = Counter(r["plain"] for r in rs)
        print(
            f"  {region:7s} {len(rs):5d} flips: verify {dict(Counter(r['verify'] for r in rs))}, "
            f"reader(verify=True) {dict(Counter(r['verified_read'] for r in rs))}; plain "
            f"reader: {dict(plain)}; silently wrong data {plain['silent']} "
            f"({100 * plain['silent'] / len(rs):.1f}%), named error {plain['error']} "
            f"({100 * plain['error'] / len(rs):.1f}%)"
        )


def manifest_sweep(
    ds: Path, reference: list[tuple[Any, ...]], flips: int, rng: np.random.Generator
) -> None:
    mf = ds / "manifest.json"
    data = mf.read_bytes()
    bits = rng.choice(8 * len(data), min(flips, 8 * len(data)), replace=False)
    outcomes: Counter[str] = Counter()
    undetected: Counter[str] = Counter()
    for bit in bits:
        with flipped(mf, int(bit)):
            o = manifest_flip_outcome(ds, reference)
        if o.startswith("undetected"):
            undetected[manifest_field_at(data, int(bit) // 8)] += 1
        outcomes[o] += 1
    print(f"\n{ds.name}/manifest.json ({len(data)} bytes), {len(bits)} single-bit flips:")
    for o, n in outcomes.most_common():
        print(f"  {n:5d} {o}")
    print("  undetected flips by field:")
    for field, n in undetected.most_common():
        print(f"    {n:4d} {field}")


def cmd_flips(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed)
    root = Path(tempfile.mkdtemp(prefix="lc-flips-"))
    try:
        for kind, codec in (("topk", "u8"), ("topk", "f16"), ("sampled", "u8")):
            first = kind == "topk" and codec == "u8"
            if args.manifest_only and not first:
                continue
            info = synth_info(kind, codec=codec)
            ds = root / f"{kind}-{codec}"
            examples = synth_examples(info, args.examples, seed=args.seed)
            write_synth(ds, info, examples, shard_positions=args.shard_positions)
            reference = snapshot(ds)
            if not args.manifest_only:
                shard_sweep(
                    ds, reference, args, rng, every_footer_bit=first and args.all_footer_bits
                )
            if first and args.manifest_flips:
                manifest_sweep(
                    ds, reference, args.manifest_flips, np.random.default_rng([args.seed, 1])
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- flaky S3

_S3_ERRORS = {
    "500": (500, "InternalError", "injected: internal error"),
    "503": (503, "SlowDown", "injected: reduce your request rate"),
    "500-after": (500, "InternalError", "injected: the request was applied, the reply lost"),
}


class FlakyS3:
    """moto's S3 server on 127.0.0.1, reached through a proxy that fails requests on purpose.

    ``policy(method, key, n)`` picks what happens to the n-th request (1-based) of ``method`` on
    ``key`` (``bucket/path``): ``"pass"``; ``"500"`` or ``"503"`` (refused before moto sees it);
    ``"500-after"`` (moto applies it, the client is told it failed); ``"reset"`` (the
    connection is closed without a reply). Every request is logged in :attr:`requests`.
    """

    def __init__(self, policy: Callable[[str, str, int], str] | None = None):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.policy = policy or (lambda method, key, n: "pass")
        self.requests: list[tuple[str, str, int, str]] = []
        self._counts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self.moto_port = _free_port()
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=self.moto_port, verbose=False)
        self._moto.start()
        self._proxy = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._proxy.daemon_threads = True
        self.port = self._proxy.server_address[1]
        threading.Thread(target=self._proxy.serve_forever, daemon=True).start()

    def storage_options(
        self, *, direct: bool = False, botocore_attempts: int | None = None
    ) -> dict[str, Any]:
        """s3fs options through the proxy (or straight to moto); dummy credentials."""
        port = self.moto_port if direct else self.port
        so: dict[str, Any] = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {
                "endpoint_url": f"http://127.0.0.1:{port}",
                "region_name": "us-east-1",
            },
            "use_listings_cache": False,
        }
        if botocore_attempts is not None:
            so["config_kwargs"] = {
                "retries": {"total_max_attempts": botocore_attempts, "mode": "standard"}
            }
        return so

    def make_bucket(self, name: str) -> None:
        c = http.client.HTTPConnection("127.0.0.1", self.moto_port, timeout=30)
        c.request("PUT", f"/{name}")
        status = c.getresponse().status
        c.close()
        if status != 200:
            raise RuntimeError(f"moto refused to create bucket {name!r} (HTTP {status})")

    def injected(self) -> Counter[str]:
        return Counter(a for *_, a in self.requests if a != "pass")

    def close(self) -> None:
        self._proxy.shutdown()
        self._proxy.server_close()
        self._moto.stop()

    def __enter__(self) -> FlakyS3:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        flaky = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()  # headers and body go out in two writes: no Nagle delay
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def handle_one_request(self) -> None:
                try:
                    super().handle_one_request()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client gave up on an injected failure

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    raw = b""  # forwarded as is, chunk framing included
                    while True:
                        line = self.rfile.readline()
                        raw += line
                        size = int(line.split(b";")[0].strip(), 16)
                        if size == 0:
                            while line not in (b"\r\n", b""):
                                line = self.rfile.readline()
                                raw += line
                            return raw
                        raw += self.rfile.read(size + 2)
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _any(self) -> None:
                body = self._body()
                key = self.path.split("?")[0].lstrip("/")
                with flaky._lock:
                    flaky._counts[(self.command, key)] += 1
                    n = flaky._counts[(self.command, key)]
                action = flaky.policy(self.command, key, n)
                flaky.requests.append((self.command, key, n, action))
                if action == "reset":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if action in ("500", "503"):
                    return self._error(action)
                up = http.client.HTTPConnection("127.0.0.1", flaky.moto_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                up.request(self.command, self.path, body=body, headers=headers)
                resp = up.getresponse()
                data = resp.read()
                up.close()
                if action == "500-after":
                    return self._error(action)
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _error(self, action: str) -> None:
                status, code, message = _S3_ERRORS[action]
                data = (
                    f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                    f"<Message>{message}</Message></Error>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        return Handler


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def transient_policy(method: str, key: str, n: int) -> str:
    """Every object's first requests of each kind fail, one way or another, then succeed."""
    if not key.startswith("bucket/"):
        return "pass"
    if method == "PUT":
        return {1: "500-after", 2: "reset", 3: "503"}.get(n, "pass")
    return {1: "503", 2: "reset"}.get(n, "pass")


def cmd_s3(args: argparse.Namespace) -> None:
    info = synth_info("topk", k=8)
    examples = synth_examples(info, 60, seed=0)

    def round_trip(flaky: FlakyS3, name: str, **so_kwargs: Any) -> tuple[float, str]:
        so = flaky.storage_options(**so_kwargs)
        t0 = time.perf_counter()
        try:
            write_synth(
                f"s3://bucket/{name}", info, examples, shard_positions=100, storage_options=so
            )
            got = snapshot(f"s3://bucket/{name}", storage_options=so)
            ok = verify_dataset(f"s3://bucket/{name}", storage_options=so).ok
            result = f"bit-for-bit equal: {got == reference}, verify ok: {ok}"
        except OSError as e:
            result = f"{type(e).__name__}: {e}"
        return time.perf_counter() - t0, result

    root = Path(tempfile.mkdtemp(prefix="lc-s3-"))
    try:
        write_synth(root / "ds", info, examples, shard_positions=100)
        reference = snapshot(root / "ds")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    shards = -(-sum(len(e.response_ids) for e in examples) // 100)
    print(f"dataset: {len(examples)} examples, about {shards} shards; write, read, verify on S3")
    with FlakyS3() as flaky:
        flaky.make_bucket("bucket")
        seconds, result = round_trip(flaky, "clean")
        print(
            f"  no faults: {len(flaky.requests)} requests "
            f"{dict(Counter(m for m, *_ in flaky.requests))}, {seconds:.1f} s; {result}"
        )
    with FlakyS3(transient_policy) as flaky:
        flaky.make_bucket("bucket")
        seconds, result = round_trip(flaky, "flaky")
        print(
            f"  every object's first 2-3 requests fail: {len(flaky.requests)} requests, "
            f"{sum(flaky.injected().values())} failed on purpose {dict(flaky.injected())}, "
            f"{seconds:.1f} s; {result}"
        )
    for action, attempts in [("500", None), ("503", None), ("500", 1), ("503", 1)]:
        if not args.persistent and attempts is None:
            continue

        url = f"s3://bucket/down-{action}-{attempts}"  # moto's state is per process
        bad = f"{url.removeprefix('s3://')}/shard-w0-000001.arrow"

        def always(method: str, key: str, n: int, bad: str = bad, action: str = action) -> str:
            return action if method == "GET" and key == bad else "pass"

        with FlakyS3(always) as flaky:
            flaky.make_bucket("bucket")
            so = flaky.storage_options(botocore_attempts=attempts)
            write_synth(url, info, examples, shard_positions=100, storage_options=so)
            t0 = time.perf_counter()
            try:
                snapshot(url, storage_options=so)
                message = "no error"
            except OSError as e:
                message = f"{type(e).__name__}: {e}"
            gets = sum(1 for m, k, _, a in flaky.requests if a != "pass")
            layers = (
                "botocore (legacy, default) + s3fs + logitcache"
                if attempts is None
                else "botocore retries off (total_max_attempts=1): s3fs + logitcache"
            )
            print(
                f"  shard-w0-000001 GET always fails with {action} [{layers}]: error after "
                f"{time.perf_counter() - t0:.1f} s and {gets} HTTP attempts:\n    {message}"
            )


# --------------------------------------------------------------------------- memory


def _rss_child(url: str, buffer: int, iterate: bool) -> None:
    """Hidden subcommand: stream ``url`` through LogitStream and print peak RSS as JSON."""
    import resource

    from logitcache.train.stream import LogitStream

    stream = LogitStream(url, seed=0, shuffle_buffer=buffer, epochs=1)
    n = sum(1 for _ in stream.items(0, 1)) if iterate else 0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"examples": n, "peak_mib": peak_kib / 1024, "pending": stream.peak_pending}))


def measure_rss(url: str | Path, buffer: int, iterate: bool = True) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "logitcache.tools.reliability", "_rss", str(url), str(buffer)]
    out = subprocess.run(
        cmd + ([] if iterate else ["--no-iterate"]), check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def cmd_rss(args: argparse.Namespace) -> None:
    B = args.buffer
    info = synth_info("topk", k=args.k, vocab=32768)
    root = Path(tempfile.mkdtemp(prefix="lc-rss-"))
    try:
        print(
            f"LogitStream, shuffle_buffer={B}, top-{args.k} u8, responses of 1-{args.max_len} "
            f"tokens, shards of {args.shard_positions:,} positions; one reader, one epoch"
        )
        for mult in (1, 10, 100):
            ds = root / f"x{mult}"
            with DatasetWriter(ds, info, shard_positions=args.shard_positions) as w:
                for part in range(mult):  # generated in slices: the generator is not measured
                    for ex in synth_examples(
                        info, B, max_len=args.max_len, seed=part, prefix=f"p{part}-"
                    ):
                        w.add(ex)
            m = json.loads((ds / "manifest.json").read_text())
            base = measure_rss(ds, B, iterate=False)
            run = measure_rss(ds, B)
            assert run["examples"] == mult * B
            print(
                f"  {mult:3d}× buffer: {m['num_examples']:6,} examples, {m['num_positions']:9,} "
                f"positions, {len(m['shards']):3d} shards, {m['num_bytes'] / 2**20:7.1f} MiB "
                f"on disk | peak RSS {run['peak_mib']:6.0f} MiB (imports + open: "
                f"{base['peak_mib']:.0f} MiB; streaming adds {run['peak_mib'] - base['peak_mib']:.0f}"
                f" MiB); most buffered: {run['pending']}"
            )
            shutil.rmtree(ds)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- crash trials


def tiny_models(root: Path) -> tuple[Path, Path]:
    """(teacher, student) folders: random Llamas sharing tools/tiny.py's tokenizer."""
    from .tiny import make_tiny_model, make_tiny_tokenizer

    make_tiny_tokenizer(root / "tokenizer")
    teacher = make_tiny_model(root / "teacher", root / "tokenizer", layers=2, hidden=64, seed=0)
    student = make_tiny_model(root / "student", root / "tokenizer", layers=2, hidden=32, seed=1)
    return teacher, student


def write_prompts(path: Path, count: int) -> Path:
    """Score-mode records (prompt + response) from the tiny corpus, ids ``q0000``…"""
    from .tiny import tiny_corpus

    lines = tiny_corpus()
    with path.open("w") as f:
        for i in range(count):
            response = " ".join(lines[(3 * i + j) % len(lines)] for j in range(1 + i % 3))
            rec = {"id": f"q{i:04d}", "prompt": lines[(7 * i) % len(lines)], "response": response}
            f.write(json.dumps(rec) + "\n")
    return path


def build_command(teacher: Path, prompts: Path, out: Path) -> list[str]:
    """`logitcache build` in score mode, many small shards so that kills land mid-commit."""
    return [
        sys.executable,
        "-m",
        "logitcache.tools.cli",
        "build",
        "--teacher",
        str(teacher),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--mode",
        "score",
        "--k",
        "8",
        "--codec",
        "f32",
        "--max-batch-tokens",
        "512",
        "--shard-positions",
        "64",
        "--device",
        "cpu",
        "--no-progress",
    ]


def _env() -> dict[str, str]:
    # One thread: runs compared step by step must do the same float arithmetic.
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_killed(
    cmd: list[str], kill_when: Callable[[], bool], timeout: float = 300
) -> tuple[bool, float]:
    """Start ``cmd``; SIGKILL it as soon as ``kill_when()`` holds. (killed?, seconds)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = False
    while p.poll() is None and time.perf_counter() - t0 < timeout:
        if kill_when():
            p.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.005)
    _, err = p.communicate(timeout=timeout)
    if not killed and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{err.decode()[-3000:]}")
    return killed, time.perf_counter() - t0


def run_to_end(cmd: list[str]) -> float:
    return run_killed(cmd, lambda: False)[1]


def compare_capture(out: Path, reference: Path) -> dict[str, Any]:
    """How a crashed-then-resumed capture differs from an uninterrupted one (should not)."""
    report = verify_dataset(out)
    got = [e for e in open_dataset(out, verify=True).iter_examples()]
    ref = {e.id: e for e in open_dataset(reference).iter_examples()}
    ids = [e.id for e in got]
    diff = 0.0
    mismatched = []
    for e in got:
        r = ref.get(e.id)
        if r is None or not (
            np.array_equal(e.prompt_ids, r.prompt_ids)
            and np.array_equal(e.response_ids, r.response_ids)
            and np.array_equal(e.targets.ids, r.targets.ids)
        ):
            mismatched.append(e.id)
            continue
        if len(e.response_ids):
            diff = max(diff, float(np.abs(e.targets.logprobs - r.targets.logprobs).max()))
    leftovers = [str(p.relative_to(out)) for p in out.rglob(".tmp-*")]
    return {
        "verify_ok": report.ok,
        "warnings": report.warnings,
        "examples": len(ids),
        "duplicates": len(ids) - len(set(ids)),
        "missing": sorted(set(ref) - set(ids)),
        "mismatched": mismatched,
        "max_logprob_diff": diff,
        "leftover_tmp": leftovers,
    }


def capture_state(out: Path) -> str:
    """What a killed capture left: journaled shards, stray shard files, temp files, manifest."""
    journal = out / "_parts" / "r00000.json"
    journaled = len(json.loads(journal.read_text())["shards"]) if journal.exists() else 0
    files = len(list(out.glob("shard-*.arrow")))
    tmp = len(list(out.rglob(".tmp-*")))
    return (
        f"{journaled} journaled, {files - journaled} unjournaled shard files, {tmp} temp, "
        f"manifest {'yes' if (out / 'manifest.json').exists() else 'no'}"
    )


def after_shards(out: Path, count: int, delay: float) -> Callable[[], bool]:
    """A kill trigger: ``delay`` seconds after the ``count``-th shard file appears in ``out``
    (count 0: after ``delay`` seconds), so kills land inside the capture whatever the load."""
    hit: list[float] = []

    def due() -> bool:
        if not hit and (count == 0 or len(list(out.glob("shard-*.arrow"))) >= count):
            hit.append(time.perf_counter())
        return bool(hit) and time.perf_counter() - hit[0] >= delay

    return due


def cmd_capture_crash(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed)
    root = Path(tempfile.mkdtemp(prefix="lc-capcrash-"))
    try:
        teacher, _ = tiny_models(root)
        prompts = write_prompts(root / "prompts.jsonl", args.prompts)
        ref = root / "reference"
        total = run_to_end(build_command(teacher, prompts, ref))
        m = json.loads((ref / "manifest.json").read_text())
        shards = len(m["shards"])
        print(
            f"reference: {m['num_examples']} examples, {shards} shards, {total:.1f} s. Each trial "
            f"SIGKILLs the run 1-{args.max_kills} times, each time 0-50 ms after a random number "
            f"(0-{shards}) of shard files exist, then reruns the same command to the end"
        )
        bad = 0
        for trial in range(args.trials):
            out = root / f"trial{trial}"
            states = []
            for _ in range(int(rng.integers(1, args.max_kills + 1))):
                count, delay = int(rng.integers(0, shards + 1)), float(rng.uniform(0, 0.05))
                killed, _ = run_killed(
                    build_command(teacher, prompts, out), after_shards(out, count, delay)
                )
                states.append(
                    f"kill after shard {count}: {capture_state(out)}" if killed else "not killed"
                )
            run_to_end(build_command(teacher, prompts, out))
            c = compare_capture(out, ref)
            ok = (
                c["verify_ok"]
                and not c["warnings"]
                and not c["duplicates"]
                and not c["missing"]
                and not c["mismatched"]
                and c["max_logprob_diff"] <= 1e-4
                and c["examples"] == m["num_examples"]
            )
            bad += not ok
            print(
                f"  trial {trial:2d}: {'; '.join(states)} -> rerun: {c['examples']} examples, "
                f"{c['duplicates']} duplicated, {len(c['missing'])} missing, "
                f"{len(c['mismatched'])} with other ids/tokens, max |Δ log p| "
                f"{c['max_logprob_diff']:.1e}, verify {'ok' if c['verify_ok'] else 'FAILED'}, "
                f"{len(c['warnings'])} warnings, {len(c['leftover_tmp'])} temp files left"
                f"{'' if ok else '  <-- FAILED ' + json.dumps(c)[:500]}"
            )
            shutil.rmtree(out)
        print(f"{args.trials - bad} of {args.trials} trials match the uninterrupted run")
    finally:
        shutil.rmtree(root, ignore_errors=True)


TRAIN_KEYS = ("step", "loss", "kd", "ce", "grad_norm", "lr", "positions", "tokens", "epoch")


def train_command(data: Path, student: Path, out: Path, steps: int, every: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "logitcache.tools.cli",
        "train",
        "--data.train",
        str(data),
        "--model.path",
        str(student),
        "--train.output",
        str(out),
        "--train.steps",
        str(steps),
        "--data.batch_size",
        "4",
        "--data.shuffle_buffer",
        "16",
        "--optim.lr",
        "3e-3",
        "--optim.warmup_steps",
        "2",
        "--log.checkpoint_every",
        str(every),
        "--log.progress",
        "false",
        "--train.device",
        "cpu",
    ]


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    try:
        return sum(1 for line in path.read_text().splitlines() if '"loss"' in line)
    except FileNotFoundError:
        return 0


def train_losses(out: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return [{k: r[k] for k in TRAIN_KEYS if k in r} for r in rows if "loss" in r]


def cmd_train_crash(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed)
    root = Path(tempfile.mkdtemp(prefix="lc-traincrash-"))
    try:
        teacher, student = tiny_models(root)
        data = root / "data"
        run_to_end(build_command(teacher, write_prompts(root / "p.jsonl", 96), data))
        steps, every = args.steps, args.checkpoint_every
        seconds = run_to_end(train_command(data, student, root / "straight", steps, every))
        reference = train_losses(root / "straight")
        print(f"uninterrupted: {steps} steps in {seconds:.1f} s, checkpoint every {every}")
        same = 0
        for trial in range(args.trials):
            out = root / f"trial{trial}"
            cmd = train_command(data, student, out, steps, every)
            # A checkpoint is written right after the metrics of every `every`-th step: kill at
            # a random moment up to 0.1 s (a step or two) after step `at` is logged.
            at, delay = int(rng.integers(every, steps - 2)), float(rng.uniform(0, 0.1))
            seen: list[float] = []

            def due(at: int = at, delay: float = delay, out: Path = out, seen=seen) -> bool:
                if not seen and logged_steps(out) >= at:
                    seen.append(time.perf_counter())
                return bool(seen) and time.perf_counter() - seen[0] >= delay

            killed, _ = run_killed(cmd, due)
            logged = logged_steps(out)
            partial = len(list((out / "checkpoints").glob(".tmp-step-*")))
            ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
            run_to_end([*cmd, "--resume"])
            got = train_losses(out)
            same += got == reference
            killed_at = (
                f"SIGKILL {delay:.2f} s after step {at} was logged"
                if killed
                else ("finished before the kill")
            )
            print(
                f"  trial {trial}: {killed_at} ({logged} "
                f"logged, checkpoints {ckpts[-1] if ckpts else None}, {partial} half-written) -> "
                f"--resume: {len(got)} steps, "
                f"{sum(a == b for a, b in zip(got, reference, strict=False))} of {steps} "
                f"identical: {'bit for bit' if got == reference else 'DIFFERENT'}"
            )
        print(f"{same} of {args.trials} resumed runs reproduce the uninterrupted losses exactly")
        # Killed while its second checkpoint is being assembled (a temporary folder exists).
        out = root / "mid-checkpoint"
        cmd = train_command(data, student, out, steps, every)
        ckpt_dir = out / "checkpoints"
        killed, _ = run_killed(
            cmd, lambda: any(ckpt_dir.glob(".tmp-step-*")) and any(ckpt_dir.glob("step-*"))
        )
        partial = sorted(p.name for p in ckpt_dir.glob(".tmp-step-*"))
        ckpts = sorted(p.name for p in ckpt_dir.glob("step-*"))
        run_to_end([*cmd, "--resume"])
        print(
            f"  killed while writing a checkpoint ({killed=}; half-written {partial}, complete "
            f"{ckpts}) -> --resume: "
            f"{'bit for bit' if train_losses(out) == reference else 'DIFFERENT'}; afterwards "
            f"still there: {sorted(p.name for p in ckpt_dir.glob('.tmp-step-*'))}"
        )
        # Killed before its first checkpoint: what does the user see?
        out = root / "early"
        cmd = train_command(data, student, out, steps, every)
        run_killed(cmd, lambda: logged_steps(out) >= 1)
        for extra in (["--resume"], []):
            p = subprocess.run(cmd + extra, env=_env(), capture_output=True, text=True)
            print(
                f"  killed before the first checkpoint, rerun {' '.join(extra) or 'as is'}: "
                f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1][:300]}"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("flips", help="single-bit flips in shards and manifest")
    p.add_argument("--flips", type=int, default=300, help="random flips per shard")
    p.add_argument("--shards", type=int, default=3, help="shards flipped per dataset")
    p.add_argument("--manifest-flips", type=int, default=1000)
    p.add_argument("--manifest-only", action="store_true", help="only the manifest.json sweep")
    p.add_argument("--examples", type=int, default=40, help="examples per dataset")
    p.add_argument("--shard-positions", type=int, default=150, help="positions per shard")
    p.add_argument(
        "--all-footer-bits",
        action="store_true",
        help="flip every bit of one top-k shard's footer (about 10,000 flips, minutes)",
    )
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("s3", help="S3 (moto) behind a fault-injecting proxy")
    p.add_argument(
        "--no-persistent",
        dest="persistent",
        action="store_false",
        help="skip the persistent-failure runs with default retries (minutes)",
    )
    p = sub.add_parser("capture-crash", help="SIGKILL `logitcache build` and rerun it")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--prompts", type=int, default=1200)
    p.add_argument("--max-kills", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("train-crash", help="SIGKILL `logitcache train` and --resume it")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("rss", help="peak RSS streaming 1×, 10×, 100× the shuffle buffer")
    p.add_argument("--buffer", type=int, default=1024)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--shard-positions", type=int, default=1 << 16)
    p = sub.add_parser("_rss")
    p.add_argument("url")
    p.add_argument("buffer", type=int)
    p.add_argument("--no-iterate", dest="iterate", action="store_false")
    args = ap.parse_args(argv)
    if args.cmd == "_rss":
        _rss_child(args.url, args.buffer, args.iterate)
        return 0
    t0 = time.perf_counter()
    {
        "flips": cmd_flips,
        "s3": cmd_s3,
        "capture-crash": cmd_capture_crash,
        "train-crash": cmd_train_crash,
        "rss": cmd_rss,
    }[args.cmd](args)
    print(f"({args.cmd}: {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
