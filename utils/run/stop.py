"""Graceful stops: SIGTERM/SIGINT set a flag the training loop reads between steps.

Schedulers signal whole process groups (SLURM's scancel, a terminal's Ctrl-C, pod stops), so the
DataLoader workers get the signal too. Workers must not die of it: the main process decides when
to stop, finishes or abandons the current step on every rank alike, writes one checkpoint and
exits 0. Workers therefore start with SIGINT/SIGTERM blocked (the signal mask survives the
spawn's fork+exec) and ignore both once their Python is up.

A second SIGINT while a stop is pending means "now": one line on stderr, exit 130, no checkpoint.
SIGKILL cannot be caught; atomic checkpoint writes make it safe (see utils/checkpoint.py).

A DataLoader worker that dies (the OOM killer's favourite target) is noticed by torch's SIGCHLD
handler, which raises from whatever Python code the main thread runs at that instant: a checkpoint's
torch.save, a log write, a verification. :class:`WorkerDeaths` keeps that handler from raising: it
records the death, and the loop reads the record between steps, where stopping is safe.
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
def signals_blocked(*signals: int) -> Iterator[None]:
    """Block ``signals`` in this thread for the block's duration (threads started meanwhile, and children it
    forks, inherit the mask); signals sent to this thread arrive right after the block."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def stop_signals_blocked() -> contextlib.AbstractContextManager:
    """Block SIGINT/SIGTERM while child processes are spawned; pending signals arrive afterwards.

    Children inherit the blocked mask through fork+exec, so a signal to the process group during
    their start-up cannot kill them before :func:`ignore_stop_signals` runs in them.
    """
    return signals_blocked(*STOP_SIGNALS)


def ignore_stop_signals() -> None:
    """In a DataLoader worker: ignore SIGINT/SIGTERM (the main process owns shutdown), then unblock them."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class WorkerDeaths:
    """A DataLoader worker's death as a record read between steps, never an exception from a signal handler.

    torch's loader installs one SIGCHLD handler per process (when the first multi-worker iterator
    starts) that raises ``RuntimeError("DataLoader worker (pid N) is killed by signal: ...")`` at
    whatever bytecode the main thread is on. Raised inside a checkpoint's ``torch.save`` it cut the
    file short and ended the run with a traceback. :meth:`start` wraps that handler so the error is
    stored in :attr:`failure` instead; the trainer checks it where a stop is safe (before fetching a
    step) and the loader's own ``next()`` still reports a dead worker synchronously.
    """

    def __init__(self) -> None:
        self.failure = ""
        self._torch_handler: Any = None

    def __enter__(self) -> "WorkerDeaths":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._torch_handler is not None and signal.getsignal(signal.SIGCHLD) == self._record:
            signal.signal(signal.SIGCHLD, self._torch_handler)  # persistent workers may outlive train()
        self._torch_handler = None

    def start(self, loader: Any) -> Iterator:
        """``iter(loader)`` (workers spawned with stop signals blocked), then torch's SIGCHLD handler wrapped.

        A worker dying in the instant between torch installing its handler and this wrap makes torch
        raise out of ``iter()``: recorded the same way (the trainer then stops before fetching)."""
        try:
            with stop_signals_blocked():
                batches = iter(loader)
        except RuntimeError as exc:
            if "DataLoader worker" not in str(exc):
                raise
            self._note(exc)
            batches = iter(())
        current = signal.getsignal(signal.SIGCHLD)
        if callable(current) and current != self._record:
            self._torch_handler = current
            signal.signal(signal.SIGCHLD, self._record)
        return batches

    def _note(self, exc: BaseException) -> None:
        if not self.failure:
            self.failure = str(exc).strip().splitlines()[0].rstrip(".")

    def _record(self, signum: int, frame: Any) -> None:
        try:
            self._torch_handler(signum, frame)
        except RuntimeError as exc:  # torch's "DataLoader worker (pid N) is killed by signal: Killed."
            self._note(exc)


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
