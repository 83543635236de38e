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
"""
from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn


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
