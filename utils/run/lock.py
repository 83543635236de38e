"""The output folder's lock: one run writes a folder at a time.

The process that writes the folder (rank 0) holds an advisory ``fcntl.flock`` on ``<output>/.arcscale.lock``
for its whole life. The kernel drops the lock when the process ends, however it ends (kill -9, the OOM
killer, an elastic restart), so a lock left by a dead run never blocks the next one; the file itself only
records who holds it (host, pid, start time, config) for the one-line refusal, and is removed at a normal
exit. On a filesystem that cannot lock (some FUSE and object-store mounts) the run warns and goes on.
"""
from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import socket
import time

LOCK_NAME = ".arcscale.lock"
logger = logging.getLogger("arcscale.train")

# folder (absolute) -> fd of its locked lock file: kept open for the life of the process
_held: dict[str, int] = {}


class OutputLockedError(RuntimeError):
    """Another live run holds the output folder (the message names it: host, pid), or no lock file can be
    created in it; one line."""


def _close_in_child() -> None:
    # A forked child (e.g. a DataLoader worker under the "fork" start method) shares the locked open file;
    # flock is held while any copy is open, so the child drops its copy: the lock dies with this process.
    for fd in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


def describe_holder(text: str) -> str:
    """``host H, pid P (since T, config C)`` from a lock file's JSON; notes a pid on this host that is gone."""
    try:
        holder = json.loads(text)
        host, pid = str(holder["host"]), int(holder["pid"])
    except (ValueError, KeyError, TypeError):
        return "holder not recorded yet"
    words = f"host {host}, pid {pid}"
    if host == socket.gethostname() and not _alive(pid):
        words += " (exited; a process it started still holds the lock)"
    details = ", ".join(f"{key} {holder[key]}" for key in ("since", "config") if holder.get(key))
    return f"{words}{f' ({details})' if details else ''}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode("utf-8", "replace")


def lock_output(folder: str, config: str = "", wait_s: float = 0.0) -> bool:
    """Lock ``folder`` for this process (idempotent); False when its filesystem cannot lock (warned).

    Raises :class:`OutputLockedError` naming the holder when another process holds it for longer
    than ``wait_s`` seconds (an elastic restart waits for the previous attempt to be gone).
    """
    folder = os.path.abspath(folder)
    if folder in _held:
        return True
    path = os.path.join(folder, LOCK_NAME)
    deadline, unnamed_tries = time.monotonic() + wait_s, 0
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise OutputLockedError(f"output folder {folder}: cannot create its lock file {LOCK_NAME} "
                                    f"({exc.strerror}); expected a folder this run can write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            # an empty file: the holder locked it a moment ago and is writing its name; read it again
            unnamed_tries = unnamed_tries + 1 if not holder else unnamed_tries
            if time.monotonic() < deadline or (not holder and unnamed_tries < 20):
                time.sleep(0.2 if holder else 0.05)
                continue
            raise OutputLockedError(f"output folder {folder} is in use by another run ({describe_holder(holder)}); "
                                    f"two runs in one folder overwrite each other's checkpoints: wait for it to "
                                    f"end, or choose another `output`") from None
        except OSError as exc:  # ENOLCK, EOPNOTSUPP, ...: a filesystem without flock
            os.close(fd)
            logger.warning("cannot lock output folder %s (%s): another run started into it would not be stopped",
                           folder, exc.strerror)
            return False
        try:  # the holder we waited for may have removed the file on exit: then we locked an orphan
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "config": config}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        _held[folder] = fd
        return True


def release_output(folder: str) -> None:
    """Remove the lock file and drop the lock (at a normal exit; a killed run's lock drops by itself)."""
    fd = _held.pop(os.path.abspath(folder), None)
    if fd is None:
        return
    try:  # unlink while still holding it, so a waiting run re-checks the inode and never locks a removed file
        os.unlink(os.path.join(os.path.abspath(folder), LOCK_NAME))
    except OSError:
        pass
    os.close(fd)


@atexit.register
def _release_all() -> None:
    for folder in list(_held):
        release_output(folder)
