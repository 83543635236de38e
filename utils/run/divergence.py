"""When training blows up: the divergence detectors and the ``on_divergence`` policy (warn, stop, rollback).

Every step the loop hands the optimizer's outcome to :class:`DivergenceGuard`. The detectors judge only
numbers every rank shares (the loss averaged over ranks, the batch embeddings' similarity averaged over
ranks, the fp16 scale: all three ride in the optimizer's one all-reduce; the agreed non-finite decision),
so every rank fires the same signal at the same step with no collective of its own:

- ``nonfinite``: ``max_nonfinite_steps`` non-finite losses in a row (each one is skipped, as before);
- ``spike``: the step's loss above the median of the last ``SPIKE_HISTORY`` finite losses by more than
  ``divergence_spike_factor`` x their robust spread (1.4826 x median absolute deviation, at least 1% of the
  loss's level after warm-up);
- ``rise``: the smoothed loss (EMA, ``EMA_DECAY``) above its running minimum by more than
  ``divergence_rise_margin`` x its level after warm-up, for ``divergence_rise_window`` steps in a row (a
  margin relative to the minimum would fire on the noise of a low late-training loss);
- ``scale``: the fp16 grad scale below ``divergence_scale_floor`` for ``divergence_scale_window`` steps;
- ``collapse``: the batch's embeddings nearly identical (mean cosine similarity between different
  samples >= ``divergence_collapse_threshold``);
- ``relapse``: on probation (the first ``divergence_warmup_steps`` finite steps after a rollback), the smoothed
  loss, started at the restored state's loss level, above that level by more than ``divergence_relapse_margin``
  x it: the lowered LR is still too high for that state, and is cut again at once instead of training on.

Spike, rise and collapse are judged after ``divergence_warmup_steps`` finite steps of history. The rollback
keeps an in-memory copy (host memory) of the backbone, the head's rows, the optimizer and the scaler, taken at the first healthy step (no detector counting, the loss within 2 spreads of its
median) once ``snapshot_every_steps`` steps have passed since the last; it restores
that copy, multiplies the LR by ``divergence_lr_factor`` for the rest of the run and keeps the data position
where it is, so the batches between the snapshot and the divergence are skipped (not trained on again). The
LR schedule goes on from the snapshot's point, compressed into the steps that are left (a state rolled back to
step 0 warms up again instead of meeting the lowered LR at full strength on a half-decayed schedule).
"""
from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from utils.devices import device as devices
from utils.run.state import TrainingError
from utils.run.steps import count_nonfinite

logger = logging.getLogger("arcscale.train")

SPIKE_HISTORY = 50  # finite losses the spike detector's median is taken over
EMA_DECAY = 0.9     # the rise detector's smoothing: ema = 0.9 * ema + 0.1 * loss
STATE_VERSION = 2  # 2: the probation (relapse) and the schedule rewind


def embedding_similarity(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between different rows of ``embeddings`` (1: all identical; about 0 for a healthy
    model), a 0-d device tensor, not read on the host: ``|sum of unit rows|^2`` holds every pair once twice."""
    unit = torch.nn.functional.normalize(embeddings.detach().float(), dim=1)
    count = unit.shape[0]
    if count < 2:
        return unit.new_zeros(())
    total = unit.sum(dim=0)
    return (total.dot(total) - unit.pow(2).sum()) / (count * (count - 1))


@dataclass
class Signal:
    """One detector firing: which, at which step, the value seen and the words with the numbers."""

    name: str
    step: int
    value: float
    detail: str


class Detectors:
    """The detectors' running statistics: host arithmetic on values every rank shares (no device work)."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.recent: deque[float] = deque(maxlen=SPIKE_HISTORY)
        self.ema = math.nan
        self.lowest = math.inf
        self.rising = 0      # steps in a row with the smoothed loss above the margin
        self.low_scale = 0   # steps in a row with the fp16 scale below the floor
        self.nonfinite = 0   # non-finite losses in a row
        self.finite_steps = 0
        self.reference = math.nan  # the smoothed loss when warm-up ended
        self.rise_from = 0  # finite steps before the rise is judged (again, after a rollback)
        self.probation_until = 0  # finite steps up to which a relapse is judged (after a rollback)
        self.level = math.nan  # the loss level of the restored state on probation (nan: its first finite loss)

    def check(self, step: int, outcome: Any, scale: float | None, similarity: float) -> list[Signal]:
        """This step's signals (empty: healthy)."""
        cfg, signals = self.cfg, []
        try:
            self.nonfinite = count_nonfinite(outcome, self.nonfinite, step, cfg)
        except TrainingError as exc:
            self.nonfinite = 0
            signals.append(Signal("nonfinite", step, math.nan, str(exc)))
        if scale is not None:
            self.low_scale = self.low_scale + 1 if scale < cfg.divergence_scale_floor else 0
            if self.low_scale >= cfg.divergence_scale_window:
                signals.append(Signal("scale", step, scale, f"fp16 grad scale {scale:g} below divergence_scale_floor="
                                      f"{cfg.divergence_scale_floor:g} for {self.low_scale} steps"))
                self.low_scale = 0
        loss = outcome.mean_loss
        if not outcome.loss_finite or not math.isfinite(loss):
            return signals
        warm = self.finite_steps >= cfg.divergence_warmup_steps
        if warm:
            median, spread = self.baseline()
            if loss > median + cfg.divergence_spike_factor * spread:
                signals.append(Signal("spike", step, loss, f"loss spike {loss:.4f} > median {median:.4f} of the last "
                                      f"{len(self.recent)} steps + divergence_spike_factor="
                                      f"{cfg.divergence_spike_factor:g} x spread {spread:.4f}"))
        probation = self.finite_steps < self.probation_until
        if probation and math.isnan(self.level):
            self.level = loss  # the restored state's own loss
        self.recent.append(loss)
        self.finite_steps += 1
        if math.isnan(self.ema):  # on probation the smoothing starts at the level (a single noisy batch is no relapse)
            self.ema = self.level if probation else loss
        self.ema = EMA_DECAY * self.ema + (1 - EMA_DECAY) * loss
        if probation and self.ema > self.level * (1 + cfg.divergence_relapse_margin):
            signals.append(Signal("relapse", step, self.ema, f"smoothed loss {self.ema:.4f} above {self.level:.4f}, "
                                  f"the level of the state rolled back to, by more than "
                                  f"divergence_relapse_margin={cfg.divergence_relapse_margin:g} x that level, "
                                  f"{self.finite_steps - self.probation_until + cfg.divergence_warmup_steps} "
                                  f"step(s) after the rollback"))
        if not warm:
            self.reference = self.ema  # the level the rise margin is a fraction of: the smoothed loss after warm-up
            return signals
        if self.finite_steps > self.rise_from:
            self.lowest = min(self.lowest, self.ema)
            above = self.ema - self.lowest > cfg.divergence_rise_margin * self.reference
            self.rising = self.rising + 1 if above else 0
            if self.rising >= cfg.divergence_rise_window:
                signals.append(Signal("rise", step, self.ema, f"smoothed loss {self.ema:.4f} above its minimum "
                                      f"{self.lowest:.4f} by more than divergence_rise_margin="
                                      f"{cfg.divergence_rise_margin:g} x {self.reference:.4f} (its level after "
                                      f"warm-up) for {self.rising} steps"))
                self.rising = 0
        if similarity >= cfg.divergence_collapse_threshold:
            signals.append(Signal("collapse", step, similarity, f"embedding collapse: mean cosine similarity "
                                  f"{similarity:.4f} between the batch's embeddings >= "
                                  f"divergence_collapse_threshold={cfg.divergence_collapse_threshold:g}"))
        return signals

    def restart(self, level: float) -> None:
        """After a rollback: the counters, the smoothing and the running minimum start again from the restored
        state's losses, and the rise is judged again after ``divergence_warmup_steps`` (a state rolled back to
        may go through the loss's early bump again: against the old minimum that would look like a rise). Those
        steps are the restored state's probation: its smoothed loss must stay within the relapse margin of
        ``level`` (the state's loss level; nan: its first finite loss). The spike detector's history and the level
        after warm-up are kept, so a spike is seen again at once."""
        self.ema, self.lowest, self.rising, self.low_scale, self.nonfinite = math.nan, math.inf, 0, 0, 0
        self.rise_from = self.finite_steps + self.cfg.divergence_warmup_steps
        self.probation_until, self.level = self.rise_from, level

    def baseline(self) -> tuple[float, float]:
        """The median of the recent finite losses and their spread: 1.4826 x the median absolute deviation (the
        standard deviation for normal noise, robust to the spikes themselves), at least 1% of the post-warm-up level
        (flat losses would make any wiggle a spike)."""
        median = statistics.median(self.recent)
        mad = statistics.median(abs(value - median) for value in self.recent)
        return median, max(1.4826 * mad, 0.01 * abs(self.reference))

    def healthy(self, loss: float) -> bool:
        """No detector is counting and ``loss`` is not elevated (within 2 spreads of the median): a state worth
        returning to."""
        if self.rising or self.low_scale or self.nonfinite or not math.isfinite(loss):
            return False
        if self.finite_steps < self.probation_until:  # the state (or the lowered LR) has yet to prove itself
            return False
        if len(self.recent) < 2:
            return True
        median, spread = self.baseline()
        return loss <= median + 2 * spread

    def state_dict(self) -> dict:
        """Plain numbers (a weights_only checkpoint holds them)."""
        return {"recent": list(self.recent), "ema": self.ema, "lowest": self.lowest, "rising": self.rising,
                "low_scale": self.low_scale, "nonfinite": self.nonfinite, "finite_steps": self.finite_steps,
                "reference": self.reference, "rise_from": self.rise_from,
                "probation_until": self.probation_until, "level": self.level}

    def load_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`state_dict`."""
        self.recent = deque((float(v) for v in state["recent"]), maxlen=SPIKE_HISTORY)
        self.ema, self.lowest = float(state["ema"]), float(state["lowest"])
        self.rising, self.low_scale = int(state["rising"]), int(state["low_scale"])
        self.nonfinite, self.finite_steps = int(state["nonfinite"]), int(state["finite_steps"])
        self.reference, self.rise_from = float(state["reference"]), int(state["rise_from"])
        # a version-1 checkpoint has no probation: none is in force after it
        self.probation_until, self.level = int(state.get("probation_until", 0)), float(state.get("level", math.nan))


def copy_tree(obj: Any, device: str | torch.device | None = "cpu") -> Any:
    """A deep copy of a (nested) state whose tensors are fresh copies on ``device`` (None: where they are)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device or obj.device, copy=True)
    if isinstance(obj, dict):
        return {key: copy_tree(value, device) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(copy_tree(value, device) for value in obj)
    return obj


def module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` by name (non-persistent buffers too: Partial FC's optimizer rows)."""
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    return tensors


class DivergenceGuard:
    """The loop's one divergence object: ``shared`` gives the values the optimizer's all-reduce averages,
    ``after_step`` judges them and applies ``on_divergence``; ``lr_factor`` multiplies the scheduled LR.

    ``parts`` is the trainer's (backbone, head, optimizer, scaler, sampler[, distillation or None]). What survives a checkpoint
    (:meth:`state_dict`): the rollbacks taken (step, signal, snapshot step, skipped samples), the LR factor
    in force, the schedule's rewind (fractions of the run) and the detectors' statistics; all in samples, steps
    and fractions, so a resume on another world size or an elastic restart keeps them.
    """

    def __init__(self, cfg: Any, parts: tuple) -> None:
        self.cfg, self.parts = cfg, parts
        self.distill = parts[5] if len(parts) > 5 else None
        self.policy = cfg.on_divergence
        self.detectors = Detectors(cfg)
        self.lr_factor = 1.0
        self.rollbacks: list[dict] = []  # {"step", "signal", "to_step", "skipped": [first, end) in samples seen}
        self.snapshot: dict | None = None
        self.snapshot_due = False  # an interval has passed: the next healthy step is copied
        self.writer: Any = None
        self.last: dict[str, float] = {}
        self.progress: Any = None  # () -> the fraction of the run done (the schedule's position / its length)
        self.rewind: tuple[float, float] | None = None  # the last rollback's (schedule fraction restored, fraction at it)

    def lr(self, schedule: Any, position: float, total_steps: int) -> float:
        """The LR of the step at ``position`` (of ``total_steps``): ``schedule`` read where the last rollback's
        rewind puts it, times the LR factor in force. After a rollback the schedule goes on from the snapshot's
        point, its rest compressed into the steps that are left (the run still ends where it was planned to)."""
        if self.rewind is None:  # position itself: not position / total x total, whose last bit may differ
            return schedule.lr(position) * self.lr_factor
        return schedule.lr(total_steps * self.schedule_fraction(position / total_steps)) * self.lr_factor

    def schedule_fraction(self, done: float) -> float:
        """Where in the schedule (a fraction) the run is when ``done`` of it is done: itself until a rollback,
        then a straight line from the snapshot's schedule point at the rollback to the schedule's end at the run's."""
        if self.rewind is None or self.rewind[1] >= 1:
            return done
        restored, at = self.rewind
        return restored + (done - at) * (1 - restored) / (1 - at)

    # ---------------------------------------------------------------- per step
    def shared(self, similarity: torch.Tensor) -> list[torch.Tensor]:
        """The per-rank device values to average in the optimizer's all-reduce: the embeddings' similarity,
        and the fp16 scale when the scaler is on (the same on every rank; read there, not here)."""
        scaler, optimizer = self.parts[3], self.parts[2]
        if scaler.is_enabled():
            return [similarity, devices.loss_scale(scaler, optimizer.device)]
        return [similarity]

    def begin(self, step: int, samples: int, writer: Any = None, progress: Any = None) -> None:
        """Before the first step (after a resume): TensorBoard's writer, ``progress`` (a callable giving the
        fraction of the run done; None: the schedule is never rewound), and the first snapshot."""
        self.writer, self.progress = writer, progress
        if self.policy == "rollback":
            self.take_snapshot(step, samples)

    def after_step(self, step: int, outcome: Any, samples: int) -> None:
        """Judge step ``step`` (its ``outcome``, ``samples`` seen after it) and apply the policy: a warning,
        a TrainingError (stop; or rollback past ``max_rollbacks``), or a rollback. Every rank gets here with
        the same numbers and takes the same branch."""
        scale = outcome.shared[1] if len(outcome.shared) > 1 else None
        similarity = outcome.shared[0] if outcome.shared else math.nan
        self.last = {"train/grad_norm": outcome.grad_norm, "train/embedding_similarity": similarity,
                     **({} if scale is None else {"train/loss_scale": scale})}
        signals = self.detectors.check(step, outcome, scale, similarity)
        if self.snapshot is not None and math.isnan(self.snapshot["level"]) and math.isfinite(outcome.mean_loss):
            self.snapshot["level"] = outcome.mean_loss  # a copy taken before any finite step: its state's own loss
        for signal in signals:
            self.scalar(f"divergence/{signal.name}", signal.value, samples)
        if step % self.cfg.snapshot_every_steps == 0:
            self.snapshot_due = True
        if signals:
            self.act(signals[0], signals, samples)
        elif self.policy == "rollback" and self.snapshot_due and self.detectors.healthy(outcome.mean_loss):
            self.take_snapshot(step, samples)
        if step % self.cfg.frequent == 0:
            for key, value in self.last.items():
                self.scalar(key, value, samples)

    def act(self, signal: Signal, signals: list[Signal], samples: int) -> None:
        """``on_divergence`` for this step's first signal (the others are logged with it)."""
        seen = "; ".join(s.detail for s in signals)
        if self.policy == "warn" and signal.name != "nonfinite":  # a run of non-finite steps cannot train on
            logger.warning("step %d: training diverges: %s (on_divergence=\"warn\": training goes on; lower lr or set "
                           "on_divergence=\"rollback\")", signal.step, seen)
            return
        if self.policy != "rollback" and signal.name == "nonfinite":
            raise TrainingError(signal.detail)  # as before: names the step and max_nonfinite_steps
        if self.policy != "rollback":
            raise TrainingError(f"step {signal.step}: training diverged: {seen}; stopped (on_divergence="
                                f"\"{self.policy}\"); lower lr, or set on_divergence=\"rollback\"")
        if len(self.rollbacks) >= self.cfg.max_rollbacks or self.snapshot is None:
            history = "; ".join(f"{i}: step {r['step']} {r['signal']} -> back to step {r['to_step']}, samples "
                                f"[{r['skipped'][0]}, {r['skipped'][1]}) skipped, lr x{r['lr_factor']:g}"
                                for i, r in enumerate(self.rollbacks, 1)) or "none"
            raise TrainingError(f"step {signal.step}: training diverged again: {seen}; max_rollbacks="
                                f"{self.cfg.max_rollbacks} reached (rollbacks {history}); lower lr (the run "
                                f"ended at lr x{self.lr_factor:g}) or raise max_rollbacks")
        self.rollback(signal, seen, samples)

    # ---------------------------------------------------------------- snapshot and rollback
    def take_snapshot(self, step: int, samples: int) -> None:
        """Copy the training state into host memory (each rank its own: the head's shard, its RNG-free state)."""
        backbone, head, optimizer, scaler = self.parts[:4]
        self.snapshot = {"step": step, "samples": samples, "level": self.detectors.ema,  # nan before any step
                         "schedule": self.schedule_fraction(self.progress()) if self.progress else None,
                         "backbone": copy_tree(module_tensors(backbone)), "head": copy_tree(module_tensors(head)),
                         "distill": copy_tree(module_tensors(self.distill)) if self.distill is not None else None,
                         "optimizer": copy_tree(optimizer.state_dict()),
                         "scaler": scaler.state_dict() if scaler.is_enabled() else None}
        self.snapshot_due = False

    def restore_snapshot(self) -> None:
        """Put the snapshot's state back, in place (the DDP wrapper and the optimizer keep their tensors)."""
        backbone, head, optimizer, scaler = self.parts[:4]
        snapshot = self.snapshot
        modules = [(backbone, snapshot["backbone"]), (head, snapshot["head"])]
        if self.distill is not None:  # the distillation projection, trained with the backbone
            modules.append((self.distill, snapshot["distill"]))
        with torch.no_grad():
            for module, saved in modules:
                for name, tensor in module_tensors(module).items():
                    tensor.copy_(saved[name])
        optimizer.load_state_dict(copy_tree(snapshot["optimizer"], None))  # fresh tensors: the snapshot stays as is
        if snapshot["scaler"] is not None:
            scaler.load_state_dict(snapshot["scaler"])
        self.detectors.restart(snapshot["level"])

    def rollback(self, signal: Signal, seen: str, samples: int) -> None:
        """Restore the snapshot, lower the LR for the rest of the run, skip the samples trained since the snapshot."""
        self.restore_snapshot()
        self.snapshot_due = False  # the next copy waits for the next interval: the lower LR must prove itself first
        self.lr_factor *= self.cfg.divergence_lr_factor
        record = {"step": signal.step, "signal": signal.name, "to_step": self.snapshot["step"],
                  "skipped": [self.snapshot["samples"], samples], "lr_factor": self.lr_factor}
        rewound = ""
        if self.progress is not None and self.snapshot["schedule"] is not None:
            self.rewind = (float(self.snapshot["schedule"]), float(self.progress()))
            record["schedule"] = list(self.rewind)
            rewound = (f"; the LR schedule goes on from its point at step {record['to_step']} "
                       f"({100 * self.rewind[0]:.1f}% of it), compressed into the rest of the run")
        self.rollbacks.append(record)
        logger.warning("step %d: training diverges: %s; rollback %d of max_rollbacks=%d: back to the state of step %d, "
                       "samples [%d, %d) skipped, lr x%g from now on%s", signal.step, seen, len(self.rollbacks),
                       self.cfg.max_rollbacks, record["to_step"], record["skipped"][0], record["skipped"][1],
                       self.lr_factor, rewound)
        self.scalar("divergence/rollbacks", len(self.rollbacks), samples)
        self.scalar("divergence/lr_factor", self.lr_factor, samples)

    def scalar(self, tag: str, value: float, samples: int) -> None:
        """A TensorBoard scalar (rank 0 has the writer), x-axis samples seen like the trainer's own."""
        if self.writer is not None and math.isfinite(value):
            self.writer.add_scalar(tag, value, samples)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """What a checkpoint keeps: rollbacks, LR factor, detectors (plain numbers, world-size independent)."""
        return {"version": STATE_VERSION, "lr_factor": self.lr_factor, "rollbacks": [dict(r) for r in self.rollbacks],
                "rewind": None if self.rewind is None else list(self.rewind), "detectors": self.detectors.state_dict()}

    def load_state_dict(self, state: dict | None) -> None:
        """A checkpoint's entry (None: a checkpoint from before divergence handling, nothing to restore)."""
        if not state:
            return
        self.lr_factor = float(state["lr_factor"])
        self.rollbacks = [dict(r) for r in state["rollbacks"]]
        rewind = state.get("rewind")  # version 1: the schedule was never rewound
        self.rewind = None if rewind is None else (float(rewind[0]), float(rewind[1]))
        self.detectors.load_state_dict(state["detectors"])
        if self.rollbacks:
            logger.info("divergence history from the checkpoint: %d rollback(s), lr x%g in force, samples skipped: %s",
                        len(self.rollbacks), self.lr_factor,
                        ", ".join(f"[{r['skipped'][0]}, {r['skipped'][1]})" for r in self.rollbacks))
