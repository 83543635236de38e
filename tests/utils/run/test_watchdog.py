"""utils/run/watchdog.py: two ranks' watches on a real TCP store in one process. A rank that is alive but
behind (still loading its batches) is named, warned about, and at the timeout the waiting rank reports it
in one error line and leaves with exit code 2. The stalled (SIGSTOPped) rank under torchrun is
tests/test_train_faults.py."""
from __future__ import annotations

import datetime
import logging
import re
import time

import pytest
import torch
import torch.distributed as dist

from tests.conftest import free_port
from utils.devices.device import DeviceContext
from utils.run import watchdog


class Left(SystemExit):
    """Stands in for os._exit inside the watchdog thread (ends the thread, not the test process)."""


@pytest.fixture
def store_env(monkeypatch):
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=datetime.timedelta(seconds=10))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    for key in ("TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    yield server


def rank_ctx(rank: int) -> DeviceContext:
    return DeviceContext("cpu", torch.device("cpu"), rank, rank, 2, "gloo")


# os._exit stood in for by an exception ends the watchdog thread; pytest would warn about that exception.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_rank_behind_is_named_warned_about_and_ends_the_run_at_the_timeout(store_env, monkeypatch, caplog,
                                                                             capsys):
    exits = []

    def leave(code: int) -> None:
        exits.append(code)
        raise Left(code)

    monkeypatch.setattr(watchdog.os, "_exit", leave)
    caplog.set_level(logging.WARNING, logger="arcscale.train")
    waiting = watchdog.StepWatch(rank_ctx(0), timeout_s=2.4, poll_s=0.1)
    slow = watchdog.StepWatch(rank_ctx(1), timeout_s=60, poll_s=0.1)
    with slow, waiting:
        for step in (1, 2, 3):  # both ranks through three steps
            for watch in (waiting, slow):
                watch.reached(step, "data")
                watch.reached(step, "step")
        waiting.reached(4, "data")
        waiting.reached(4, "step")  # rank 0 waits in step 4's collectives ...
        slow.reached(4, "data")     # ... while rank 1 is still loading its batches (alive: its heartbeat moves)
        deadline = time.monotonic() + 10
        while not exits and time.monotonic() < deadline:
            time.sleep(0.05)
        assert waiting.missing == {1: "still loading its batches for step 4"}
        assert slow.missing == {}  # the rank behind waits for nobody
    assert exits == [2] and waiting.exiting.is_set()
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    # Warned from a third of the timeout on (the floor of 60 s is capped there), before the error.
    assert warnings and re.fullmatch(r"step 4 has waited (\d+) s for rank 1 \(still loading its batches for step 4\); "
                                     r"the run stops at collective_timeout_s=2.4 s", warnings[0]), warnings
    levels = [record.levelno for record in caplog.records]
    assert levels.index(logging.WARNING) < levels.index(logging.ERROR)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == ["error: step 4: rank 1 (still loading its batches for step 4) did not arrive within "
                      "collective_timeout_s=2.4 s; stopped without writing anything (the checkpoints are as they "
                      "were): once every rank is healthy, continue with resume=True"]


def test_ranks_that_arrive_are_not_missing_and_the_position_is_said(store_env):
    first, second = watchdog.StepWatch(rank_ctx(0), 60, 0.1), watchdog.StepWatch(rank_ctx(1), 60, 0.1)
    assert first.where() == "setting up (before the first step)"
    with first, second:
        for watch in (first, second):
            watch.reached(7, "data")
        assert first.where() == "step 7 (loading its batches)"
        for watch in (first, second):
            watch.reached(7, "step")
        time.sleep(0.6)  # both wait at the same point: nobody is missing
        assert first.missing == {} and second.missing == {} and first.where() == "step 7"
    assert watchdog.process_group_timeout_s(1800) == 1800 + watchdog.GRACE_S


def test_heartbeats_go_under_the_attempt_every_rank_agreed_on_not_this_nodes_restart_count(store_env, monkeypatch):
    # torchrun's count is per node: after a worker failed on another node this node still says 0, while the
    # ranks agreed at start-up (DeviceContext.restarts) that this is attempt 1. A key named by the node's count
    # would sit beside the dead attempt's heartbeats, where a watch on the other node never looks.
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    dead = dist.PrefixStore("arcscale/heartbeat/0/", store_env)
    dead.set("1", "0 3 step")  # the dead attempt's last beat of rank 1: step 3
    ctx = DeviceContext("cpu", torch.device("cpu"), 1, 1, 2, "gloo", restarts=1)
    with watchdog.StepWatch(ctx, 60, 0.1) as watch:
        watch.reached(9, "data")
        time.sleep(0.3)
        beat = dist.PrefixStore("arcscale/heartbeat/1/", store_env).get("1").decode()
        assert beat.split()[1:] == ["9", "data"]
        assert dead.get("1").decode() == "0 3 step"  # the dead attempt's keys are left alone
