"""Graceful stops: SIGTERM/SIGINT set a flag the training loop reads between steps.

Schedulers signal whole process groups (SLURM's scancel, a terminal's Ctrl-C, pod stops), so the
DataLoader workers get the signal too. Workers must not die of it: the main process decides when
to stop, finishes or abandons the current step on every rank alike, writes one checkpoint and
exits 0. Workers therefore start with SIGINT/SIGTERM blocked (the signal mask survives the
spawn's fork+exec) and ignore both once their Python is up.

A second SIGINT while a stop is pending means "now": one line on stderr, exit 130, no checkpoint.
SIGKILL cannot be caught; atomic checkpoint writes make it safe (see utils/checkpoint.py).
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from typing import Any, Iterator

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Context manager that turns SIGTERM/SIGINT into ``requested = True`` (and restores handlers on exit)."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info: Any) -> None:
        # Give the previous handlers back (matters when train() runs inside another program).
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            # The user insists: leave now, in one line, without the checkpoint.
            sys.stderr.write(f"second {name}: stopping now without a checkpoint "
                             f"(the newest complete checkpoint stays usable)\n")
            sys.stderr.flush()
            os._exit(130)
        if not self.requested:
            self.requested = True
            self.signal_name = name
            logger.warning("%s received: finishing the current step, then checkpoint and exit "
                           "(Ctrl-C again to stop at once)", name)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block SIGINT/SIGTERM while child processes are spawned; pending signals arrive afterwards.

    Children inherit the blocked mask through fork+exec, so a signal to the process group during
    their start-up cannot kill them before :func:`ignore_stop_signals` runs in them.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_stop_signals() -> None:
    """In a DataLoader worker: ignore SIGINT/SIGTERM (the main process owns shutdown), then unblock them."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


_EXIT_HOOK_REGISTERED = False


def _kill_leftover_workers() -> None:
    # multiprocessing's own exit hook SIGTERMs daemonic children and then joins them; our DataLoader
    # workers ignore SIGTERM (see above), so a loader still alive at interpreter exit would hang the
    # join. This hook runs first (atexit is last-in, first-out) and ends such workers for good.
    # Daemonic children are meant to die with this process anyway; SIGKILL instead of SIGTERM.
    import multiprocessing

    # torch's SIGCHLD handler would report each of these deaths as a failed worker.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for process in multiprocessing.active_children():
        if process.daemon:
            process.kill()
            process.join(timeout=5)


def end_workers_at_exit() -> None:
    """Make sure DataLoader workers that ignore SIGTERM never outlive the interpreter (idempotent)."""
    global _EXIT_HOOK_REGISTERED
    if not _EXIT_HOOK_REGISTERED:
        import atexit
        import multiprocessing.util  # noqa: F401

        atexit.register(_kill_leftover_workers)
        _EXIT_HOOK_REGISTERED = True
