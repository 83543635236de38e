"""One optimizer step's edges, as the trainer's loop sees them: fetching its batches (a dead DataLoader
worker is a reason to stop, not an exception) and counting non-finite losses in a row."""
from __future__ import annotations

import logging
import time
from typing import Any


from utils.devices import memory
from utils.run.state import TrainingError
from utils.run.stop import WorkerDeaths
from utils.run.watchdog import StepWatch

logger = logging.getLogger("arcscale.train")

def fetch_step(batches: Any, accumulation: int, deaths: WorkerDeaths, watch: StepWatch, step: int,
               wanted: bool = True) -> tuple[list | None, str, float]:
    """The micro-batches of optimizer step ``step`` (``watch`` learns: loading them, then loaded) and the seconds
    waited for them, or (None, why, seconds) when a DataLoader worker died (since the last step, e.g. during a
    checkpoint write, or while the batches were handed over); ([], "", 0) when ``wanted`` is False."""
    start = time.perf_counter()
    if not wanted:
        return [], "", 0.0
    if deaths.failure:
        return None, deaths.failure, 0.0
    watch.reached(step, "data")
    try:
        micro_batches = [next(batches) for _ in range(accumulation)]
        watch.reached(step, "step")
        return micro_batches, "", time.perf_counter() - start
    except RuntimeError as exc:
        if "DataLoader worker" not in str(exc) or memory.out_of_memory(exc):  # a worker out of memory: main() says so
            raise
        return None, str(exc).splitlines()[0], 0.0
    except (ConnectionError, EOFError) as exc:  # killed while handing a batch over (its fd socket broke)
        return None, f"a DataLoader worker died while handing over a batch ({type(exc).__name__}: {exc})", 0.0


def count_nonfinite(outcome: Any, in_a_row: int, step: int, cfg: Any) -> int:
    """Non-finite losses in a row after this step's ``outcome``: each warns; ``max_nonfinite_steps`` stops the run."""
    if outcome.loss_finite:
        return 0
    in_a_row += 1
    logger.warning("step %d: non-finite loss (%s); step skipped (%d in a row)", step, outcome.loss, in_a_row)
    if in_a_row >= cfg.max_nonfinite_steps:
        raise TrainingError(f"loss was non-finite for {in_a_row} optimizer steps in a row (max_nonfinite_steps="
                            f"{cfg.max_nonfinite_steps}, last at step {step}); lower lr, use bf16, or check the data")
    return in_a_row
