"""What a resume is about to do, said before it does it: a finished run is left alone, a ``max_steps``
below the checkpoint's progress is refused, and every config key that differs from the checkpoint's
is logged with what it does to the learning-rate schedule.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from easydict import EasyDict

from utils.config.load import to_plain
from utils.config.rules import ConfigError
from utils.devices import device as devices
from utils.run.plan import RunPlan, make_plan, make_schedule

logger = logging.getLogger("arcscale.train")

# Keys that name the run or its bookkeeping, not what it trains: never reported as changes.
BOOKKEEPING = frozenset({"resume", "config_path", "config_name", "overwrite", "output", "ignored_keys"})  # a copied folder is fine
# Keys the LR curve or the run's length depend on.
SCHEDULE_KEYS = frozenset({"lr", "lr_per_512", "num_epoch", "max_steps", "warmup_epoch", "lr_schedule", "lr_steps",
                           "lr_gamma", "lr_power", "batch_size", "gradient_acc"})
# Fine-tuning keys: they apply from the resume point; the optimizer keeps every parameter's state (by name).
FINETUNE_KEYS = frozenset({"backbone_lr_scale", "freeze_stages", "head_only_epochs", "freeze_bn"})
FINETUNE_NOTE = ("; fine-tuning keys apply from the resume point, every parameter the optimizer still holds keeps "
                 "its state (momentum)")


def changed_keys(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, this run's value) for every key that differs, sorted by key."""
    keys = (set(saved) | set(current)) - BOOKKEEPING
    return [(key, saved.get(key), current.get(key)) for key in sorted(keys) if saved.get(key) != current.get(key)]


def _schedule_note(saved_config: dict, state: dict, plan: RunPlan, schedule: Any) -> str:
    """How the LR curve moves: total steps and the LR at the resume point, under the checkpoint's config and now."""
    progress = state["progress"]
    epoch, samples = int(progress["epoch"]), int(progress["samples_in_epoch"])
    try:
        old_plan = make_plan(EasyDict(saved_config), plan.num_images, int(state["world_size"]))
        old_lr = make_schedule(EasyDict(saved_config), old_plan).lr(old_plan.position(epoch, samples))
    except (ConfigError, KeyError, TypeError, ValueError):  # a checkpoint from an older config layout
        return ""
    new_lr = schedule.lr(plan.position(epoch, samples))
    return (f"; LR schedule over {old_plan.total_steps} -> {plan.total_steps} steps, LR at the resume point "
            f"{old_lr:.6g} -> {new_lr:.6g}")


def refresh_model_file(output: str, path: str, state: dict) -> bool:
    """Write model.pt from the final checkpoint when it is missing or older (a stop between the two writes)."""
    model = os.path.join(output, "model.pt")
    if os.path.isfile(model) and os.path.getmtime(model) >= os.path.getmtime(path):
        return False
    from utils.run.checkpoint import atomic_save

    atomic_save(state["backbone"], model)
    return True


def review_resume(cfg: Any, path: str, state: dict, plan: RunPlan, schedule: Any,
                  ctx: devices.DeviceContext) -> bool:
    """Check and describe a resume before anything is loaded; True when the run already finished
    (nothing to train: the caller returns without writing a checkpoint or verifying again)."""
    progress = state["progress"]
    reached = plan.position(int(progress["epoch"]), int(progress["samples_in_epoch"]))
    done_step = int(progress.get("step", round(reached)))
    if cfg.max_steps and reached > int(cfg.max_steps):
        raise ConfigError(f"max_steps={cfg.max_steps} is below the progress of {path} (step {done_step}, "
                          f"epoch {progress['epoch']}): raise max_steps, or start a new run in another `output`")
    if ctx.is_main:
        changes = changed_keys(state["config"], to_plain(cfg))
        if changes:
            listing = ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes)
            note = _schedule_note(state["config"], state, plan, schedule) if any(
                key in SCHEDULE_KEYS for key, _, _ in changes) else ""
            if any(key in FINETUNE_KEYS for key, _, _ in changes):
                note += FINETUNE_NOTE
            logger.warning("resume: %d config key(s) differ from %s: %s%s", len(changes), os.path.basename(path),
                           listing, note)
    if reached < plan.total_steps:
        return False
    written = "nothing written"
    if ctx.is_main and refresh_model_file(cfg.output, path, state):
        written = "model.pt was older than that checkpoint and is rewritten from it"
    logger.warning("this run already finished at step %d (%s): nothing to train, %s", done_step, path, written)
    return True
