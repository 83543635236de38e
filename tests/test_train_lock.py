"""Two runs into one output folder: the one that starts second stops with one line naming the holder (host,
pid) and touches nothing; once the holder is killed with -9 its lock is gone and resume="auto" continues.
Real subprocess runs of the tiny config of tests/test_train_stops.py (the elastic restart, whose new rank 0
must get the lock its killed predecessor held, is test_train_stops.py's
test_elastic_restart_after_a_rank_is_killed_resumes_by_itself)."""
from __future__ import annotations

import json
import signal
import socket

import pytest

from tests.test_train_stops import (checkpoints, error_lines, identity_cache, launch, load,  # noqa: F401
                                    logged_steps, run_to_end, torchrun_args, train_args, training_log,
                                    wait_for_step, write_config)
from utils.run.lock import LOCK_NAME


@pytest.mark.timeout(300)
def test_a_second_run_into_a_live_folder_stops_naming_the_holder_and_a_killed_holder_does_not_block(
        tmp_path, identity_cache):
    config = write_config(tmp_path, "shared", identity_cache, max_steps=8, save_every_steps=2, keep_checkpoints=0)
    output = tmp_path / "out_shared"
    with launch(train_args(config), tmp_path) as first:
        wait_for_step(first, output, 3)  # past the step-2 save
        first.signal_group(signal.SIGSTOP)  # the holder stays alive (and holding) for as long as the test needs
        holder = json.loads((output / LOCK_NAME).read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        before = {step: path.stat().st_mtime_ns for step, path in checkpoints(output).items()}
        log_before = training_log(output)
        # The case: a second launch with resume="auto", on 2 ranks, into the live run's folder.
        second = run_to_end(torchrun_args(config, "resume='auto'"), tmp_path)
        assert second.proc.returncode != 0, second.output[-3000:]
        lines = error_lines(second)
        assert len(lines) == 2, second.output[-3000:]  # each rank says the same one line
        for line in lines:
            assert "in use by another run" in line and str(output) in line, line
            assert f"host {socket.gethostname()}, pid {first.pid}" in line, line
        # the second run wrote nothing: not a log line, not a checkpoint
        assert training_log(output) == log_before
        assert {step: path.stat().st_mtime_ns for step, path in checkpoints(output).items()} == before
        first.signal_group(signal.SIGKILL)  # kill -9: the lock goes with the process, its file stays
        first.wait()
    assert (output / LOCK_NAME).exists()
    newest = max(checkpoints(output))
    assert load(checkpoints(output)[newest])["step"] == newest

    third = run_to_end(train_args(config, "resume='auto'"), tmp_path)
    assert third.proc.returncode == 0, third.output[-3000:]
    resumed = training_log(output)[len(log_before):]
    assert f"resumed from {checkpoints(output).get(newest, output / f'checkpoint_step{newest:09d}.pt')} " \
           f"at step {newest} of 8" in resumed, resumed[-3000:]
    assert logged_steps(resumed)[-1]["step"] == 8 and load(checkpoints(output)[8])["step"] == 8
    assert not (output / LOCK_NAME).exists()  # a run that ends removes its lock file
