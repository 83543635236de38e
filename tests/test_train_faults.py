"""train.py when a rank stalls, memory runs out, or start-up is slow: a rank stopped with SIGSTOP under
torchrun, a real allocation failure under an address-space limit, the first step's peak memory and the
DataLoader workers' start. Real subprocess runs of the tiny config of tests/test_train_stops.py, each
bounded and its processes killed afterwards."""
from __future__ import annotations

import hashlib
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.test_train_stops import (PYTHON, checkpoints, find_rank_pid, identity_cache, launch, load,  # noqa: F401
                                    run_to_end, torchrun_args, train_args, training_log, wait_for_step,
                                    write_config)


def file_hashes(folder: Path) -> dict[str, str]:
    """{name: SHA-256} of every file in ``folder`` (training.log aside: it is the run's diary, not its state)."""
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.iterdir()) if path.is_file() and path.name != "training.log"}


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------- a stalled rank

@pytest.mark.timeout(300)
def test_a_stalled_rank_is_named_and_the_run_stops_with_its_checkpoints_untouched(tmp_path, identity_cache):
    timeout_s = 20
    config = write_config(tmp_path, "stall", identity_cache, num_epoch=40, save_every_steps=2,
                          collective_timeout_s=timeout_s)
    output = tmp_path / "out_stall"
    with launch(torchrun_args(config), tmp_path) as launched:
        rank1 = find_rank_pid(launched, 1)
        wait_for_step(launched, output, 3)
        os.kill(rank1, signal.SIGSTOP)  # alive but not running: no exit for torchrun to notice
        stopped_at = time.monotonic()
        while not re.search(r"has waited \d+ s for rank 1", training_log(output)):
            assert launched.proc.poll() is None, launched.output[-3000:]
            assert time.monotonic() - stopped_at < 60, training_log(output)[-3000:]
            time.sleep(0.2)
        state = file_hashes(output)  # rank 0 is waiting now: nothing may change from here on
        rc = launched.wait(timeout=150)
    assert rc != 0, launched.output[-3000:]
    log = training_log(output)
    warning = re.search(r"step (\d+) has waited (\d+) s for rank 1 \(no sign of life for \d+ s\); the run stops at "
                        rf"collective_timeout_s={timeout_s} s", log)
    assert warning and 5 <= int(warning.group(2)) < timeout_s, log[-3000:]
    lines = error_lines(launched.stderr)
    assert len(lines) == 1, launched.output[-3000:]
    assert re.match(rf"error: step {warning.group(1)}: rank 1 \(no sign of life for \d+ s\) did not arrive within "
                    rf"collective_timeout_s={timeout_s} s; stopped without writing anything", lines[0]), lines[0]
    assert lines[0] in log  # training.log tells it too
    # Rank 0 left with exit 2 (torchrun's summary), without a traceback of its own or gloo's timeout text.
    assert re.search(r"exitcode\s*:\s*2", launched.output), launched.output[-3000:]
    assert "Timed out waiting" not in launched.output and 'File "/' not in launched.stderr.split("error:")[0]
    # Checkpoint state untouched: the same files, bit for bit, and the newest loads.
    assert file_hashes(output) == state
    newest = checkpoints(output)
    assert load(newest[max(newest)])["step"] == max(newest) <= int(warning.group(1))
