"""train.py's schedule and checkpoint cadence in real runs: max_steps compresses the logged LR curve,
and a save interval that lands on an epoch end writes one checkpoint holding the later state."""
from __future__ import annotations

import re

import pytest

from tests.test_train_stops import (checkpoints, identity_cache, load, logged_steps, run_to_end,  # noqa: F401
                                    train_args, training_log, write_config)


@pytest.mark.timeout(300)
def test_max_steps_compresses_a_step_schedule_in_a_real_run(tmp_path, identity_cache):  # noqa: F811
    config = write_config(tmp_path, "short", identity_cache, lr_schedule="step", lr_steps=[2, 3], warmup_epoch=0,
                          max_steps=8)
    launched = run_to_end(train_args(config), tmp_path)
    assert launched.proc.returncode == 0, launched.output[-3000:]
    steps = logged_steps(training_log(tmp_path / "out_short"))
    assert [s["step"] for s in steps] == list(range(1, 9)) and {s["total"] for s in steps} == {8}
    assert [s["lr"] for s in steps] == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)


@pytest.mark.timeout(300)
def test_a_short_run_ends_its_warmup_and_decay_inside_its_steps(tmp_path, identity_cache):  # noqa: F811
    config = write_config(tmp_path, "warm", identity_cache, warmup_epoch=1, max_steps=8)
    launched = run_to_end(train_args(config), tmp_path)
    assert launched.proc.returncode == 0, launched.output[-3000:]
    log = training_log(tmp_path / "out_warm")
    assert "warmup of" not in log  # no clamping: the warmup is 2 of the 8 steps
    lr = [s["lr"] for s in logged_steps(log)]
    assert lr[0] == pytest.approx(0.05) and lr[1] == pytest.approx(0.1)
    assert lr[-1] == pytest.approx(0.1 / 36) and lr == sorted(lr[:2]) + sorted(lr[2:], reverse=True)


@pytest.mark.timeout(300)
def test_a_save_interval_on_an_epoch_end_writes_one_checkpoint(tmp_path, identity_cache):  # noqa: F811
    config = write_config(tmp_path, "cadence", identity_cache, save_every_steps=6, keep_checkpoints=0)
    launched = run_to_end(train_args(config), tmp_path)
    assert launched.proc.returncode == 0, launched.output[-3000:]
    output = tmp_path / "out_cadence"
    saved = [int(m) for m in re.findall(r"saved checkpoint \S+ \(step (\d+), epoch", training_log(output))]
    assert saved == list(range(6, 49, 6))  # 12-step epochs: 12, 24, 36 and 48 are epoch ends, each written once
    found = checkpoints(output)
    assert sorted(found) == saved
    for step in (12, 24, 36, 48):  # the epoch-end state: the next epoch, 0 samples into it
        state = load(found[step])
        assert (state["epoch"], state["progress"]["samples_in_epoch"]) == (step // 12, 0)
    assert load(found[18])["progress"]["samples_in_epoch"] == 48
