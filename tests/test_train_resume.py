"""train.py resume as it really happens: on another world size (progress kept in samples, the same LR curve),
into a folder that already holds a run (refused unless resume/overwrite), with bad inputs (one line each)
and with checkpoint writes that fail. Real subprocess runs of the tiny config of tests/test_train_stops.py."""
from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.test_train_stops import (NUM_EPOCH, NUM_IMAGES, PLANNED_1_RANK, assert_one_line_error,  # noqa: F401
                                    checkpoints, identity_cache, launch, load, logged_steps, reference, run_to_end,
                                    stop_point, torchrun_args, train_args, training_log, wait_for_step, write_config)

TOTAL_SAMPLES = NUM_IMAGES * NUM_EPOCH  # 384
WARMUP_SAMPLES = 96  # warmup_epoch=1 of the tiny config: 12 steps of 8, 6 of 16


# ---------------------------------------------------------------- resume on another world size

def check_continuation(log_part: str, resumed_from: dict, new_batch: int, reference_steps: list[dict]) -> None:
    """The resumed run keeps the LR curve, plans the remaining samples and ends after num_epoch epochs."""
    progress = resumed_from["progress"]
    done = progress["epoch"] * NUM_IMAGES + progress["samples_in_epoch"]
    assert done == resumed_from["step"] * progress["global_batch"]
    steps = logged_steps(log_part)
    first, last = steps[0], steps[-1]
    # LR at the same sample progress as the uninterrupted 1-rank run (batch 8). After warmup a step's LR is the
    # curve at the step's first sample: the reference's step done/8 + 1. During warmup it is the curve at the
    # step's last sample (arcface_torch's (step + 1) / warmup, so the first step does not run at LR 0): the
    # reference step that ends where this bigger or smaller step ends.
    in_warmup = done < WARMUP_SAMPLES
    expected_lr = reference_steps[(done + new_batch) // 8 - 1 if in_warmup else done // 8]["lr"]
    assert math.isclose(first["lr"], expected_lr, rel_tol=1e-6), (first, expected_lr, done)
    assert first["step"] - 1 == done // new_batch  # continues right after the samples already trained
    # The plan: steps already done (converted to the new batch) + the remaining samples in new batches.
    planned_after = first["total"] - (first["step"] - 1)
    assert abs(planned_after * new_batch - (TOTAL_SAMPLES - done)) < new_batch, (first, done)
    assert last["step"] == last["total"] == first["total"], last
    # the "resumed from" line names the same end as the step lines
    assert re.search(rf"resumed from .* at step {first['step'] - 1} of {last['total']} ", log_part), log_part[:3000]
    trained = done + (last["step"] - first["step"] + 1) * new_batch
    assert abs(trained - TOTAL_SAMPLES) < new_batch, trained
    # The conversion is logged: "batch" then the old then the new size (the run header starts with the new one).
    conversion = re.compile(rf"batch\D*\b{progress['global_batch']}\b\D*\b{new_batch}\b")
    assert any(conversion.search(line) for line in log_part.splitlines()), log_part[:3000]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("resume_step", [10, 25], ids=["in-warmup-step-10", "late-step-25"])
def test_a_one_rank_run_continues_on_two_ranks(tmp_path, identity_cache, reference, resume_step):  # noqa: F811
    # The uninterrupted 1-rank run's checkpoint at a known step, resumed on 2 ranks (global batch 8 -> 16).
    # Step 10: 80 samples, inside the 96-sample warmup. Step 25: 200 samples (8 into epoch 2), half a 16-batch
    # into step 12 of the new plan, and numbered above every step of it (24): with keep_checkpoints=1 pruning
    # must keep this run's final checkpoint and drop the old one, which a later resume would otherwise take.
    config = write_config(tmp_path, "grow", identity_cache, keep_checkpoints=1, tensorboard=True)
    output = tmp_path / "out_grow"
    output.mkdir()
    source = checkpoints(reference["output"])[resume_step]
    shutil.copy2(source, output)
    state = load(source)
    assert state["step"] == resume_step and state["progress"]["global_batch"] == 8 and state["world_size"] == 1

    resumed = run_to_end(torchrun_args(config, "resume=True"), tmp_path)
    assert resumed.proc.returncode == 0, resumed.output[-3000:]
    check_continuation(training_log(output), state, 16, reference["steps"])
    found = checkpoints(output)
    final = load(found[max(found)])
    assert final["epoch"] == NUM_EPOCH and final["progress"]["epoch"] == NUM_EPOCH
    assert final["progress"]["global_batch"] == 16 and final["world_size"] == 2
    assert sorted(found) == [final["step"]], sorted(found)  # what resume would take next is this run's end
    # One total everywhere, said once (rank 0), and a TensorBoard x-axis (samples seen) that never goes back.
    assert resumed.output.count("global batch changed") == 1, resumed.output[-3000:]
    log = training_log(output)
    becomes = re.search(r"becomes step (\d+) of (\d+)", log)
    at = re.search(r"resumed from \S+ at step (\d+) of (\d+)", log)
    assert becomes and at and becomes.groups() == at.groups(), (becomes, at)
    assert logged_steps(log)[-1]["total"] == int(at[2])
    lr_points = tensorboard_scalars(output / "tensorboard", "train/lr")
    done = state["progress"]["epoch"] * NUM_IMAGES + state["progress"]["samples_in_epoch"]
    assert lr_points[0] > done and lr_points == sorted(set(lr_points)) and lr_points[-1] == TOTAL_SAMPLES, lr_points
    # Every sample of the plan is trained (frequent=1: a point per step): the resumed epoch, off the new batch grid
    # (step 25 leaves 88 samples), ends with a short step of 8, so every epoch ends on its last sample.
    sizes = [after - before for before, after in zip([done] + lr_points, lr_points)]
    assert set(sizes) <= {16, (NUM_IMAGES - done % NUM_IMAGES) % 16 or 16}, sizes
    assert all(end * NUM_IMAGES in lr_points for end in range(done // NUM_IMAGES + 1, NUM_EPOCH + 1)), lr_points


def tensorboard_scalars(folder: Path, tag: str) -> list[int]:
    """The x-axis values of one scalar tag in every event file under ``folder``, in writing order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = []
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            points += [event.step for event in accumulator.Scalars(tag)]
    return points


@pytest.mark.timeout(300)
def test_a_two_rank_run_continues_on_one_rank(tmp_path, identity_cache, reference):  # noqa: F811
    config = write_config(tmp_path, "shrink", identity_cache)
    output = tmp_path / "out_shrink"
    with launch(torchrun_args(config), tmp_path) as launched:
        wait_for_step(launched, output, 8)  # past the warmup (6 steps of 16): on the decay
        os.kill(launched.pid, signal.SIGTERM)
        launched.wait()
    reached, state = stop_point(launched, output)
    assert state["progress"]["global_batch"] == 16 and state["world_size"] == 2

    log_before = len(training_log(output))
    resumed = run_to_end(train_args(config, "resume=True"), tmp_path)
    assert resumed.proc.returncode == 0, resumed.output[-3000:]
    check_continuation(training_log(output)[log_before:], state, 8, reference["steps"])
    final = load(checkpoints(output)[max(checkpoints(output))])
    assert final["epoch"] == NUM_EPOCH and final["step"] == PLANNED_1_RANK  # a 2-rank step counts as two here


# ---------------------------------------------------------------- existing output folders

def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """{file name: (sha256, mtime_ns)} of everything in ``folder``."""
    return {name: (hashlib.sha256((folder / name).read_bytes()).hexdigest(), (folder / name).stat().st_mtime_ns)
            for name in sorted(os.listdir(folder))}


@pytest.mark.timeout(300)
def test_a_fresh_run_into_a_used_folder_is_refused_unless_overwrite(tmp_path, identity_cache, reference):  # noqa: F811
    used = tmp_path / "used"
    used.mkdir()
    for name in ("checkpoint_step000000024.pt", "checkpoint_step000000048.pt", "model.pt", "training.log"):
        shutil.copy2(reference["output"] / name, used)
    only_model = tmp_path / "only_model"
    only_model.mkdir()
    shutil.copy2(reference["output"] / "model.pt", only_model)
    config = write_config(tmp_path, "again", identity_cache, max_steps=2, save_every_steps=2, keep_checkpoints=1)
    for folder in (used, only_model):
        before = snapshot(folder)
        refused = run_to_end(train_args(config, f"output={str(folder)!r}"), tmp_path)
        assert_one_line_error(refused, str(folder), "resume=True", "output")
        assert snapshot(folder) == before, folder

    overwritten = run_to_end(train_args(config, f"output={str(used)!r}", "overwrite=True"), tmp_path)
    assert overwritten.proc.returncode == 0, overwritten.output[-3000:]
    found = checkpoints(used)
    assert 2 in found and load(found[2])["step"] == 2, sorted(found)  # pruning kept this run's newest
    # A higher-numbered checkpoint of the overwritten run left behind would be taken by the next resume.
    assert sorted(found) == [2], sorted(found)


# ---------------------------------------------------------------- bad inputs: one line each

@pytest.mark.timeout(300)
def test_resume_true_without_a_checkpoint_is_an_error_and_auto_starts_fresh(tmp_path, identity_cache):  # noqa: F811
    config = write_config(tmp_path, "empty", identity_cache, max_steps=2)
    output = tmp_path / "out_empty"
    output.mkdir()
    strict = run_to_end(train_args(config, "resume=True"), tmp_path)
    assert_one_line_error(strict, str(output))
    assert not checkpoints(output)
    auto = run_to_end(train_args(config, "resume='auto'"), tmp_path)
    assert auto.proc.returncode == 0, auto.output[-3000:]
    assert "resumed from" not in training_log(output)
    assert [s["step"] for s in logged_steps(training_log(output))] == [1, 2]


@pytest.mark.timeout(300)
def test_init_backbone_of_another_network_names_both(tmp_path, identity_cache, reference):  # noqa: F811
    model = str(reference["model"])  # network tiny, embedding 64
    config = write_config(tmp_path, "init", identity_cache, max_steps=1, init_backbone=model)
    wider = run_to_end(train_args(config, "embedding_size=128"), tmp_path)
    line = assert_one_line_error(wider, model)
    assert re.search(r"\b64\b", line) and re.search(r"\b128\b", line), line
    other = run_to_end(train_args(config, "network='mbf'"), tmp_path)
    assert_one_line_error(other, model, "mbf")


@pytest.mark.timeout(300)
def test_explicit_rec_on_a_generated_identity_config_is_an_error(tmp_path, identity_cache):  # noqa: F811
    # configs/demo_cpu.py generates its data; an explicit rec must never silently train on the generated set.
    # The other overrides only keep the run short (and reuse the cached set) should it wrongly start.
    args = train_args("configs/demo_cpu.py", "rec='/nonexistent/ms1m'", f"output={str(tmp_path / 'demo')!r}",
                      f"synthetic.cache_dir={str(identity_cache)!r}", "synthetic.num_identities=24",
                      "synthetic.images_per_identity=4", "synthetic.num_val_identities=8",
                      "synthetic.num_val_pairs=40", "max_steps=2", "val_targets=[]", "verify_at_start=False",
                      "num_workers=0", "batch_size=8", "embedding_size=64")
    assert_one_line_error(run_to_end(args, tmp_path), "/nonexistent/ms1m")


@pytest.mark.timeout(300)
def test_a_missing_val_target_warns_and_training_goes_on(tmp_path, identity_cache):  # noqa: F811
    config = write_config(tmp_path, "val", identity_cache, max_steps=2, val_targets=["no_such_target"])
    launched = run_to_end(train_args(config), tmp_path)
    assert launched.proc.returncode == 0, launched.output[-3000:]
    assert "Traceback" not in launched.output
    log = training_log(tmp_path / "out_val")
    assert any("WARNING" in line and "no_such_target.bin" in line for line in log.splitlines()), log[-3000:]
    assert logged_steps(log)[-1]["step"] == 2
    assert load(checkpoints(tmp_path / "out_val")[2])["step"] == 2


# ---------------------------------------------------------------- checkpoint writes that fail

@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["stop", "warn"])
def test_a_failed_checkpoint_write_stops_or_warns(tmp_path, identity_cache, mode):  # noqa: F811
    # Root ignores permissions, so the write is made to fail another way that also holds for root: a
    # directory already sits at the next checkpoint's name, so the final rename of the temp file fails.
    config = write_config(tmp_path, "fail", identity_cache, save_every_steps=2, keep_checkpoints=0,
                          on_save_error=mode)
    output = tmp_path / "out_fail"
    with launch(train_args(config), tmp_path) as launched:
        deadline = time.monotonic() + 90
        while not (output / "checkpoint_step000000002.pt").exists():
            assert launched.proc.poll() is None and time.monotonic() < deadline, launched.output[-3000:]
            time.sleep(0.005)
        launched.signal_group(signal.SIGSTOP)  # hold the run while the obstacle is put in place
        blocked_step = max(checkpoints(output)) + 2
        blocked = output / f"checkpoint_step{blocked_step:09d}.pt"
        blocked.mkdir()
        launched.signal_group(signal.SIGCONT)
        rc = launched.wait()
    log = training_log(output)
    previous = checkpoints(output)[blocked_step - 2]
    assert load(previous)["step"] == blocked_step - 2  # the last good checkpoint is intact
    if mode == "stop":
        assert_one_line_error(launched, str(blocked))
        assert rc == 2 and max(s["step"] for s in logged_steps(log)) == blocked_step  # no silent training on
    else:
        assert rc == 0, launched.output[-3000:]
        assert "Traceback" not in launched.output
        warned = [line for line in log.splitlines() if "WARNING" in line and str(blocked) in line]
        assert len(warned) == 1, log[-3000:]
        assert logged_steps(log)[-1]["step"] == PLANNED_1_RANK
        assert load(checkpoints(output)[PLANNED_1_RANK])["step"] == PLANNED_1_RANK
