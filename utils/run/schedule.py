"""Learning-rate schedules as pure functions of training progress, measured in optimizer steps.

The trainer evaluates ``lr(step)`` once per optimizer step; ``step`` may be fractional after a
resume on another global batch (progress is kept in samples, see utils/run_plan.py), so every
schedule here is defined for real-valued steps. Being pure functions of progress makes resume
exact: nothing but the progress itself has to be checkpointed.
"""
from __future__ import annotations

import bisect
from typing import Sequence


class SchedulerError(ValueError):
    """A schedule that cannot be built from the config; one line for the user."""


class PolyWarmupLR:
    """lr(step) = base * (step + 1) / warmup during warmup, then base * (1 - progress) ** power.

    arcface_torch's PolyScheduler: linear warmup, then polynomial decay to 0 at ``total_steps``.
    """

    def __init__(self, base_lr: float, total_steps: int, warmup_steps: int = 0, power: float = 2.0) -> None:
        if total_steps <= 0:
            raise SchedulerError(f"total_steps must be positive, got {total_steps} (is the dataset smaller than one global batch?)")
        if not 0 <= warmup_steps < total_steps:
            raise SchedulerError(f"warmup_steps={warmup_steps} must be in [0, total_steps={total_steps})")
        self.base_lr = base_lr
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.power = power

    def lr(self, step: float) -> float:
        """Learning rate at (possibly fractional) optimizer step ``step``."""
        if step < self.warmup_steps:
            return self.base_lr * min(step + 1, self.warmup_steps) / self.warmup_steps
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.base_lr * max(0.0, 1.0 - progress) ** self.power


class MultiStepWarmupLR:
    """torch's MultiStepLR on optimizer steps: base * gamma ** (milestones passed), after a linear warmup.

    facenet-pytorch's fine-tuning recipe is MultiStepLR([5, 10]) stepped per epoch; the trainer
    converts epoch milestones to steps so the decay lands at the same point of the data.
    """

    def __init__(self, base_lr: float, milestone_steps: Sequence[float], gamma: float = 0.1,
                 warmup_steps: int = 0) -> None:
        milestones = [float(m) for m in milestone_steps]
        if any(b <= a for a, b in zip(milestones, milestones[1:])) or any(m <= 0 for m in milestones):
            raise SchedulerError(f"config key 'lr_steps': expected increasing positive epochs, got {list(milestone_steps)}")
        if not 0 < gamma <= 1:
            raise SchedulerError(f"config key 'lr_gamma': expected a factor in (0, 1], got {gamma}")
        if warmup_steps < 0:
            raise SchedulerError(f"warmup_steps={warmup_steps} must be >= 0")
        self.base_lr, self.milestones, self.gamma, self.warmup_steps = base_lr, milestones, gamma, warmup_steps

    def lr(self, step: float) -> float:
        """Learning rate at (possibly fractional) optimizer step ``step``."""
        factor = self.gamma ** bisect.bisect_right(self.milestones, step)
        if step < self.warmup_steps:
            factor *= min(step + 1, self.warmup_steps) / self.warmup_steps
        return self.base_lr * factor
