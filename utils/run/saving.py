"""A run's checkpoint and model.pt writes under ``on_save_error``, and what of the run is on disk.

Every rank takes part in a save (Partial FC's shards are gathered, every rank's RNG state collected);
rank 0 writes. Any failure of a write (a full disk, a quota, permissions, torch's zip-writer error that
hides them) is one line: ``on_save_error="stop"`` stops every rank, ``"warn"`` trains on. Before each
write the output folder's free space is compared with the size of the last checkpoint and model.pt.
The saver remembers which checkpoint and which model.pt of this run are on disk, so each failure says
so, and a run whose final state could not be written ends with an error, never with a summary that
names a stale model.pt.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

import torch

from utils.config.load import to_plain
from utils.devices import device as devices
from utils.run.checkpoint import atomic_save, build_checkpoint, checkpoint_path, prune_checkpoints
from utils.run.state import TrainingError, all_ranks_min, gather_rng_states, head_state_dict, rank0_text

logger = logging.getLogger("arcscale.train")
MIB = 1 << 20


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state: what a first save needs before any file size is known."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(value) for value in obj)
    return 0


def reason(exc: BaseException) -> str:
    """The cause of a failed write in a few words (an OSError's strerror, an error's first line)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class CheckpointSaver:
    """Writes this run's checkpoints and model.pt and keeps track of which of them are on disk.

    ``data`` is the data fingerprint recorded in every checkpoint (resume compares it); ``divergence`` returns
    the divergence guard's state for each checkpoint (``utils/run/divergence.py``);
    ``resumed_from``/``resumed_step`` the checkpoint this run continued from, if any.
    """

    def __init__(self, cfg: Any, ctx: devices.DeviceContext, plan: Any, parts: tuple, data: dict,
                 resumed_from: str | None = None, resumed_step: int = 0,
                 divergence: Callable[[], dict] | None = None) -> None:
        self.cfg, self.ctx, self.plan, self.parts, self.data = cfg, ctx, plan, parts, data
        self.divergence = divergence  # the divergence guard's state (rollbacks, LR factor), saved in each checkpoint
        self.model_path = os.path.join(cfg.output, "model.pt")
        self.tried_at: tuple[int, int] | None = None  # (step, epoch) of the last save (not retried at once)
        self.failure = ""  # why the last save failed; "" when it succeeded
        self.resumed_from = resumed_from
        self.checkpoint, self.checkpoint_step = (resumed_from, resumed_step) if resumed_from else (None, None)
        self.model_step: int | None = None  # model.pt of this run on disk, from this step
        self.checkpoint_size = os.path.getsize(resumed_from) if resumed_from and ctx.is_main else 0
        self.model_size = 0

    def save(self, step: int, epoch: int, samples_in_epoch: int, bad_records: int) -> bool:
        """Collective: save at (step, epoch) unless that was tried already; False when a write failed and
        ``on_save_error="warn"`` (one warning; at the last step :meth:`require_saved` says it), a
        TrainingError naming the file and what is on disk when ``"stop"``."""
        if self.tried_at == (step, epoch):
            return not self.failure
        self.tried_at = (step, epoch)
        backbone, head, optimizer, scaler, sampler, *extra = self.parts
        head_state = head_state_dict(head)
        rng_states = gather_rng_states(self.ctx)
        path, wrote, error = checkpoint_path(self.cfg.output, step), [1.0, 1.0], ""
        if self.ctx.is_main:
            state = build_checkpoint(
                step=step, epoch=epoch, samples_in_epoch=samples_in_epoch, global_batch=self.plan.global_batch,
                world_size=self.ctx.world_size, rng=rng_states, config=to_plain(self.cfg),
                data={**self.data, "bad_records": bad_records},
                states={"backbone": backbone.state_dict(), "head": head_state, "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(), "sampler": sampler.state_dict(),
                        **({} if self.divergence is None else {"divergence": self.divergence()}),
                        **({"distill": extra[0].state_dict()} if extra and extra[0] is not None else {})})
            wrote, error = self._write(state, backbone.state_dict(), path)
            if not error:
                logger.info("saved checkpoint %s (step %d, epoch %d)", path, step, epoch)
        checkpoint_ok, model_ok = all_ranks_min(wrote, self.ctx)
        if checkpoint_ok:
            self.checkpoint, self.checkpoint_step = path, step
        if checkpoint_ok and model_ok:
            self.model_step, self.failure = step, ""
            return True
        self.failure = rank0_text(error, self.ctx)
        if self.cfg.on_save_error == "warn":
            if step >= self.plan.last_step:  # the run's end: require_saved's error line says it, once
                return False
            logger.warning("%s; %s; training goes on (on_save_error=\"warn\")", self.failure, self.on_disk())
            return False
        raise TrainingError(f"{self.failure}; {self.on_disk()}; stopping (on_save_error=\"stop\"; \"warn\" trains on)")

    def _write(self, state: dict, model_state: dict, path: str) -> tuple[list[float], str]:
        """Rank 0: checkpoint, pruning, model.pt; ([checkpoint written, model.pt written], error line)."""
        self._check_room(state, model_state)
        try:
            atomic_save(state, path)
        except (OSError, RuntimeError) as exc:
            return [0.0, 0.0], f"cannot write checkpoint {path}: {reason(exc)} (the previous checkpoint is intact)"
        self.checkpoint_size = os.path.getsize(path)
        try:
            prune_checkpoints(self.cfg.output, self.cfg.keep_checkpoints, protect=path)
        except OSError as exc:  # the new checkpoint is written: an old one left behind is not a failed save
            logger.warning("cannot prune old checkpoints in %s: %s", self.cfg.output, reason(exc))
        try:
            atomic_save(model_state, self.model_path)
        except (OSError, RuntimeError) as exc:
            return [1.0, 0.0], f"cannot write {self.model_path}: {reason(exc)}"
        self.model_size = os.path.getsize(self.model_path)
        return [1.0, 1.0], ""

    def _check_room(self, state: dict, model_state: dict) -> None:
        """Warn when the folder's free space is below what the last checkpoint and model.pt took (the
        new files are written in full before the old ones go)."""
        need = (self.checkpoint_size or tensor_bytes(state)) + (self.model_size or tensor_bytes(model_state))
        try:
            stats = os.statvfs(self.cfg.output)
        except OSError:
            return
        free = stats.f_bavail * stats.f_frsize
        if free < need:
            logger.warning("%s has %.1f MiB free but a checkpoint and model.pt take about %.1f MiB: this save will "
                           "likely fail (free some space)", self.cfg.output, free / MIB, need / MIB)

    def on_disk(self) -> str:
        """What of this run the folder holds, in words: the newest checkpoint and model.pt, with their steps."""
        if self.checkpoint is None:
            text = "on disk: no checkpoint of this run"
        else:
            resumed = ", the one this run resumed from" if self.checkpoint == self.resumed_from else ""
            text = f"on disk: {os.path.basename(self.checkpoint)} (step {self.checkpoint_step}{resumed})"
        if self.model_step is None:
            return f"{text}, no model.pt written by this run"
        if self.model_step == self.checkpoint_step:
            return f"{text} and model.pt from the same step"
        return f"{text}, model.pt from step {self.model_step}"

    def require_saved(self, step: int) -> None:
        """Raise a TrainingError unless the last save (the run's final one, at ``step``) wrote both files:
        a run whose result is not on disk does not end as a success."""
        if not self.failure:
            return
        behind = step - self.checkpoint_step if self.checkpoint else 0
        unsaved = f" ({behind} steps of training not saved)" if behind > 0 else ""
        then = "resume=True continues from there" if self.checkpoint else "run it again"
        raise TrainingError(f"the final save at step {step} failed: {self.failure}; {self.on_disk()}{unsaved}; "
                            f"free space or fix the folder, then {then}")

    def final_files(self) -> tuple[str | None, int | None]:
        """(path, step) of the checkpoint that holds the run's result (the summary names it)."""
        return self.checkpoint, self.checkpoint_step
