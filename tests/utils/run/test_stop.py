"""utils/stop.py: a dead DataLoader worker is recorded, never raised from a signal handler mid-code."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from utils.run.stop import STOP_SIGNALS, WorkerDeaths, signals_blocked


def blocked_signals(pid: int) -> int:
    """The SigBlk mask of ``pid`` (any thread of it: /proc/PID/status shows the main thread's)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return int(line.split()[1], 16)
    raise AssertionError("no SigBlk line")


def is_zombie(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def spawn_loader() -> DataLoader:
    data = TensorDataset(torch.arange(64, dtype=torch.float32))
    return DataLoader(data, batch_size=4, num_workers=1, multiprocessing_context="spawn", persistent_workers=True,
                      worker_init_fn=_unblock_in_worker)


def _unblock_in_worker(worker_id: int) -> None:
    from utils.run.stop import ignore_stop_signals

    ignore_stop_signals()


@pytest.mark.timeout(120)
def test_a_killed_worker_is_recorded_and_the_next_fetch_reports_it():
    with WorkerDeaths() as deaths:
        batches = deaths.start(spawn_loader())
        first = next(batches)
        assert first[0].tolist() == [0.0, 1.0, 2.0, 3.0]
        worker = batches._workers[0].pid
        assert blocked_signals(worker) & sum(1 << (sig - 1) for sig in STOP_SIGNALS) == 0  # unblocked once it runs
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not is_zombie(worker) and time.monotonic() < deadline:
            time.sleep(0.01)
        for _ in range(50):  # ordinary Python code runs on: torch's handler would raise right here
            time.sleep(0.01)
        assert deaths.failure.startswith(f"DataLoader worker (pid {worker}) is killed by signal"), deaths.failure
        with pytest.raises(RuntimeError, match="DataLoader worker"):  # the loader itself still says so, synchronously
            for _ in range(100):
                next(batches)
        del batches
    assert signal.getsignal(signal.SIGCHLD) != deaths._record  # torch's handler is back once the run is over


def test_signals_blocked_restores_the_mask_and_delivers_pending_signals_after():
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    try:
        with signals_blocked(signal.SIGUSR1, *STOP_SIGNALS):
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
            time.sleep(0.05)
            assert received == []
            assert signal.SIGUSR1 in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        assert received == [signal.SIGUSR1]
        assert signal.SIGUSR1 not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_torchs_handler_raising_out_of_iter_is_recorded_too(monkeypatch):
    """A worker dying between torch installing its SIGCHLD handler and the wrap: iter() raises; recorded."""
    class DiesOnStart:
        def __iter__(self):
            raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")

    with WorkerDeaths() as deaths:
        assert list(deaths.start(DiesOnStart())) == []
    assert deaths.failure == "DataLoader worker (pid 4242) is killed by signal: Killed"
    with WorkerDeaths() as deaths, pytest.raises(ValueError):  # anything else is not ours to swallow
        deaths.start(type("Broken", (), {"__iter__": lambda self: (_ for _ in ()).throw(ValueError("x"))})())
