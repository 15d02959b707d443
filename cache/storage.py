"""Where datasets live: a local folder or any fsspec URL (``s3://``, ``gs://``, ``memory://``).

Writes are atomic: a local file is written under a temporary name, fsynced and renamed; on an
object store a single PUT is already all-or-nothing, so the object is written in one call.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import time
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

T = TypeVar("T")


class Location:
    """A dataset folder on some filesystem; every path inside it is joined here."""

    def __init__(self, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None):
        url = os.fspath(url)
        self.url = url
        options = with_default_retries(url, storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(url, **options)
        self.root = root.rstrip("/") or root
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def path(self, *names: str) -> str:
        return posixpath.join(self.root, *names)

    def url_of(self, *names: str) -> str:
        """The full URL of a path inside the folder, as errors name it."""
        p = self.path(*names)
        return p if self.is_local else self.fs.unstrip_protocol(p)

    def exists(self, *names: str) -> bool:
        p = self.path(*names)
        return bool(retry(lambda: self.fs.exists(p), what=f"checking {self.url_of(*names)}"))

    def read_bytes(self, *names: str) -> bytes:
        p = self.path(*names)
        return retry(lambda: self.fs.cat_file(p), what=f"reading {self.url_of(*names)}")

    def size(self, *names: str) -> int:
        p = self.path(*names)
        return int(retry(lambda: self.fs.size(p), what=f"sizing {self.url_of(*names)}"))

    def listdir(self, *names: str) -> list[str]:
        """Base names inside a folder; empty when it does not exist."""
        p, what = self.path(*names), f"listing {self.url_of(*names)}"
        if not retry(lambda: self.fs.exists(p), what=what):
            return []
        return sorted(
            posixpath.basename(x.rstrip("/"))
            for x in retry(lambda: self.fs.ls(p, detail=False), what=what)
        )

    def remove(self, *names: str) -> None:
        p = self.path(*names)
        retry(lambda: self.fs.rm_file(p), what=f"removing {self.url_of(*names)}")

    def makedirs(self, *names: str) -> None:
        if self.is_local:
            os.makedirs(self.path(*names), exist_ok=True)

    def write_atomic(
        self, data: bytes, *names: str, tmp_prefix: str = ".tmp-", sole_writer: bool = False
    ) -> None:
        """Replace the file at ``names`` with ``data``, all or nothing.

        Locally the data goes to a temp file named ``tmp_prefix…`` that is renamed over the
        target. ``sole_writer=True`` says no other process writes with this prefix (the
        manifest, the capture config), so temp files a killed earlier write left are removed.
        """
        target = self.path(*names)
        if self.is_local:
            folder = os.path.dirname(target)
            os.makedirs(folder, exist_ok=True)
            if sole_writer:
                for name in os.listdir(folder):
                    if name.startswith(tmp_prefix):
                        os.unlink(os.path.join(folder, name))
            fd, tmp = tempfile.mkstemp(prefix=tmp_prefix, dir=folder)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, _file_mode())  # mkstemp makes 0o600; files follow the umask
                os.replace(tmp, target)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            _fsync_dir(folder)
        else:
            retry(lambda: self.fs.pipe_file(target, data), what=f"writing {self.url_of(*names)}")

    def __str__(self) -> str:
        return self.url


def _file_mode() -> int:
    """Mode of a file created by open() under this process's umask (usually 0o644).

    Linux reports the umask in /proc without changing it; elsewhere it is set and restored.
    """
    try:
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(folder: str) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def with_default_retries(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """S3 options with botocore's own retries off unless the caller configured them.

    Three retry layers multiply: botocore (5 attempts), s3fs (5 on throttling) and
    :func:`retry` (5) made a dead endpoint answering 503 take 125 requests and three minutes
    to report (docs/RELIABILITY.md). Without botocore's layer it is 25 requests in seconds,
    and every transient failure is still retried.
    """
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol not in ("s3", "s3a"):
        return options
    config = dict(options.get("config_kwargs") or {})
    if "retries" in config:
        return options
    config["retries"] = {"total_max_attempts": 1, "mode": "standard"}
    return {**options, "config_kwargs": config}


def retry(
    fn: Callable[[], T], attempts: int = 5, base_delay: float = 0.2, what: str | None = None
) -> T:
    """Call ``fn``, retrying transient I/O failures with exponential backoff.

    FileNotFoundError, PermissionError, IsADirectoryError and NotADirectoryError are answers,
    not transient failures: never retried.
    When every attempt fails, the OSError raised names ``what`` (the operation and object),
    which the storage library's own message often does not.
    """
    for i in range(attempts):
        try:
            return fn()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
            raise
        except OSError as e:
            if i == attempts - 1:
                if what is None:
                    raise
                msg = (
                    f"{what}: failed {attempts} times ({type(e).__name__}: {e}); the storage is "
                    "unreachable or failing: check the network, endpoint and credentials, then "
                    "rerun (capture and training resume where they stopped)"
                )
                raise (OSError(e.errno, msg) if e.errno is not None else OSError(msg)) from e
            time.sleep(base_delay * 2**i)
    raise AssertionError("unreachable")
