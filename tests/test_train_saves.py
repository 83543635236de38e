"""train.py when its checkpoint or model.pt writes fail: torch's zip-writer error on a full disk (a patched
writer, and a real small tmpfs when this machine lets us mount one), files that cannot be written
(directories put at their names, which stops root too), and the final save failing. Each failure is one
line handled by on_save_error; a run whose final state is not on disk exits 2 saying what is there.
Real subprocess runs of the tiny config of tests/test_train_stops.py."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import torch

from tests.test_train_stops import (PYTHON, Launched, assert_one_line_error, checkpoints,  # noqa: F401
                                    error_lines, identity_cache, launch, load, logged_steps, run_to_end,
                                    torchrun_args, train_args, training_log, write_config)


def backbone_equals(model_file: Path, checkpoint_file: Path) -> bool:
    """model.pt holds exactly the backbone of that checkpoint."""
    model, backbone = load(model_file), load(checkpoint_file)["backbone"]
    return sorted(model) == sorted(backbone) and all(torch.equal(model[key], backbone[key]) for key in model)


def written(folder: Path) -> dict[int, Path]:
    """{step: path} of the checkpoint files (not the directories a test put at a checkpoint's name)."""
    return {step: path for step, path in checkpoints(folder).items() if path.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Temporary files of a write (``*.tmp.<pid>``) still in the folder."""
    return [name for name in os.listdir(folder) if ".tmp." in name and not os.path.isdir(folder / name)]


def wait_for_saved(launched: Launched, output: Path, step: int, timeout: float = 90) -> None:
    """Block until rank 0 logged that the step-``step`` checkpoint and its model.pt are written."""
    deadline, wanted = time.monotonic() + timeout, f"checkpoint_step{step:09d}.pt (step {step},"
    while wanted not in training_log(output):
        assert launched.proc.poll() is None, f"the run ended before step {step}:\n{launched.output[-3000:]}"
        assert time.monotonic() < deadline, f"no save at step {step} within {timeout}s:\n{launched.output[-3000:]}"
        time.sleep(0.005)


def summary_names(launched: Launched, checkpoint: Path) -> bool:
    """The end summary was printed and names this checkpoint as the run's result."""
    return "outputs in" in launched.stdout and re.search(rf"checkpoint\s+{re.escape(str(checkpoint))}", launched.stdout)


# ---------------------------------------------------------------- torch's zip-writer error (full disk), patched

@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode, ranks", [("warn", 1), ("stop", 2)], ids=["warn-1-rank", "stop-2-ranks"])
def test_a_full_disk_error_from_torchs_writer_is_one_line_handled_by_the_policy(tmp_path, identity_cache, mode,
                                                                                ranks):
    config = write_config(tmp_path, "full", identity_cache, max_steps=6, save_every_steps=2, keep_checkpoints=0,
                          on_save_error=mode)
    output, report = tmp_path / "out_full", tmp_path / "report.jsonl"
    target = "checkpoint_step000000004.pt" if ranks == 1 else "checkpoint_step000000002.pt"
    driver = [os.path.join("tests", "fail_writes.py"), target, str(report), config]
    args = [PYTHON, *driver] if ranks == 1 else [*torchrun_args(config, nproc=ranks)[:-2], *driver]
    launched = run_to_end(args, tmp_path)
    raised = [json.loads(line) for line in report.read_text().splitlines()]
    # what reached the trainer was torch's own error, not an OSError
    assert raised and all(r["raised"] == "RuntimeError" and "unexpected pos" in r["message"] for r in raised), raised
    failed = output / target
    log = training_log(output)
    assert not leftovers(output) and not failed.exists()
    if mode == "warn":
        assert launched.proc.returncode == 0, launched.output[-3000:]
        assert "Traceback" not in launched.output
        warned = [line for line in log.splitlines() if "WARNING" in line and str(failed) in line]
        assert len(warned) == 1 and "No space left on device" in warned[0], log[-3000:]
        assert "training goes on" in warned[0] and "checkpoint_step000000002.pt (step 2)" in warned[0], warned
        assert sorted(checkpoints(output)) == [2, 6] and logged_steps(log)[-1]["step"] == 6
        assert backbone_equals(output / "model.pt", checkpoints(output)[6])
        assert summary_names(launched, checkpoints(output)[6]), launched.stdout[-2000:]
    else:  # every rank stops with the same line; torchrun reports the ranks' exit code 2 as its own failure
        assert launched.proc.returncode != 0 and "Traceback" not in log, launched.output[-3000:]
        lines = error_lines(launched)
        assert len(lines) == ranks, launched.output[-3000:]
        assert all(str(failed) in line and "No space left on device" in line and "stopping" in line
                   and "no checkpoint of this run" in line for line in lines), lines
        assert not checkpoints(output) and max(s["step"] for s in logged_steps(log)) == 2  # no training on


# ---------------------------------------------------------------- the final save fails

@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["warn", "stop"])
def test_a_final_save_that_fails_ends_non_zero_saying_what_is_on_disk(tmp_path, identity_cache, mode):
    # Root ignores permissions, so directories at the files' names make the writes fail for anyone: one at
    # model.pt's temporary name (every model.pt write of this process fails) and one at the final checkpoint's.
    config = write_config(tmp_path, "final", identity_cache, max_steps=8, save_every_steps=2, keep_checkpoints=0,
                          on_save_error=mode)
    output = tmp_path / "out_final"
    with launch(train_args(config), tmp_path) as launched:
        wait_for_saved(launched, output, 2)
        launched.signal_group(signal.SIGSTOP)  # hold the run while the obstacles are put in place
        saved = [int(m) for m in re.findall(r"saved checkpoint \S+step(\d+)\.pt", training_log(output))]
        (output / f"model.pt.tmp.{launched.pid}").mkdir()
        (output / "checkpoint_step000000008.pt").mkdir()
        launched.signal_group(signal.SIGCONT)
        rc = launched.wait()
    model_step = max(saved)
    assert rc == 2, launched.output[-3000:]
    assert "outputs in" not in launched.stdout  # no summary naming a model.pt that is not this run's result
    assert backbone_equals(output / "model.pt", checkpoints(output)[model_step])  # what the line says it is
    log = training_log(output)
    model_failures = [line for line in log.splitlines() if f"cannot write {output / 'model.pt'}:" in line]
    if mode == "warn":
        newest = max(step for step in checkpoints(output) if (checkpoints(output)[step]).is_file())
        assert newest == 6 and logged_steps(log)[-1]["step"] == 8, log[-3000:]  # trained on to the end
        assert len(model_failures) == (6 - model_step) // 2, log[-3000:]  # one line per failed save
        line = assert_one_line_error(launched, "final save at step 8", "checkpoint_step000000008.pt",
                                     "checkpoint_step000000006.pt (step 6)", f"model.pt from step {model_step}",
                                     "resume=True")
        assert "2 steps of training not saved" in line, line
        # Once the folder is fixed, resume continues from what the line named and ends with a true summary.
        (output / f"model.pt.tmp.{launched.pid}").rmdir()
        (output / "checkpoint_step000000008.pt").rmdir()
        resumed = run_to_end(train_args(config, "resume=True"), tmp_path)
        assert resumed.proc.returncode == 0, resumed.output[-3000:]
        assert "resumed from" in training_log(output) and "step 6 of 8" in training_log(output)
        assert backbone_equals(output / "model.pt", checkpoints(output)[8])
        assert summary_names(resumed, checkpoints(output)[8]), resumed.stdout[-2000:]
    else:  # the first model.pt write after the obstacle stops the run, naming both files' steps
        step = model_step + 2
        assert_one_line_error(launched, "model.pt", f"checkpoint_step{step:09d}.pt (step {step})",
                              f"model.pt from step {model_step}", "stopping")
        assert max(written(output)) == step and max(s["step"] for s in logged_steps(log)) == step


# ---------------------------------------------------------------- a real full disk

@pytest.fixture
def small_disk(tmp_path):
    """A 20 MiB tmpfs (needs root and permission to mount; skipped with the reason otherwise)."""
    mount_point = tmp_path / f"disk_{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); "
                    f"the patched-writer test covers torch's error")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


@pytest.mark.timeout(300)
def test_a_full_tmpfs_warns_before_the_write_trains_on_and_ends_non_zero_then_resumes(tmp_path, identity_cache,
                                                                                     small_disk):
    config = write_config(tmp_path, "disk", identity_cache, max_steps=8, save_every_steps=2, keep_checkpoints=1,
                          on_save_error="warn", output=str(small_disk / "run"))
    output = small_disk / "run"
    with launch(train_args(config), tmp_path) as launched:
        wait_for_saved(launched, output, 2)
        launched.signal_group(signal.SIGSTOP)
        # Leave half a checkpoint of room: the next checkpoint cannot be written.
        stats = os.statvfs(output)
        room = stats.f_bavail * stats.f_frsize - checkpoints(output)[2].stat().st_size // 2
        with open(small_disk / "filler", "wb") as filler:
            os.posix_fallocate(filler.fileno(), 0, room)
        launched.signal_group(signal.SIGCONT)
        rc = launched.wait()
    log = training_log(output)
    assert rc == 2, launched.output[-3000:]
    assert "Traceback" not in launched.output and "enforce fail" not in launched.output
    lines = log.splitlines()
    room_warnings = [i for i, line in enumerate(lines) if "WARNING" in line and "MiB free" in line]
    failures = [i for i, line in enumerate(lines) if "WARNING" in line and "No space left on device" in line]
    assert len(failures) == 2 and len(room_warnings) >= 3, log[-3000:]  # steps 4, 6 warned; 8 is the error
    assert room_warnings[0] < failures[0]  # said before the write
    assert logged_steps(log)[-1]["step"] == 8  # "warn" trained on
    assert_one_line_error(launched, "final save at step 8", "No space left on device",
                          "checkpoint_step000000002.pt (step 2) and model.pt from the same step")
    assert sorted(checkpoints(output)) == [2] and not leftovers(output)
    assert load(checkpoints(output)[2])["step"] == 2 and backbone_equals(output / "model.pt", checkpoints(output)[2])

    (small_disk / "filler").unlink()
    resumed = run_to_end(train_args(config, "resume=True"), tmp_path)
    assert resumed.proc.returncode == 0, resumed.output[-3000:]
    assert sorted(checkpoints(output)) == [8] and backbone_equals(output / "model.pt", checkpoints(output)[8])
    shutil.rmtree(output)
