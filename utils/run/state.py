"""Where a run stands, across ranks: the output-folder decision (locked for this run, fresh, resume, refuse
to clobber), checkpoint restore (after checking it was trained on this data), and the all-rank agreements.

The checkpoint's format belongs to utils/run/checkpoint.py and the writes to utils/run/saving.py.
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import uuid
from typing import Any

import torch
import torch.distributed as dist

from utils.devices import device as devices
from utils.devices import distributed as dist_utils
from utils.run.checkpoint import (CheckpointError, capture_rng_state, clean_partial_writes, load_checkpoint,
                                  newest_loadable, previous_run_files, restore_rng_state)
from utils.config.rules import ConfigError
from utils.config.paths import OutputPathError, ensure_output_dir
from utils.run.lock import OutputLockedError, lock_output
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


def rank0_text(text: str, ctx: devices.DeviceContext) -> str:
    """Rank 0's ``text`` on every rank (so every rank's one-line error says the same thing)."""
    if not ctx.distributed:
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


def prepare_output(cfg: Any, ctx: devices.DeviceContext) -> tuple[str | None, dict | None]:
    """Lock the folder for this run, clean interrupted writes, refuse to clobber a previous run, find the
    checkpoint to resume from (rank 0 chooses it, every rank loads that file: :func:`share_checkpoint`)."""
    refusal: Exception | None = None
    if ctx.is_main:  # the one process that writes the folder holds its lock
        try:
            ensure_output_dir(cfg.output, "config key 'output'")
            # an elastic restart's previous attempt may still be exiting: give its lock time to drop
            lock_output(cfg.output, str(cfg.get("config_path") or ""), wait_s=60.0 if ctx.restarts else 0.0)
        except (OutputPathError, OutputLockedError) as exc:
            refusal = exc
    message = rank0_text(str(refusal or ""), ctx)
    if message:
        raise refusal or OutputLockedError(message)
    if ctx.is_main:
        clean_partial_writes(cfg.output)
    resume = cfg.resume
    if ctx.restarts and not resume:  # torchrun --max-restarts restarted us: the folder holds this very run
        logger.warning("elastic restart %d: continuing from the newest checkpoint (as resume=\"auto\")", ctx.restarts)
        resume = "auto"
    path, state = newest_loadable(cfg.output) if resume and ctx.is_main else (None, None)
    path, state = share_checkpoint(path, state, cfg.output, ctx)
    if resume is True and path is None:
        raise ConfigError(f"resume=True but {cfg.output} holds no usable checkpoint; use resume=\"auto\" to start "
                          f"fresh when there is none, or check `output`")
    if resume == "auto" and path is None:
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
    return path, state


VISIBLE_MARKER = ".arcscale-visible-"  # a file rank 0 creates in `output` for a moment: can the others see it?


def share_checkpoint(path: str | None, state: dict | None, output: str,
                     ctx: devices.DeviceContext) -> tuple[str | None, dict | None]:
    """Rank 0's choice (``path``, its loaded ``state``; ignored elsewhere) loaded on every rank, or one line.

    Each rank used to look for the newest checkpoint on its own disk: a node that saw none started from step
    0 and hung later. Now rank 0 sends the file's name, size and step; every rank loads that name in its
    `output`, and all agree it did, or every rank stops with ``checkpoint X is not visible on rank R (node
    N)``. On the way every rank looks for a file rank 0 creates in `output` for the moment: a rank that does
    not see it gets a warning at the start of a run (rank 0 alone writes checkpoints), not at its first resume.
    """
    marker = ""
    if ctx.is_main and ctx.distributed:
        for stale in glob.glob(os.path.join(glob.escape(output), VISIBLE_MARKER + "*")):
            os.remove(stale)
        marker = os.path.join(output, f"{VISIBLE_MARKER}{uuid.uuid4().hex}")
        open(marker, "w").close()
    choice = {"marker": os.path.basename(marker), "name": None}
    if ctx.is_main and path is not None:
        choice.update(name=os.path.basename(path), path=path, size=os.path.getsize(path), step=int(state["step"]))
    choice = json.loads(dist_utils.broadcast_text(json.dumps(choice), ctx.device))
    if choice["name"] is None:
        path, state = None, None
    elif not ctx.is_main:
        path = os.path.join(output, choice["name"])
    problem = 0  # 1: no such file, 2: another file (unreadable, or its size or step differs)
    if path is not None and not ctx.is_main:
        state, problem = None, 1
        if os.path.isfile(path):
            problem = 2
            with contextlib.suppress(CheckpointError, OSError):
                state = load_checkpoint(path)
                if os.path.getsize(path) == choice["size"] and int(state["step"]) == choice["step"]:
                    problem = 0
    sees_output = ctx.is_main or os.path.exists(os.path.join(output, choice["marker"]))
    rows = dist_utils.all_gather_ints([problem, int(sees_output), ctx.node], ctx.device)
    if marker:
        os.remove(marker)
    chosen = choice.get("path")  # as rank 0 names it
    for rank, (rank_problem, _, node) in enumerate(rows):
        if rank_problem == 1:
            raise TrainingError(f"checkpoint {chosen} is not visible on rank {rank} (node {node}): output must be on "
                                f"a filesystem every node sees")
        if rank_problem == 2:
            raise TrainingError(f"checkpoint {chosen} on rank {rank} (node {node}) is not the file rank 0 chose "
                                f"(unreadable, or another size or step): output must be on a filesystem every node "
                                f"sees")
    blind = [(rank, node) for rank, (_, sees, node) in enumerate(rows) if not sees]
    if blind:
        logger.warning("output %s is not visible on rank(s) %s (node(s) %s): rank 0 alone writes checkpoints, so a "
                       "resume would stop; put output on a filesystem every node sees", output,
                       ", ".join(str(rank) for rank, _ in blind), ", ".join(sorted({str(node) for _, node in blind})))
    return path, state


def unseen_on_some_rank(paths: list[str], ctx: devices.DeviceContext) -> list[list[tuple[int, int]]]:
    """For each of ``paths`` (as each rank names it), the (rank, node) pairs on which it is not a file: one
    decision for all ranks, so that none skips a collective the others run on a file only they see."""
    rows = dist_utils.all_gather_ints([int(os.path.isfile(path)) for path in paths] + [ctx.node], ctx.device)
    return [[(rank, row[-1]) for rank, row in enumerate(rows) if not row[index]] for index in range(len(paths))]


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
    """Every rank's RNG states, its device's generators included (rank 0 writes them all into the checkpoint)."""
    state = capture_rng_state(devices.device_rng_state(ctx))
    if not ctx.distributed:
        return [state]
    states = [None] * ctx.world_size
    dist.all_gather_object(states, state)
    return states


def restore_rng(state: dict, ctx: devices.DeviceContext) -> None:
    """On the world size that wrote ``state``: this rank's CPU, numpy, Python and device generators as they
    were. On another world size rank r's states have no counterpart: every generator keeps the seeding the
    run started with (seed + rank; ``torch.manual_seed`` seeds the CUDA/NPU generators too), as a fresh run."""
    if state["world_size"] != ctx.world_size:
        logger.info("resuming %d-rank checkpoint on %d ranks: head shards re-split, RNG reseeded",
                    state["world_size"], ctx.world_size)
        return
    why = devices.restore_device_rng_state(ctx, restore_rng_state(state["rng"][ctx.rank]))
    if why:
        logger.warning("device RNG not restored (%s): it keeps the seed + rank seeding, so dropout and other "
                       "random draws on the device differ from an uninterrupted run", why)


def _source_words(entry: dict) -> str:
    return f"{entry.get('source', entry.get('path'))} ({entry['num_images']} images, {entry['num_classes']} classes)"


def as_source_list(fingerprint: dict) -> list | None:
    """A data fingerprint's ``sources``; a one-source fingerprint as a list of its one entry (None if empty)."""
    if "sources" in fingerprint or "source" not in fingerprint:
        return fingerprint.get("sources")
    return [{"source": fingerprint["source"], "path": fingerprint["source"], "parts": 1,
             **{k: fingerprint[k] for k in ("num_images", "num_classes", "index_sha256") if k in fingerprint}}]


def source_list_changes(saved: list | None, current: list | None) -> list[str]:
    """What differs between two runs' source lists (DataInfo.fingerprint's ``sources``), in words: sources
    added, removed, reordered, with other counts, another index, another sampling share, another identity
    map. An old checkpoint without the list compares by the totals alone (empty here)."""
    if saved is None or current is None:
        return []

    def split(entries: list) -> tuple[list[dict], str]:
        maps = [e["identity_map"] for e in entries if "identity_map" in e]
        return [e for e in entries if "identity_map" not in e], maps[0] if maps else ""
    (old, old_map), (new, new_map) = split(saved), split(current)
    same = ("num_images", "num_classes", "index_sha256")
    for entry in new:  # a source that only moved (same counts and index) is the same source: logged, no change
        if entry["path"] not in {e["path"] for e in old}:
            twin = [e for e in old if all(e.get(k) == entry.get(k) for k in same)
                    and e["path"] not in {n["path"] for n in new}]
            if twin:
                logger.info("source %s moved: %s -> %s (same images, classes and index)", entry.get("source"),
                            twin[0]["path"], entry["path"])
                old = [dict(e, path=entry["path"]) if e is twin[0] else e for e in old]
    old_by, new_by = {e["path"]: e for e in old}, {e["path"]: e for e in new}
    changes = [f"source removed: {_source_words(e)}" for e in old if e["path"] not in new_by]
    changes += [f"source added: {_source_words(e)}" for e in new if e["path"] not in old_by]
    kept_old = [e["path"] for e in old if e["path"] in new_by]
    if kept_old != [e["path"] for e in new if e["path"] in old_by]:
        changes.append("sources reordered (label offsets move)")
    for path in kept_old:
        before, after = old_by[path], new_by[path]
        name = after.get("source", path)
        for key, word in (("num_images", "images"), ("num_classes", "classes"), ("parts", "shards")):
            if key in before and before[key] != after.get(key):
                changes.append(f"source {name}: {word} {before[key]} -> {after.get(key)}")
        if before.get("index_sha256") != after.get("index_sha256") and before.get("num_images") == after.get(
                "num_images"):
            changes.append(f"source {name}: index hash {str(before.get('index_sha256'))[:12]} -> "
                           f"{str(after.get('index_sha256'))[:12]}")
        if "share" in before and "share" in after and abs(float(before["share"]) - float(after.get("share", -1))) > 1e-6:
            changes.append(f"source {name}: sampling share {before['share']:.4f} -> {after.get('share', 0):.4f}")
    if old_map != new_map:
        changes.append(f"identity map {old_map[:12] or 'none'} -> {new_map[:12] or 'none'}")
    return changes


def check_resume_data(path: str, state: dict, data: dict, changed_ok: bool = False) -> None:
    """Refuse to resume ``state`` on other data than it was trained on, in one line saying what changed
    (image and class counts, the index's hash; a folder that only moved is logged), unless ``changed_ok``
    (``resume_data_changed=True``): then log it and continue there. Another class count never continues:
    the head has one row per class."""
    saved = state.get("data") or {}
    changes = [f"{word} {saved[key]} -> {data[key]}" for key, word in (("num_images", "images"),
                                                                       ("num_classes", "classes"))
               if key in saved and int(saved[key]) != int(data[key])]
    several = "sources" in saved or "sources" in data
    source_changes = source_list_changes(as_source_list(saved), as_source_list(data)) if several else []
    changes += source_changes
    if saved.get("index_sha256") and saved["index_sha256"] != data["index_sha256"] and not source_changes:
        changes.append(f"index hash {saved['index_sha256'][:12]} -> {data['index_sha256'][:12]}"
                       f"{'' if changes else ' with the same image and class counts'}")
    moved = "source" in saved and str(saved["source"]) != str(data["source"])
    if not changes:
        if moved:
            logger.info("the data moved since %s: %s -> %s (same images, classes and index)", path, saved["source"],
                        data["source"])
        return
    where = f"{saved['source']} -> {data['source']}" if moved else str(data["source"])
    what = f"the data changed since checkpoint {path} ({where}: {', '.join(changes)})"
    if "num_classes" in saved and int(saved["num_classes"]) != int(data["num_classes"]):
        raise TrainingError(f"{what}: its head has one row per class, so it cannot continue on this data; point "
                            f"`rec` at the data it was trained on, or start a new run from its backbone with "
                            f"init_backbone={path!r}")
    if not changed_ok:
        raise TrainingError(f"{what}; point `rec` at the data it was trained on, or set resume_data_changed=True "
                            f"to continue on the new data")
    logger.warning("resume_data_changed=True: %s; continuing on the new data", what)
    progress, sampler = state["progress"], state["sampler"]  # a position past the new epoch's end ends that epoch
    progress["samples_in_epoch"] = min(int(progress["samples_in_epoch"]), int(data["num_images"]))
    sampler["consumed"] = min(int(sampler.get("consumed", 0)), int(data["num_images"]))


def backbone_mismatch(path: str, state: dict, backbone: torch.nn.Module) -> str:
    """One line for a checkpoint whose backbone does not load into this run's: which network (and
    embedding size) the checkpoint holds, what differs, and the two ways on."""
    saved = state.get("config") or {}
    ours, theirs = backbone.state_dict(), state["backbone"]
    counts = {"missing keys": sum(key not in theirs for key in ours),
              "unexpected keys": sum(key not in ours for key in theirs),
              "shape mismatches": sum(key in theirs and tuple(theirs[key].shape) != tuple(value.shape)
                                      for key, value in ours.items())}
    differs = ", ".join(f"{count} {what}" for what, count in counts.items() if count)
    holds = (f"the checkpoint holds network '{saved['network']}' with embedding size {saved.get('embedding_size')}"
             if saved.get("network") else "the checkpoint's config does not name its network")
    again = (f"resume with --set network={saved['network']} --set embedding_size={saved.get('embedding_size')}"
             if saved.get("network") else "resume with the network it was trained with")
    return (f"{path}: backbone does not match the config's network ({type(backbone).__name__}: {differs}); "
            f"{holds}: {again}, or start a new `output` from its backbone with init_backbone={path!r}")


# Config keys that decide which parameters the optimizer holds and how it groups them.
OPTIMIZER_KEYS = ("freeze_stages", "backbone_lr_scale", "head", "loss", "optimizer", "network", "embedding_size")


def optimizer_mismatch(path: str, state: dict, problem: Exception, config: Any = None) -> str:
    """One line for a checkpoint whose optimizer state cannot be placed on this run's parameters: what
    differs, each config key that shapes the optimizer with the checkpoint's and this run's value, and the
    two ways on."""
    saved, ours = state.get("config") or {}, config or {}
    differing = [(key, saved.get(key), ours.get(key)) for key in OPTIMIZER_KEYS
                 if key in saved and key in ours and saved.get(key) != ours.get(key)]
    keys = "".join(f"; config key '{key}' is {new!r} here, {old!r} in the checkpoint" for key, old, new in differing)
    back = " ".join(f"--set {key}={old!r}" for key, old, _ in differing) or "the config it was trained with"
    return (f"{path}: {problem}{keys}: resume with {back}, or start a new `output` from its backbone with "
            f"init_backbone={path!r} (a fresh optimizer)")


def restore_checkpoint(path, state, ctx, plan, parts, data: dict | None = None,
                       data_changed_ok: bool = False, config: Any = None) -> tuple[int, int, Any]:
    """Load every part of a training checkpoint, after checking it was trained on ``data`` (the run's data
    fingerprint, see :func:`check_resume_data`); returns (step, epoch) converted to the current plan, and
    the plan for the rest of the run (``RunPlan.resumed_at``: it ends where the loader really ends).
    ``config`` (this run's) names the keys that differ when the optimizer state cannot be placed."""
    if data is not None:
        check_resume_data(path, state, data, data_changed_ok)
    backbone, head, optimizer, scaler, sampler, *extra = parts
    distill = extra[0] if extra else None  # the distillation projection (distill.py), when the run has a teacher
    if (distill is not None) != ("distill" in state):
        raise TrainingError(f"{path}: the checkpoint was trained {'with' if 'distill' in state else 'without'} a "
                            f"teacher and the config has {'none' if distill is None else 'one'}: resume with the "
                            f"config it was trained with, or start a new `output` with init_backbone={path!r}")
    saved_optimizer = (state.get("config") or {}).get("optimizer")
    if config is not None and saved_optimizer and config.get("optimizer") != saved_optimizer:
        # SGD's momentum and Adam's moments are different state: loading one into the other would fail in torch
        # at the first step, or (same keys) silently mean something else
        raise TrainingError(optimizer_mismatch(path, state, "the optimizer state was written by another optimizer",
                                               config))
    if distill is not None:
        distill.load_state_dict(state["distill"])
    try:
        backbone.load_state_dict(state["backbone"])
    except RuntimeError:
        raise TrainingError(backbone_mismatch(path, state, backbone)) from None
    load_head_state(head, state["head"])
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as exc:  # the state cannot be placed on this run's parameters (pfc/optim_state.py, torch)
        raise TrainingError(optimizer_mismatch(path, state, exc, config)) from None
    scaler.load_state_dict(state["scaler"])
    sampler.load_state_dict(state["sampler"])
    step, epoch, samples = resume_position(state["progress"], plan)
    restore_rng(state, ctx)
    resumed = plan.resumed_at(step, epoch, sampler.consumed if sampler.epoch == epoch else 0)
    saved_batch = int(state["progress"]["global_batch"])
    if saved_batch != plan.global_batch and ctx.is_main:
        logger.warning("global batch changed from %d to %d: checkpoint step %d becomes step %d of %d (epoch %d, "
                       "%d samples into it; same remaining samples and LR curve)", saved_batch, plan.global_batch,
                       int(state["progress"].get("step", -1)), step, resumed.last_step, epoch, samples)
    # "of N" is where this run really ends (the step lines count to it); on another global batch the loader
    # may drop a partial batch of the resumed epoch, and the LR schedule still spans the planned total
    schedule_note = "" if resumed.last_step == plan.total_steps else f"; LR schedule over {plan.total_steps} steps"
    logger.info("resumed from %s at step %d of %d (epoch %d, %d samples into it%s)", path, step, resumed.last_step,
                epoch, samples, schedule_note)
    return step, epoch, resumed
