"""utils/run/plan.py: max_steps compresses every schedule (poly and step), warmup included; the warnings
about what a plan silently does to small data."""
from __future__ import annotations

import logging
import math

import pytest
from easydict import EasyDict

from utils.run.plan import (MAX_DROPPED_FRACTION, MIN_STEPS_PER_EPOCH, RunPlan, epoch_shape, make_plan,
                            make_schedule, small_data_warnings)

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


# ---------------------------------------------------------------- an epoch resumed off the batch grid

def test_an_aligned_epoch_is_whole_steps_only():
    shape = epoch_shape(96, world_size=2, batch_size=8, accumulation=1)
    assert (shape.full_steps, shape.short_step, shape.steps) == (6, (), 6)
    assert [shape.micro_batches(i) for i in range(6)] == [1] * 6


def test_a_resumed_epoch_ends_with_a_short_step_that_completes_it():
    # 8 of 96 samples done at global batch 8 (1 rank), continued on 2 ranks of 8: 88 left = 5 x 16 + 8.
    shape = epoch_shape(96 - 8, world_size=2, batch_size=8, accumulation=1)
    assert (shape.full_steps, shape.short_step) == (5, (4,))
    assert shape.samples_per_rank * 2 == 88 and shape.step_samples(5) == 4 and shape.micro_batches(5) == 1


def test_a_short_step_under_accumulation_takes_fewer_micro_batches():
    # per rank 27 left with batch 4 x 3 micro-batches: 2 full steps (24), then micro-batches of 3 -> one of 3
    shape = epoch_shape(54, world_size=2, batch_size=4, accumulation=3)
    assert (shape.full_steps, shape.short_step) == (2, (3,))
    # per rank 31: 2 full steps, then 7 = a whole micro-batch of 4 and one of 3
    shape = epoch_shape(62, world_size=2, batch_size=4, accumulation=3)
    assert (shape.full_steps, shape.short_step, shape.micro_batches(2)) == (2, (4, 3), 2)


def test_samples_that_cannot_make_a_micro_batch_are_dropped():
    # one sample per rank cannot train BatchNorm; an odd sample cannot be split over two ranks
    assert epoch_shape(2 * 16 + 2, 2, 8, 1).short_step == ()
    assert epoch_shape(2 * 16 + 5, 2, 8, 1).short_step == (2,)
    # 25 per rank at 8 x 2 micro-batches: one full step, then 9 = a micro-batch of 8, the lone sample dropped
    assert epoch_shape(2 * 25, 2, 8, 2).short_step == (8,)
    assert epoch_shape(-4, 2, 8, 1).steps == 0


def test_a_resumed_plan_ends_at_the_uninterrupted_plan_total():
    # 1 rank at batch 8 stopped at step 25 of 48 (epoch 2, 8 samples in), resumed on 2 ranks: 24 steps in all
    plan = RunPlan(num_images=96, batch_size=8, world_size=2, accumulation=1, num_epoch=4)
    resumed = plan.resumed_at(int(plan.position(2, 8)), 2, 8)
    assert resumed.last_step == plan.total_steps == 24
