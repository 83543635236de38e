"""Released weights on this machine: the cache (``$ARCSCALE_CACHE``, default ``~/.cache/arcscale``), the
download (urllib, progress on stderr, a temporary name, size and sha256 checks, then a rename), and the
check of a cached file before it is ever loaded. Every failure is one line naming the URL and the path
where the file belongs. Nothing is fetched at import."""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from typing import IO, Iterator

from utils.run.checkpoint import CheckpointError
from utils.weights.registry import Released

CACHE_ENV = "ARCSCALE_CACHE"
CHUNK = 1 << 20
TIMEOUT_S = 30.0


class WeightsUnavailable(CheckpointError):
    """A released file that cannot be had or cannot be trusted; the message is one line."""


def cache_dir() -> str:
    """Where released weights are kept: ``$ARCSCALE_CACHE``, else ``~/.cache/arcscale``."""
    return os.path.expanduser(os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "arcscale"))


def cached_path(entry: Released) -> str:
    """The exact path of ``entry``'s file in the cache: ``<cache>/<source>/<model>/<file name>``."""
    source, model = entry.name.split(":", 1)
    return os.path.join(cache_dir(), source, model, entry.file_name)


def file_sha256(path: str) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _recorded_sha256(path: str) -> str | None:
    try:
        with open(path + ".sha256") as handle:
            return handle.read().split()[0]
    except (OSError, IndexError):
        return None


def _record_sha256(path: str, digest: str) -> None:
    with open(path + ".sha256.tmp", "w") as handle:
        handle.write(f"{digest}  {os.path.basename(path)}\n")
    os.replace(path + ".sha256.tmp", path + ".sha256")


def check_cached(entry: Released, path: str, log: IO[str] | None = None) -> None:
    """Refuse (one line) a cached file whose size or sha256 differs from the registry's or from the one
    recorded at its download; a file placed by hand with nothing to compare has its sha256 recorded now."""
    log = log or sys.stderr
    size = os.path.getsize(path)
    fetch_again = f"delete it and fetch again (python tools/weights.py fetch {entry.name})"
    if entry.size is not None and size != entry.size:
        raise WeightsUnavailable(f"{path}: cached {entry.name} has {size} bytes, expected {entry.size} (truncated or "
                                 f"corrupt); not loaded: {fetch_again}")
    expected, origin = (entry.sha256, "the registry") if entry.sha256 else (_recorded_sha256(path), "its .sha256")
    digest = file_sha256(path)
    if expected and digest != expected:
        raise WeightsUnavailable(f"{path}: cached {entry.name} has sha256 {digest[:16]}..., {origin} says "
                                 f"{expected[:16]}... (truncated or corrupt); not loaded: {fetch_again}")
    if not expected:
        _record_sha256(path, digest)
        print(f"{entry.name}: {path} placed by hand: sha256 {digest} recorded in {path}.sha256", file=log)


def _unavailable(entry: Released, target: str, why: str) -> WeightsUnavailable:
    return WeightsUnavailable(f"{entry.name}: cannot download {entry.url} ({why}); download it by hand and place it "
                              f"at {target}")


def _progress(entry: Released, done: int, total: int | None, log: IO[str]) -> None:
    if total:
        log.write(f"\rdownloading {entry.name}: {done / 1e6:.1f} of {total / 1e6:.1f} MB ({done / total:.0%})")
    else:
        log.write(f"\rdownloading {entry.name}: {done / 1e6:.1f} MB")
    log.flush()


def download(entry: Released, target: str, log: IO[str] | None = None) -> str:
    """Fetch ``entry.url`` to ``target`` through ``target.part.<pid>``: progress on ``log``, size checked
    against Content-Length (and the registry), sha256 verified when known, else printed and recorded in
    ``target.sha256``; the rename happens only after every check."""
    log = log or sys.stderr
    os.makedirs(os.path.dirname(target), exist_ok=True)
    temporary = f"{target}.part.{os.getpid()}"
    digest, done = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(entry.url, timeout=TIMEOUT_S) as response, open(temporary, "wb") as handle:
            total = int(response.headers.get("Content-Length") or 0) or None
            shown = 0.0
            for chunk in iter(lambda: response.read(CHUNK), b""):
                handle.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if time.monotonic() - shown > 0.5:
                    _progress(entry, done, total, log)
                    shown = time.monotonic()
            _progress(entry, done, total, log)
            log.write("\n")
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:  # refused, unreachable, timed out, cut off
        _remove(temporary)
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise _unavailable(entry, target, str(reason)) from None
    expected_size = entry.size or total
    if expected_size is not None and done != expected_size:
        _remove(temporary)
        raise _unavailable(entry, target, f"got {done} of {expected_size} bytes")
    sha = digest.hexdigest()
    if entry.sha256 and sha != entry.sha256:
        _remove(temporary)
        raise _unavailable(entry, target, f"sha256 {sha[:16]}... differs from the registry's {entry.sha256[:16]}...; "
                                          f"the file was not kept")
    os.replace(temporary, target)
    if entry.sha256:
        print(f"{entry.name}: sha256 verified ({sha})", file=log)
    else:
        _record_sha256(target, sha)
        print(f"{entry.name}: sha256 {sha} (not published: recorded in {target}.sha256)", file=log)
    return target


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


@contextlib.contextmanager
def download_lock(target: str, log: IO[str] | None = None) -> Iterator[None]:
    """Hold ``target.lock`` (an exclusive flock) while one process downloads ``target``: under torchrun every
    rank of a node resolves the same name at once, and the first to get here fetches while the others wait,
    then find the file in the cache. Where flock is missing (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:  # no flock: concurrent downloads still land whole (a temporary name per process)
        yield
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    path, said = target + ".lock", False
    while True:  # the holder removes the lock file when done: a lock taken on a removed file is taken again
        handle = open(path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if not said:
                print(f"{os.path.basename(target)}: another process is downloading it; waiting for {target}",
                      file=log or sys.stderr, flush=True)
                said = True
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            if os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    try:
        yield
    finally:
        _remove(path)  # before the unlock: a waiter then sees a removed file and takes a fresh one
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def fetch(entry: Released, log: IO[str] | None = None) -> str:
    """The path of ``entry``'s file: the cache (checked), else a download (one process at a time per file:
    :func:`download_lock`); one line when neither works."""
    target = cached_path(entry)
    if os.path.isfile(target):
        check_cached(entry, target, log)
        return target
    if not entry.downloadable:
        raise WeightsUnavailable(f"{entry.name}: not in the cache and not downloadable by a script: get "
                                 f"{entry.file_name} from {entry.page}, and place it at {target}")
    with download_lock(target, log):
        if os.path.isfile(target):  # another process (a rank beside this one) fetched it while this one waited
            check_cached(entry, target, log)
            return target
        return download(entry, target, log)
