"""How the training process ends once its work is done: the exit handlers run and the streams are flushed,
then the process leaves without the interpreter's finalization.

Why: under DDP the gradient all-reduce runs a Python callback (our comm hook's ``future.then``) on the
backend's own threads (gloo's, NCCL's watchdog, HCCL's), and those C++ threads keep references to Python
objects. If one of them touches Python after the main thread has begun finalizing, CPython (3.8-3.13)
ends that thread with ``pthread_exit``; unwinding through torch's ``noexcept`` frames then calls
``std::terminate`` ("terminate called without an active exception", SIGABRT). A 2-rank run that wrote
every output then exits -6 and torchrun reports it failed. ``destroy_process_group`` does not prevent
it: the DDP reducer (which holds the hook) outlives it. Nothing is left to do at that point, so the
process skips finalization; what a normal exit would still do (our atexit hooks: the output lock,
leftover DataLoader workers; ``logging.shutdown``; multiprocessing's children) runs first.

Leaving at once has one cost on several ranks: torchrun stops every rank as soon as one exits non-zero,
so after an error that every rank reached (a locked output folder, a bad resume), the fastest rank's
exit could kill the others before they print their own line. :func:`wait_for_peers` lets the ranks
leave together, bounded by a few seconds for a rank that will never come.
"""
from __future__ import annotations

import atexit
import os
import sys
import time
from typing import NoReturn

from utils.devices import device as devices


def leave(code: int) -> NoReturn:
    """End this process with exit status ``code`` after running the atexit handlers and flushing
    stdout/stderr, without interpreter finalization (see the module docstring)."""
    atexit._run_exitfuncs()  # last-in first-out, as at a normal exit; a failing handler is printed and skipped
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # a closed or replaced stream has nothing to flush
            pass
    os._exit(code)


def say_error(message: str) -> None:
    """``error: <message>`` on stderr as ONE write of the whole line: under ``PYTHONUNBUFFERED=1`` (common in
    job scripts) ``print`` writes the text and its newline separately, and ranks that share a terminal or
    pipe then run their lines together. One write of a line under PIPE_BUF (4 KiB) is atomic."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def wait_for_peers(ctx: devices.DeviceContext, timeout_s: float = 5.0) -> bool:
    """Before an error exit on several ranks: count this rank as leaving in the rendezvous store and wait
    (at most ``timeout_s``) until every rank has. False when some did not come (one stuck in a collective,
    one already dead) or the store does not answer; never raises."""
    if not ctx.distributed:
        return True
    deadline = time.monotonic() + timeout_s
    try:
        store = devices.attempt_store("leaving", ctx, timeout_s)
        arrived = store.add("count", 1)
        while arrived < ctx.world_size and time.monotonic() < deadline:
            time.sleep(0.05)
            arrived = store.add("count", 0)
        return arrived >= ctx.world_size
    except (RuntimeError, KeyError, ValueError):  # torch's DistNetworkError/DistStoreError; no store address
        return False
