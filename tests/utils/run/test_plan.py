"""utils/run/plan.py: max_steps compresses every schedule (poly and step), warmup included."""
from __future__ import annotations

import math

import pytest
from easydict import EasyDict

from utils.run.plan import RunPlan, make_schedule

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
