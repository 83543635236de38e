"""Where this rank is in the run, and a watchdog for ranks that stop arriving.

The trainer marks two points per step on every rank (:meth:`StepWatch.reached`): before it fetches the
step's batches (``data``) and when it has them and enters the step's collectives (``step``). Error lines
say where the run was from them (:meth:`StepWatch.where`), and the first step's peak memory is logged when
the second begins, so a user sees the headroom before memory runs out.

With several ranks a thread on each rank publishes its latest point and a heartbeat counter to the
rendezvous TCP store (torchrun's agent hosts it, or rank 0 under a plain env:// launch) every
``poll_s``. While this rank has been waiting at a point for a few seconds it reads every rank's entry: a
rank whose point is behind (e.g. still loading its batches) or whose heartbeat stopped (a SIGSTOPped,
hung or vanished process) has not arrived. Then

- a warning once the wait passes ``WARN_FACTOR`` times the recent median step (at least ``WARN_FLOOR_S``,
  at most a third of the timeout), again at every doubling: ``step 50 has waited 120 s for rank 1 (no
  sign of life for 115 s)``; the lowest rank that is waiting logs it;
- once the wait reaches ``collective_timeout_s``: one ``error:`` line naming the missing rank(s), exit 2.
  It comes from this thread because the main thread sits inside a collective that cannot be interrupted;
  nothing is written, so the checkpoints stay as they were.

The process group's own timeout is ``collective_timeout_s + GRACE_S`` (:func:`process_group_timeout_s`),
so this report comes first also under NCCL/HCCL, whose watchdogs abort the process at their timeout. A
wait at which every rank has arrived (one rank writing a long checkpoint, a long verification) is not a
missing rank: only the process group's timeout ends it.
"""
from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections import deque
from typing import Any

from utils.devices import device as devices
from utils.devices import memory
from utils.run.exit import say_error

logger = logging.getLogger("arcscale.train")

GRACE_S = 60.0       # the process group's timeout is this much longer than collective_timeout_s
WARN_FACTOR = 10.0   # a wait is "far longer" than the median step from this factor on ...
WARN_FLOOR_S = 60.0  # ... and never before this many seconds (but always before a third of the timeout)
PHASES = ("setup", "data", "step")  # the order of the points within a step


def process_group_timeout_s(collective_timeout_s: float) -> float:
    """The process group's timeout for a run whose watchdog reports missing ranks at ``collective_timeout_s``."""
    return float(collective_timeout_s) + GRACE_S


def describe_missing(missing: dict[int, str]) -> str:
    """``{1: "no sign of life for 17 s"}`` -> ``rank 1 (no sign of life for 17 s)``."""
    return ", ".join(f"rank {rank} ({why})" for rank, why in sorted(missing.items()))


def _still_at(step: int, phase: str) -> str:
    if phase == "setup":
        return "still setting up"
    return f"still loading its batches for step {step}" if phase == "data" else f"still in step {step}"


class StepWatch:
    """This rank's position (step and phase), its first step's peak memory, and the stalled-rank watchdog
    (a context manager: the thread runs inside the ``with`` block, with several ranks only)."""

    def __init__(self, ctx: devices.DeviceContext, timeout_s: float, poll_s: float = 1.0) -> None:
        self.ctx, self.timeout_s, self.poll_s = ctx, float(timeout_s), float(poll_s)
        # A heartbeat that has not moved for this long means the process is not running.
        self.silent_after = min(10.0, max(3.0 * self.poll_s, self.timeout_s / 4))
        self._state: tuple[int, str, float] = (0, "setup", time.monotonic())  # (step, phase, since): one tuple,
        # replaced whole, so the thread never reads half an update
        self._durations: deque[float] = deque(maxlen=50)
        self._step_started: float | None = None
        self._steps_seen, self._memory_logged = 0, False
        self.missing: dict[int, str] = {}  # the ranks the last look found missing, with why
        self.exiting = threading.Event()  # set once the watchdog reports and leaves
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store: Any = None

    # ------------------------------------------------------------ main thread

    def reached(self, step: int, phase: str) -> None:
        """This rank is at ``phase`` ("data" or "step") of optimizer step ``step`` (1-based)."""
        now = time.monotonic()
        if phase == "step":
            if self._step_started is not None:
                self._durations.append(now - self._step_started)
            self._step_started = now
            self._steps_seen += 1
        elif self._steps_seen == 1 and not self._memory_logged:
            self._log_first_step_memory(step - 1)
        self._state = (step, phase, now)

    def where(self) -> str:
        """Where this rank is, for an error line: ``step 12``, ``step 12 (loading its batches)``, ``setting up``."""
        step, phase, _ = self._state
        if phase == "setup":
            return "setting up (before the first step)"
        return f"step {step} (loading its batches)" if phase == "data" else f"step {step}"

    def _log_first_step_memory(self, step: int) -> None:
        self._memory_logged = True
        try:
            report = memory.peak_memory_report(self.ctx)
        except (RuntimeError, AttributeError, OSError) as exc:  # a device API that says no: a lost line, not a run
            logger.warning("step %d: peak memory unavailable (%s)", step, exc)
            return
        logger.info("step %d (this run's first): %s", step, report)

    def __enter__(self) -> "StepWatch":
        if not self.ctx.distributed:
            return self
        try:
            self._store = devices.attempt_store("heartbeat", self.ctx, self.silent_after)
            self._publish(0)
        except (RuntimeError, KeyError, ValueError) as exc:  # torch's DistNetworkError/DistStoreError; no address
            logger.warning("watchdog off: the rendezvous store does not answer (%s); a stalled rank is then only "
                           "reported by the process group's timeout", (str(exc).strip() or repr(exc)).splitlines()[0])
            return self
        self._thread = threading.Thread(target=self._run, name="arcscale-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, *exc_info: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.silent_after + 2 * self.poll_s)
        # Close the store client now, before the process group is torn down, not during interpreter exit
        # (a C++ client destroyed that late can abort the process: "terminate called without an active exception").
        self._store = None
        if exc_type is None and self._steps_seen == 1 and not self._memory_logged:
            self._log_first_step_memory(self._state[0])  # a one-step run

    # ------------------------------------------------------------ watchdog thread

    def _publish(self, beat: int) -> None:
        step, phase, _ = self._state
        self._store.set(str(self.ctx.rank), f"{beat} {step} {phase}")

    def _run(self) -> None:
        beat, seen, watched, next_warning = 0, {}, None, 0.0
        while not self._stop.wait(self.poll_s):
            beat += 1
            state = self._state
            waited = time.monotonic() - state[2]
            try:
                self._publish(beat)
                if waited < 2 * self.poll_s:  # not waiting: every rank arrived at this rank's last point
                    seen.clear()
                    continue
                missing = self._look(seen, state)
            except RuntimeError:  # the store does not answer: the rank hosting it (if one does) is not running
                host = devices.store_host_rank()
                missing = {host: "it hosts the rendezvous store, which does not answer"} \
                    if host is not None and host != self.ctx.rank else {}
            self.missing = missing
            if watched != state:
                watched, next_warning = state, self._warn_after()
            if not missing:
                continue
            if waited >= self.timeout_s:
                self._leave(state[0], missing)
            if waited >= next_warning:
                if self._reports(missing):
                    logger.warning("step %d has waited %.0f s for %s; the run stops at collective_timeout_s=%g s",
                                   state[0], waited, describe_missing(missing), self.timeout_s)
                next_warning = 2 * waited

    def _warn_after(self) -> float:
        median = statistics.median(self._durations) if self._durations else 0.0
        return min(max(WARN_FACTOR * median, WARN_FLOOR_S), self.timeout_s / 3)

    def _look(self, seen: dict[int, tuple[str, float]], state: tuple[int, str, float]) -> dict[int, str]:
        """The ranks that have not arrived at this rank's point: behind it, or silent for ``silent_after``."""
        now, mine, missing = time.monotonic(), (state[0], PHASES.index(state[1])), {}
        for rank in range(self.ctx.world_size):
            if rank == self.ctx.rank:
                continue
            key = str(rank)
            value = self._store.get(key).decode() if self._store.check([key]) else ""
            if rank not in seen or seen[rank][0] != value:
                seen[rank] = (value, now)  # its heartbeat moved (or this is the first look)
            silent = now - seen[rank][1]
            if silent >= self.silent_after:
                missing[rank] = f"no sign of life for {silent:.0f} s"
            elif value:
                _, step, phase = value.split()
                if (int(step), PHASES.index(phase)) < mine:
                    missing[rank] = _still_at(int(step), phase)
        return missing

    def _reports(self, missing: dict[int, str]) -> bool:
        """The lowest rank that is not missing speaks for all that wait (one line, not one per rank)."""
        return min(rank for rank in range(self.ctx.world_size) if rank not in missing) == self.ctx.rank

    def _leave(self, step: int, missing: dict[int, str]) -> None:
        message = (f"step {step}: {describe_missing(missing)} did not arrive within collective_timeout_s="
                   f"{self.timeout_s:g} s; stopped without writing anything (the checkpoints are as they were): "
                   f"once every rank is healthy, continue with resume=True")
        self.exiting.set()
        if self._reports(missing):
            logger.error("error: %s", message, extra={"console": False})  # training.log; stderr below
            say_error(message)
        else:
            logger.warning("leaving as well: %s", message)
        for handler in logging.getLogger().handlers:
            handler.flush()
        # The main thread is blocked inside a collective: only leaving the process ends it.
        os._exit(2)
