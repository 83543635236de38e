"""Where a run stands, across ranks: the output-folder decision (fresh, resume, refuse to clobber),
checkpoint save and restore (every rank takes part; rank 0 writes), and the all-rank agreements.

The checkpoint's format itself belongs to utils/checkpoint.py; this module decides when and with
what the trainer calls it.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist

from utils.devices import device as devices
from utils.run.checkpoint import (atomic_save, build_checkpoint, capture_rng_state, checkpoint_path, clean_partial_writes,
                              newest_loadable, previous_run_files, prune_checkpoints, restore_rng_state)
from utils.config.load import to_plain
from utils.config.rules import ConfigError
from utils.config.paths import ensure_output_dir
from utils.run.plan import resume_position

logger = logging.getLogger("arcscale.train")


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. the loss stayed non-finite); the message says why."""


# Decisions travel as float32: NCCL and HCCL both reduce it (HCCL has no float64 all-reduce); flags
# and counts below 2**24 are exact in it.
DECISION_DTYPE = torch.float32


def all_ranks_min(values: list[float], ctx: devices.DeviceContext) -> list[float]:
    """Element-wise minimum over ranks, so every rank takes the same skip/stop decision."""
    tensor = torch.tensor(values, dtype=DECISION_DTYPE, device=ctx.device if ctx.kind != "cpu" else "cpu")
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor.tolist()


def rank0_decides(value: float, ctx: devices.DeviceContext) -> float:
    """Rank 0's ``value`` on every rank (decisions about the output folder are rank 0's to make)."""
    tensor = torch.tensor([value], dtype=DECISION_DTYPE, device=ctx.device if ctx.kind != "cpu" else "cpu")
    if ctx.distributed:
        dist.broadcast(tensor, src=0)
    return float(tensor.item())


def prepare_output(cfg: Any, ctx: devices.DeviceContext) -> tuple[str | None, dict | None]:
    """Clean interrupted writes, refuse to clobber a previous run, find the checkpoint to resume from."""
    if ctx.is_main:
        ensure_output_dir(cfg.output, "config key 'output'")
        clean_partial_writes(cfg.output)
    resume = cfg.resume
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restarts and not resume:  # torchrun --max-restarts restarted us: the folder holds this very run
        logger.warning("elastic restart %d: continuing from the newest checkpoint (as resume=\"auto\")", restarts)
        resume = "auto"
    path, state = newest_loadable(cfg.output) if resume else (None, None)
    found = rank0_decides(float(path is not None), ctx)
    if resume is True and not found:
        raise ConfigError(f"resume=True but {cfg.output} holds no usable checkpoint; use resume=\"auto\" to start "
                          f"fresh when there is none, or check `output`")
    if resume == "auto" and not found:
        logger.info("resume=\"auto\": no checkpoint in %s, starting fresh", cfg.output)
    if not resume:
        existing = previous_run_files(cfg.output) if ctx.is_main else []
        if rank0_decides(float(bool(existing)), ctx) and not cfg.overwrite:
            raise ConfigError(f"output folder {cfg.output} already holds a run ({len(existing) or 'some'} checkpoint/"
                              f"model files); continue it with resume=True (or \"auto\"), choose another `output`, "
                              f"or set overwrite=True to delete them")
        if ctx.is_main and existing:
            for old in existing:
                os.remove(old)
            logger.warning("overwrite=True: deleted %d file(s) of the previous run in %s", len(existing), cfg.output)
    return (path, state) if found else (None, None)


def head_state_dict(head: torch.nn.Module) -> dict:
    """Collective for Partial FC (shards gathered, world-size independent); replicated heads as they are."""
    return head.full_state_dict() if hasattr(head, "full_state_dict") else head.state_dict()


def load_head_state(head: torch.nn.Module, state: dict) -> None:
    """Inverse of :func:`head_state_dict` (Partial FC re-splits the shards for this world size)."""
    if hasattr(head, "load_full_state_dict"):
        head.load_full_state_dict(state)
    else:
        head.load_state_dict(state)


def gather_rng_states(ctx: devices.DeviceContext) -> list:
    """Every rank's RNG state (rank 0 writes them all into the checkpoint)."""
    state = capture_rng_state()
    if not ctx.distributed:
        return [state]
    states = [None] * ctx.world_size
    dist.all_gather_object(states, state)
    return states


def save_checkpoint(cfg, ctx, plan, parts, step, epoch, samples_in_epoch, bad_records, source) -> None:
    """Collective: every rank takes part (head shards are gathered); rank 0 writes atomically.

    A failed write (disk full, permissions) leaves the previous checkpoint intact and, with
    ``on_save_error="stop"``, stops every rank with one line naming the path.
    """
    backbone, head, optimizer, scaler, sampler = parts
    head_state = head_state_dict(head)
    rng_states = gather_rng_states(ctx)
    path, error = checkpoint_path(cfg.output, step), ""
    if ctx.is_main:
        state = build_checkpoint(
            step=step, epoch=epoch, samples_in_epoch=samples_in_epoch, global_batch=plan.global_batch,
            world_size=ctx.world_size, rng=rng_states, config=to_plain(cfg),
            data={"source": str(source), "num_images": plan.num_images, "bad_records": bad_records},
            states={"backbone": backbone.state_dict(), "head": head_state, "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "sampler": sampler.state_dict()})
        try:
            atomic_save(state, path)
            prune_checkpoints(cfg.output, cfg.keep_checkpoints, protect=path)
            atomic_save(backbone.state_dict(), os.path.join(cfg.output, "model.pt"))
            logger.info("saved checkpoint %s (step %d, epoch %d)", path, step, epoch)
        except OSError as exc:
            error = f"cannot write checkpoint {path}: {exc.strerror or exc} (the previous checkpoint is intact)"
    saved = all_ranks_min([0.0 if error else 1.0], ctx)[0]
    if not saved:
        error = error or f"cannot write checkpoint {path} on rank 0 (see its log)"
        if cfg.on_save_error == "warn":
            logger.warning("%s; training goes on (on_save_error=\"warn\")", error)
        else:
            raise TrainingError(f"{error}; stopping (on_save_error=\"stop\"; \"warn\" trains on)")


def restore_checkpoint(path, state, ctx, plan, parts) -> tuple[int, int, Any]:
    """Load every part of a training checkpoint; returns (step, epoch) converted to the current plan, and
    the plan for the rest of the run (``RunPlan.resumed_at``: it ends where the loader really ends)."""
    backbone, head, optimizer, scaler, sampler = parts
    try:
        backbone.load_state_dict(state["backbone"])
    except RuntimeError as exc:
        raise TrainingError(f"{path}: backbone does not match the config's network "
                            f"({str(exc).splitlines()[0]})") from None
    load_head_state(head, state["head"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    sampler.load_state_dict(state["sampler"])
    step, epoch, samples = resume_position(state["progress"], plan)
    if state["world_size"] == ctx.world_size:
        restore_rng_state(state["rng"][ctx.rank])
    else:
        logger.info("resuming %d-rank checkpoint on %d ranks: head shards re-split, RNG reseeded",
                    state["world_size"], ctx.world_size)
    resumed = plan.resumed_at(step, epoch, sampler.consumed if sampler.epoch == epoch else 0)
    # "of N" is where this run really ends (the step lines count to it); on another global batch the loader
    # may drop a partial batch of the resumed epoch, and the LR schedule still spans the planned total
    schedule_note = "" if resumed.last_step == plan.total_steps else f"; LR schedule over {plan.total_steps} steps"
    logger.info("resumed from %s at step %d of %d (epoch %d, %d samples into it%s)", path, step, resumed.last_step,
                epoch, samples, schedule_note)
    return step, epoch, resumed
