"""Logging set-up (rank 0 talks, others warn only) and the periodic training status line."""
from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time

_STARTUP_RECORDS = 10_000  # records kept for training.log before it exists (far more than a start logs)


def _console_record(record: logging.LogRecord) -> bool:
    # Records logged with extra={"console": False} go to training.log only (main() prints them itself).
    return getattr(record, "console", True)


def setup_logging(rank: int, output: str | None = None, level: str = "INFO") -> None:
    """Rank 0 logs at ``level`` to stdout (and ``<output>/training.log`` when given); other ranks log
    warnings only."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO) if rank == 0 else logging.WARNING)
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(_formatter(rank))
    stream.addFilter(_console_record)
    root.addHandler(stream)
    if rank == 0:
        root.addHandler(_StartupBuffer(_STARTUP_RECORDS))
    if output:
        attach_log_file(rank, output)


class _StartupBuffer(logging.handlers.BufferingHandler):
    """Holds what rank 0 logs before training.log is attached (cleaning leftovers, skipping a broken
    checkpoint, an elastic restart), so the file tells the whole start; a refused run just drops it."""

    def shouldFlush(self, record: logging.LogRecord) -> bool:
        return False

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.buffer) < self.capacity:
            self.buffer.append(record)


def _formatter(rank: int) -> logging.Formatter:
    return logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")


class _LogFile(logging.FileHandler):
    """training.log. A write that fails (a full disk) is said once on stderr, not a traceback per record;
    the console keeps every line, and the file takes them again once writes work."""

    failing = False
    _failed_now = False

    def emit(self, record: logging.LogRecord) -> None:
        self._failed_now = False
        super().emit(record)
        if not self._failed_now:
            self.failing = False

    def handleError(self, record: logging.LogRecord | None) -> None:
        self._failed_now = True
        if not self.failing:
            self.failing = True
            error = sys.exc_info()[1]
            sys.stderr.write(f"warning: cannot write {self.baseFilename} "
                             f"({getattr(error, 'strerror', None) or error}); the console has the lines\n")

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # the last buffered lines could not be flushed either
            self.handleError(None)


def attach_log_file(rank: int, output: str) -> None:
    """Rank 0 also logs to ``<output>/training.log`` (appended: a resumed run continues the same file),
    starting with what it logged since ``setup_logging``. The trainer attaches it only once the output
    folder is accepted, so a refused run leaves it untouched."""
    if rank != 0:
        return
    os.makedirs(output, exist_ok=True)
    file_handler = _LogFile(os.path.join(output, "training.log"))
    file_handler.setFormatter(_formatter(rank))
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StartupBuffer):
            root.removeHandler(handler)
            for record in handler.buffer:
                file_handler.handle(record)
    root.addHandler(file_handler)


class RunningMean:
    """Mean of the values seen since the last reset."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every value."""
        self.total = 0.0
        self.count = 0

    def update(self, value: float, count: int = 1) -> None:
        """Add ``value`` with weight ``count``."""
        self.total += value * count
        self.count += count

    @property
    def mean(self) -> float:
        """Weighted mean so far (0 before any value)."""
        return self.total / max(self.count, 1)


class StepTimer:
    """Throughput, ETA and the fraction of wall time spent waiting for data, between two reports."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.last = self.start
        self.data_wait = 0.0
        self.samples = 0

    def add(self, samples: int, data_wait: float) -> None:
        """Count a step's samples and data-wait seconds."""
        self.samples += samples
        self.data_wait += data_wait

    def report(self, step: int, total_steps: int, start_step: int) -> dict:
        """samples/s, data-wait fraction and ETA since the last report; starts a new interval."""
        now = time.perf_counter()
        elapsed = max(now - self.last, 1e-9)
        done = max(step - start_step, 1)
        eta_s = (now - self.start) / done * max(total_steps - step, 0)
        stats = {"samples_per_s": self.samples / elapsed, "data_wait": self.data_wait / elapsed, "eta_s": eta_s}
        self.last = now
        self.samples = 0
        self.data_wait = 0.0
        return stats


def format_eta(seconds: float) -> str:
    """Seconds as ``0h00m00s``."""
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
