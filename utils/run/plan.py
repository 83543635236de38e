"""How long a run is and where it stands, in samples: the same run on any world size.

Progress is (epoch, samples into the epoch). The optimizer-step count and the learning rate are
derived from it for the *current* global batch, so a run stopped on 1 process and resumed on 2
trains the same remaining epochs on the same LR curve (the step counter is only a unit).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from utils.config.rules import ConfigError
from utils.run.schedule import MultiStepWarmupLR, PolyWarmupLR

logger = logging.getLogger(__name__)

MIN_STEPS_PER_EPOCH = 10     # fewer optimizer steps per epoch: warn (epoch-based schedules get coarse)
MAX_DROPPED_FRACTION = 0.05  # more of the data left out of every epoch by drop_last: warn
MIN_MICRO_BATCH = 2          # a micro-batch of one sample cannot train BatchNorm layers (no batch statistics)


@dataclass(frozen=True)
class EpochShape:
    """The optimizer steps left in an epoch on one rank: ``full_steps`` of ``accumulation`` micro-batches of
    ``batch_size`` samples, then a short last step of ``short_step`` micro-batch sizes (empty: none)."""

    full_steps: int
    batch_size: int
    accumulation: int
    short_step: tuple[int, ...] = ()

    @property
    def steps(self) -> int:
        """Optimizer steps, the short one included."""
        return self.full_steps + bool(self.short_step)

    @property
    def samples_per_rank(self) -> int:
        """Samples this rank trains in these steps."""
        return self.full_steps * self.batch_size * self.accumulation + sum(self.short_step)

    def micro_batches(self, index: int) -> int:
        """How many micro-batches step ``index`` (0-based, in this shape) takes from the loader."""
        return len(self.short_step) if index == self.full_steps and self.short_step else self.accumulation

    def step_samples(self, index: int) -> int:
        """Samples of step ``index`` on one rank."""
        return sum(self.short_step) if index == self.full_steps and self.short_step else \
            self.batch_size * self.accumulation


def epoch_shape(samples_left: int, world_size: int, batch_size: int, accumulation: int) -> EpochShape:
    """How ``samples_left`` global samples of an epoch are trained: whole global batches, then what is left
    (an epoch resumed from a checkpoint of another global batch ends off the grid) as one short step, so the
    epoch ends where an uninterrupted one does and the LR schedule reaches its end. Dropped: fewer samples
    than ranks (every rank trains as many), and a last micro-batch of one sample (BatchNorm needs two)."""
    per_rank = max(0, samples_left) // world_size
    full_steps, rest = divmod(per_rank, batch_size * accumulation)
    if rest % batch_size < MIN_MICRO_BATCH:
        rest -= rest % batch_size
    short = [batch_size] * (rest // batch_size) + ([rest % batch_size] if rest % batch_size else [])
    return EpochShape(full_steps, batch_size, accumulation, tuple(short))


@dataclass(frozen=True)
class RunPlan:
    """Sizes of one run: ``steps_per_epoch`` optimizer steps of ``global_batch`` samples, ``total_steps`` in all."""

    num_images: int
    batch_size: int
    world_size: int
    accumulation: int
    num_epoch: int
    max_steps: int | None = None
    end_step: int | None = None  # set by resumed_at(): where a resumed run's step count ends

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all ranks and micro-steps."""
        return self.batch_size * self.world_size * self.accumulation

    @property
    def steps_per_epoch(self) -> int:
        """Whole optimizer steps in one pass (each rank drops its last partial batch, as the loader does)."""
        return self.num_images // (self.batch_size * self.world_size) // self.accumulation

    @property
    def total_steps(self) -> int:
        """Planned optimizer steps; ``max_steps`` truncates the run and the LR schedule is fitted to it."""
        total = self.steps_per_epoch * self.num_epoch
        return min(total, int(self.max_steps)) if self.max_steps else total

    @property
    def last_step(self) -> int:
        """The step at which this run ends (``total_steps`` unless resumed mid-epoch on another global batch)."""
        return self.end_step if self.end_step is not None else self.total_steps

    def resumed_at(self, step: int, epoch: int, samples_in_epoch: int) -> "RunPlan":
        """This plan for a run continuing at ``step`` (epoch, samples into it): the steps the loader will
        really give end it (:func:`epoch_shape`: an epoch resumed off this plan's batch grid ends with a short
        step), so the log's ``step N/N`` is reached; the LR schedule stays on ``total_steps``."""
        if epoch >= self.num_epoch:
            end = step
        else:
            left_in_epoch = epoch_shape(self.steps_per_epoch * self.global_batch - samples_in_epoch, self.world_size,
                                        self.batch_size, self.accumulation).steps
            end = step + left_in_epoch + (self.num_epoch - epoch - 1) * self.steps_per_epoch
        if self.max_steps:
            end = min(end, int(self.max_steps))
        return replace(self, end_step=end)

    def samples_seen(self, epoch: int, sampler: Any) -> int:
        """Samples trained since the run began (all ranks): the TensorBoard/wandb x-axis, which never goes back
        when a resume on another world size changes what a step is."""
        return epoch * self.num_images + (sampler.consumed if sampler.epoch == epoch else 0)

    def position(self, epoch: int, samples_in_epoch: int) -> float:
        """Progress as a (possibly fractional) step in this plan's units."""
        return epoch * self.steps_per_epoch + min(samples_in_epoch / self.global_batch, self.steps_per_epoch)

    def check(self) -> None:
        """One-line error when not even one optimizer step fits an epoch."""
        if self.steps_per_epoch < 1:
            raise ConfigError(f"num_image={self.num_images} is smaller than one global batch ({self.global_batch} = "
                              f"batch_size {self.batch_size} x {self.world_size} ranks x gradient_acc "
                              f"{self.accumulation})")


def _fitting_batch_size(plan: RunPlan) -> int | None:
    """The largest ``batch_size`` up to the configured one that gives an epoch at least
    MIN_STEPS_PER_EPOCH steps and drops at most MAX_DROPPED_FRACTION of the data; None if none does."""
    for batch_size in range(plan.batch_size, 0, -1):
        candidate = replace(plan, batch_size=batch_size)
        dropped = plan.num_images - candidate.steps_per_epoch * candidate.global_batch
        if candidate.steps_per_epoch >= MIN_STEPS_PER_EPOCH and dropped <= MAX_DROPPED_FRACTION * plan.num_images:
            return batch_size
    return None


def small_data_warnings(plan: RunPlan) -> list[str]:
    """What a plan does silently to small data: an epoch of fewer than MIN_STEPS_PER_EPOCH optimizer steps,
    or drop_last (whole global batches only) leaving more than MAX_DROPPED_FRACTION of the images out of
    every epoch. One line each, naming the keys to change (and a ``batch_size`` that fits)."""
    steps, batch = plan.steps_per_epoch, plan.global_batch
    fitting = _fitting_batch_size(plan)
    fix = f"batch_size (e.g. batch_size={fitting})" if fitting and fitting != plan.batch_size else "batch_size"
    warnings = []
    if steps < MIN_STEPS_PER_EPOCH:
        warnings.append(f"an epoch of {plan.num_images} images is {steps} optimizer step(s) (global batch {batch} = "
                        f"batch_size {plan.batch_size} x {plan.world_size} rank(s) x gradient_acc {plan.accumulation}), "
                        f"fewer than {MIN_STEPS_PER_EPOCH}: the LR schedule, warmup and logging move in steps; "
                        f"lower {fix} or gradient_acc, or add data")
    dropped = plan.num_images - steps * batch
    if dropped > MAX_DROPPED_FRACTION * plan.num_images:
        warnings.append(f"drop_last leaves {dropped} of {plan.num_images} images ({dropped / plan.num_images:.0%}) out "
                        f"of every epoch (whole global batches of {batch} only); set {fix} or gradient_acc so that "
                        f"global batches cover the data")
    return warnings


def make_plan(cfg: Any, num_images: int, world_size: int, warn: bool = False) -> RunPlan:
    """The plan for this config on this data and world size; ``warn`` (rank 0) logs
    :func:`small_data_warnings`."""
    accumulation = int(cfg.gradient_acc)
    if accumulation < 1:
        raise ConfigError(f"config key 'gradient_acc': expected an integer >= 1, got {cfg.gradient_acc!r}")
    plan = RunPlan(int(num_images), int(cfg.batch_size), int(world_size), accumulation, int(cfg.num_epoch),
                   int(cfg.max_steps) if cfg.max_steps else None)
    plan.check()
    for line in small_data_warnings(plan) if warn else ():
        logger.warning(line)
    return plan


def base_lr(cfg: Any, plan: RunPlan) -> float:
    """``lr``, or ``lr_per_512`` scaled linearly to the global batch."""
    return cfg.lr_per_512 * plan.global_batch / 512 if cfg.lr_per_512 else cfg.lr


def make_schedule(cfg: Any, plan: RunPlan) -> PolyWarmupLR | MultiStepWarmupLR:
    """The LR schedule ``cfg.lr_schedule`` names, in this plan's step units (epochs converted to steps).

    ``max_steps`` compresses the whole schedule: an epoch of the schedule is ``total_steps / num_epoch``
    steps, so warmup, milestones and the poly decay land at the same fraction of a short run as of
    the full one (a short run ends at its schedule's end: LR 0 for poly)."""
    lr = base_lr(cfg, plan)
    schedule_epoch = plan.total_steps / plan.num_epoch  # steps_per_epoch, unless max_steps shortens the run
    warmup_steps = int(schedule_epoch * cfg.warmup_epoch)
    if warmup_steps >= plan.total_steps:  # warmup_epoch >= num_epoch
        logger.warning("warmup of %d steps is longer than the run (%d steps); using %d", warmup_steps,
                       plan.total_steps, plan.total_steps - 1)
        warmup_steps = plan.total_steps - 1
    kind = cfg.get("lr_schedule", "poly")
    if kind == "poly":
        return PolyWarmupLR(lr, plan.total_steps, warmup_steps, cfg.lr_power)
    if kind == "step":
        milestones = [float(epoch) * schedule_epoch for epoch in cfg.lr_steps]
        return MultiStepWarmupLR(lr, milestones, float(cfg.lr_gamma), warmup_steps)
    raise ConfigError(f"config key 'lr_schedule': expected 'poly' or 'step', got {kind!r}")


def resume_position(progress: dict, plan: RunPlan) -> tuple[int, int, int]:
    """(step, epoch, samples_in_epoch) for a checkpoint's progress under the current plan (the caller
    says so when the checkpoint was written with another global batch)."""
    epoch, samples = int(progress["epoch"]), int(progress["samples_in_epoch"])
    return int(plan.position(epoch, samples)), epoch, samples
