"""utils/lr_scheduler.py: warmup then polynomial decay."""
import pytest

from utils.run.schedule import PolyWarmupLR


def test_warmup_then_poly_decay():
    sched = PolyWarmupLR(0.4, total_steps=110, warmup_steps=10, power=2.0)
    assert sched.lr(0) == pytest.approx(0.04)
    assert sched.lr(9) == pytest.approx(0.4)
    assert sched.lr(10) == pytest.approx(0.4)
    assert sched.lr(60) == pytest.approx(0.4 * 0.5 ** 2)
    assert sched.lr(110) == 0.0
    assert all(sched.lr(s) >= sched.lr(s + 1) for s in range(10, 120))


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError, match="total_steps must be positive"):
        PolyWarmupLR(0.1, total_steps=0)
    with pytest.raises(ValueError, match="warmup_steps=5 must be in"):
        PolyWarmupLR(0.1, total_steps=5, warmup_steps=5)
