"""utils/run/plan.py: max_steps compresses every schedule (poly and step), warmup included; the warnings
about what a plan silently does to small data."""
from __future__ import annotations

import logging
import math

import pytest
from easydict import EasyDict

from utils.run.plan import (MAX_DROPPED_FRACTION, MIN_STEPS_PER_EPOCH, RunPlan, make_plan, make_schedule,
                            small_data_warnings)

BASE = dict(lr=0.1, lr_per_512=0, lr_power=2.0, lr_gamma=0.1, lr_steps=(), warmup_epoch=0, lr_schedule="poly")


def lrs(plan: RunPlan, **keys) -> list[float]:
    schedule = make_schedule(EasyDict(BASE, **keys), plan)
    return [schedule.lr(step) for step in range(plan.total_steps + 1)]


def test_max_steps_compresses_the_step_schedule():
    full = RunPlan(96, 8, 1, 1, 4)  # 12 steps/epoch, 48 steps
    short = RunPlan(96, 8, 1, 1, 4, max_steps=8)  # a schedule epoch is 2 steps
    values = lrs(short, lr_schedule="step", lr_steps=(2, 3))
    assert values[:8] == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)
    full_values = lrs(full, lr_schedule="step", lr_steps=(2, 3))
    assert full_values[23] == pytest.approx(0.1) and full_values[24] == pytest.approx(0.01)
    assert full_values[36] == pytest.approx(0.001)


def test_max_steps_compresses_the_warmup_and_the_run_ends_at_zero():
    short = RunPlan(96, 8, 1, 1, 4, max_steps=8)
    values = lrs(short, warmup_epoch=1)  # 2 of the 8 steps warm up, as 12 of the 48 do in the full run
    assert values[0] == pytest.approx(0.05) and values[1] == pytest.approx(0.1)
    assert values[7] == pytest.approx(0.1 * (1 / 6) ** 2) and values[8] == 0.0
    full = lrs(RunPlan(96, 8, 1, 1, 4), warmup_epoch=1)
    assert full[11] == pytest.approx(0.1) and full[10] < 0.1 and full[48] == 0.0
    # the same fraction of the run gives the same LR, short or full
    assert all(math.isclose(values[i], full[i * 6], rel_tol=1e-9) for i in range(2, 9))


def test_without_max_steps_the_schedule_is_unchanged_on_a_partial_epoch_count():
    plan = RunPlan(100, 10, 1, 1, 3)  # 10 steps/epoch
    assert lrs(plan, lr_schedule="step", lr_steps=(1, 2))[9:12] == pytest.approx([0.1, 0.01, 0.01])


def test_192_images_at_the_default_batch_warn_twice_naming_a_batch_size_that_fits():
    # A config with only `rec`: r50 at batch_size 128 on 192 images trains 128 a step, 1 step an epoch.
    plan = RunPlan(num_images=192, batch_size=128, world_size=1, accumulation=1, num_epoch=20)
    assert small_data_warnings(plan) == [
        "an epoch of 192 images is 1 optimizer step(s) (global batch 128 = batch_size 128 x 1 rank(s) x gradient_acc "
        "1), fewer than 10: the LR schedule, warmup and logging move in steps; lower batch_size (e.g. batch_size=19) "
        "or gradient_acc, or add data",
        "drop_last leaves 64 of 192 images (33%) out of every epoch (whole global batches of 128 only); set "
        "batch_size (e.g. batch_size=19) or gradient_acc so that global batches cover the data",
    ]
    fitted = RunPlan(192, 19, 1, 1, 20)  # the suggestion: 10 steps of 19, 2 images dropped
    assert fitted.steps_per_epoch == MIN_STEPS_PER_EPOCH and 192 - 10 * 19 <= MAX_DROPPED_FRACTION * 192
    assert small_data_warnings(fitted) == []
    assert small_data_warnings(RunPlan(192, 20, 1, 1, 20))  # one more and it no longer fits: 9 steps


@pytest.mark.parametrize("plan, count, first_words", [
    (RunPlan(1000, 64, 2, 1, 1), 2, "an epoch of 1000 images is 7 optimizer step(s) (global batch 128 = batch_size 64 "
                                    "x 2 rank(s)"),  # 7 steps; 104 of 1000 dropped (10%)
    (RunPlan(2000, 16, 2, 2, 1), 0, None),  # 31 steps of 64; 16 of 2000 dropped (0.8%)
    (RunPlan(4800, 64, 1, 1, 6), 0, None),  # the CPU demo: 75 steps, nothing dropped
    (RunPlan(1060, 100, 1, 1, 1), 1, "drop_last leaves 60 of 1060 images (6%) out of every epoch (whole global "
                                     "batches of 100 only); set batch_size (e.g. batch_size=96)"),  # 10 steps
])
def test_each_condition_is_warned_on_its_own(plan, count, first_words):
    warnings = small_data_warnings(plan)
    assert len(warnings) == count, warnings
    if first_words:
        assert warnings[0].startswith(first_words), warnings


def test_tiny_data_without_a_fitting_batch_size_names_the_keys_only():
    assert small_data_warnings(RunPlan(5, 4, 1, 1, 1)) == [
        "an epoch of 5 images is 1 optimizer step(s) (global batch 4 = batch_size 4 x 1 rank(s) x gradient_acc 1), "
        "fewer than 10: the LR schedule, warmup and logging move in steps; lower batch_size or gradient_acc, or add "
        "data",
        "drop_last leaves 1 of 5 images (20%) out of every epoch (whole global batches of 4 only); set batch_size or "
        "gradient_acc so that global batches cover the data",
    ]


def test_make_plan_logs_them_only_when_asked(caplog):
    cfg = EasyDict(gradient_acc=1, batch_size=128, num_epoch=20, max_steps=None)
    caplog.set_level(logging.WARNING)
    make_plan(cfg, 192, 1)  # the other ranks: silent
    assert caplog.records == []
    plan = make_plan(cfg, 192, 1, warn=True)  # rank 0
    assert [record.getMessage() for record in caplog.records] == small_data_warnings(plan)
    assert all(record.levelno == logging.WARNING for record in caplog.records)
