"""utils/run/lock.py: the output folder's lock, held by real other processes (a live holder refuses with its
host and pid, a kill -9'd one or one whose forked child lives on does not block)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import REPO_ROOT
from utils.run.lock import LOCK_NAME, OutputLockedError, lock_output, release_output

HOLD = textwrap.dedent(r"""
    import os, sys, time
    sys.path.insert(0, {root!r})
    from utils.run.lock import lock_output
    lock_output(sys.argv[1], config="holder.py")
    if sys.argv[2] == "fork-and-exit":  # a forked child (a DataLoader worker under "fork") outlives its parent
        if os.fork() == 0:
            os.write(1, b"child runs\n")  # after os.fork's at-fork hooks have run in it
            time.sleep(60)
            os._exit(0)
        os.write(1, b"locked\n")
        os._exit(0)
    os.write(1, b"locked\n")
    time.sleep(60)
""").format(root=REPO_ROOT)


def hold(folder, mode: str = "hold") -> subprocess.Popen:
    """A process that locks ``folder`` and says so on stdout."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), mode], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.timeout(60)
def test_a_live_holder_is_named_and_a_killed_one_does_not_block(tmp_path):
    holder = hold(tmp_path)
    try:
        with pytest.raises(OutputLockedError) as refused:
            lock_output(str(tmp_path))
        message = str(refused.value)
        assert "\n" not in message and str(tmp_path) in message
        assert f"host {socket.gethostname()}, pid {holder.pid}" in message and "holder.py" in message
        recorded = json.loads((tmp_path / LOCK_NAME).read_text())
        assert recorded["pid"] == holder.pid and recorded["host"] == socket.gethostname()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
    assert (tmp_path / LOCK_NAME).exists()  # kill -9 leaves the file, but not the lock
    assert lock_output(str(tmp_path)) is True
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert lock_output(str(tmp_path)) is True  # the same process again (in-process runs): no self-refusal
    release_output(str(tmp_path))
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.timeout(60)
def test_a_forked_child_does_not_keep_its_parents_lock(tmp_path):
    parent = hold(tmp_path, "fork-and-exit")
    parent.wait(timeout=10)
    assert parent.stdout.readline().strip() == "child runs"
    try:
        assert lock_output(str(tmp_path)) is True  # the child still runs, the lock died with its parent
    finally:
        release_output(str(tmp_path))
        os.killpg(parent.pid, signal.SIGKILL)


@pytest.mark.timeout(60)
def test_waiting_takes_the_lock_once_the_holder_is_gone(tmp_path):
    # An elastic restart: the previous attempt's rank 0 may still be exiting when the new one starts.
    holder = hold(tmp_path)
    killer = subprocess.Popen(["sh", "-c", f"sleep 1; kill -9 {holder.pid}"])
    start = time.monotonic()
    try:
        assert lock_output(str(tmp_path), wait_s=30) is True
        assert 0.5 < time.monotonic() - start < 30
    finally:
        release_output(str(tmp_path))
        killer.wait(timeout=10)
        holder.wait(timeout=10)
