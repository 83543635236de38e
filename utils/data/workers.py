"""DataLoader worker setup: route the workers' log records to the trainer, seed them, and say how long
their start takes.

Workers are spawned, so they start without any logging configuration: ``init_worker`` (the
loader's ``worker_init_fn``) sends each record through a queue that a thread of the training
process drains into its own handlers (console and training.log). It also makes the worker ignore
the stop signals the main process handles, and seeds numpy and ``random`` from torch's seed.
"""
from __future__ import annotations

import logging
import logging.handlers
import random
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch

logger = logging.getLogger(__name__)

SLOW_START_S = 30.0  # a worker start slower than this is a warning, with what to lower
_log_queue: Any = None


def _forward_worker_logs(queue: Any) -> None:
    # Spawned workers have no logging config: their records come here and go through this
    # process's handlers (console and training.log), exactly as if logged by the trainer.
    while True:
        try:
            record = queue.get()
        except (EOFError, OSError, ValueError):  # the queue was closed at shutdown
            return
        target = logging.getLogger(record.name)
        if target.isEnabledFor(record.levelno):
            target.handle(record)


def worker_log_queue() -> Any:
    """The queue DataLoader workers log into (created, with its forwarding thread, once per process)."""
    global _log_queue
    if _log_queue is None:
        import multiprocessing

        _log_queue = multiprocessing.get_context("spawn").Queue()
        threading.Thread(target=_forward_worker_logs, args=(_log_queue,), name="worker-log-forwarder",
                         daemon=True).start()
    return _log_queue


def init_worker(log_queue: Any, level: int, worker_id: int) -> None:
    """``worker_init_fn``: log into ``log_queue`` at ``level``, then seed this worker."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(logging.handlers.QueueHandler(log_queue))
    root.setLevel(level)
    _seed_worker(worker_id)


def _seed_worker(worker_id: int) -> None:
    # The main process owns shutdown: a signal to the whole process group must not kill workers.
    from utils.run.stop import ignore_stop_signals

    ignore_stop_signals()
    # torch seeds each worker from the loader's generator; numpy and random follow it.
    import cv2

    cv2.setNumThreads(1)  # one decode thread per worker: workers are the parallelism
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def start_logged(loader: Any, start: Callable[[Any], Iterator]) -> Iterator:
    """``start(loader)``, the iterator over its batches; when that starts the loader's worker processes
    (persistent workers: the first epoch only), one line before and one at the first batch with how long
    the start took (spawned workers each import torch and open the data first: seconds each)."""
    workers = int(getattr(loader, "num_workers", 0) or 0)
    if not workers or getattr(loader, "workers_started", False):
        return start(loader)
    logger.info("starting %d DataLoader worker process(es) (num_workers=%d per rank); each imports torch and "
                "opens the data before the first batch", workers, workers)
    began = time.perf_counter()
    batches = start(loader)
    loader.workers_started = True
    return _first_batch_timed(batches, began, workers)


def _first_batch_timed(batches: Iterator, began: float, workers: int) -> Iterator:
    try:
        first = next(batches)  # a dead worker's error reaches the caller's next() as it is
    except StopIteration:
        return
    took = time.perf_counter() - began
    if took > SLOW_START_S:
        logger.warning("DataLoader workers started: first batch after %.1f s (num_workers=%d per rank; fewer "
                       "workers start sooner)", took, workers)
    else:
        logger.info("DataLoader workers started: first batch after %.1f s", took)
    yield first
    yield from batches
