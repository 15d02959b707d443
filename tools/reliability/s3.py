"""S3 on loopback: moto behind a proxy that fails chosen requests on purpose."""

from __future__ import annotations

import argparse
import http.client
import logging
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from logitcache.cache.verify import verify_dataset

from ..synth import snapshot, synth_examples, synth_info, write_synth

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
    # "legacy": botocore's own default retries, as before logitcache turned them off;
    # None: logitcache's defaults (botocore off, cache/storage.py with_default_retries).
    for action, retries in [("500", "legacy"), ("503", "legacy"), ("500", None), ("503", None)]:
        if not args.persistent and retries == "legacy":
            continue

        url = f"s3://bucket/down-{action}-{retries}"  # moto's state is per process
        bad = f"{url.removeprefix('s3://')}/shard-w0-000001.arrow"

        def always(method: str, key: str, n: int, bad: str = bad, action: str = action) -> str:
            return action if method == "GET" and key == bad else "pass"

        with FlakyS3(always) as flaky:
            flaky.make_bucket("bucket")
            so = flaky.storage_options()
            if retries == "legacy":
                so["config_kwargs"] = {"retries": {"mode": "legacy"}}
            write_synth(url, info, examples, shard_positions=100, storage_options=so)
            t0 = time.perf_counter()
            try:
                snapshot(url, storage_options=so)
                message = "no error"
            except OSError as e:
                message = f"{type(e).__name__}: {e}"
            gets = sum(1 for m, k, _, a in flaky.requests if a != "pass")
            layers = (
                "botocore (legacy, its default) + s3fs + logitcache"
                if retries == "legacy"
                else "logitcache's defaults, botocore retries off: s3fs + logitcache"
            )
            print(
                f"  shard-w0-000001 GET always fails with {action} [{layers}]: error after "
                f"{time.perf_counter() - t0:.1f} s and {gets} HTTP attempts:\n    {message}"
            )
