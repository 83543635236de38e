"""Polynomial decay with linear warmup, stepped once per optimizer step (arcface_torch's PolyScheduler)."""
from __future__ import annotations


class SchedulerError(ValueError):
    """A schedule that cannot be built from the config; one line for the user."""


class PolyWarmupLR:
    """lr(step) = base * step / warmup during warmup, then base * (1 - progress) ** power.

    The trainer applies ``lr(step)`` to the backbone optimizer and passes it to the head, which owns
    its own optimizer state; keeping the schedule a pure function of the step makes resume exact.
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

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.base_lr * max(0.0, 1.0 - progress) ** self.power

    def state_dict(self) -> dict:
        return {"base_lr": self.base_lr, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "power": self.power}
