"""Training checkpoints, the one owner of their format: schema version, atomic writes, keep-last-N,
newest-loadable discovery, clean-up of interrupted writes, RNG state, and the one error class.

Backbone weights inside any file (model.pt, a checkpoint, insightface/facenet releases) are read by
utils/weights.py, which uses this module's format constant and error class.

A checkpoint is one ``torch.save`` file holding only tensors, numbers, strings, lists and dicts,
so it loads with ``torch.load(weights_only=True)`` (no pickle code execution) and a
half-written file never replaces a good one (temp file + fsync + rename).
"""
from __future__ import annotations

import glob
import logging
import os
import random
import re
from typing import Any

import numpy as np
import torch

CHECKPOINT_FORMAT = "arcscale-checkpoint"
# 2: progress in samples ({"epoch", "samples_in_epoch", "global_batch", "step"}), no scheduler entry
# (the LR schedule is a pure function of config and progress), data description, bad-record count.
CHECKPOINT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
REQUIRED_KEYS = frozenset({"step", "epoch", "world_size", "backbone", "head", "optimizer", "scaler", "sampler",
                           "rng", "config"})
_NAME = re.compile(r"checkpoint_step(\d+)\.pt$")
_TMP_NAME = re.compile(r"\.tmp\.\d+$")
logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint or weights file that is missing, unreadable, not ours or does not fit; one line naming the file."""


def describe_load_failure(exc: BaseException) -> str:
    """The informative sentence of torch.load's multi-paragraph error, plus what to do about it."""
    root = exc.__cause__ or exc.__context__ or exc
    text = " ".join(str(root).split()) or type(root).__name__
    sentence = text.split(". ")[0][:200]
    if "Unsupported global" in text or "Unsupported class" in text:  # torch >= 2.4's wording, torch 2.1-2.3's
        return (f"{sentence} (the file pickles Python objects, e.g. a whole model; load it once with "
                f"weights_only=False where you trust it and save model.state_dict() instead)")
    return f"{type(root).__name__}: {sentence}"


def write_error(exc: BaseException, path: str) -> BaseException:
    """The OSError behind a failed torch.save, naming ``path``: a failed write (ENOSPC, EDQUOT, EIO) comes
    out of torch.save as the OSError itself, or, when the file took part of a write, as its zip writer's
    ``RuntimeError: [enforce fail at inline_container.cc] . unexpected pos ...`` with the OSError only as
    its context. Any other error is returned as it is."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return exc
    return OSError(cause.errno, cause.strerror or str(cause), path)


def atomic_save(obj: Any, path: str) -> None:
    """Write ``obj`` next to ``path`` under a temporary name, fsync it, then rename over ``path``; a failed
    write is an OSError (also when torch's zip writer reports it), and leaves ``path`` as it was."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp_path = f"{path}.tmp.{os.getpid()}"
    try:
        # unbuffered: a failed write surfaces inside torch.save, never again from close()'s flush
        with open(tmp_path, "wb", buffering=0) as handle:
            try:
                torch.save(obj, handle)
            except (OSError, RuntimeError) as exc:
                error = write_error(exc, tmp_path)
                if error is exc:
                    raise
                raise error from exc
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    finally:
        if os.path.lexists(tmp_path) and not os.path.isdir(tmp_path):
            os.remove(tmp_path)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def build_checkpoint(*, step: int, epoch: int, samples_in_epoch: int, global_batch: int, world_size: int,
                     states: dict[str, Any], rng: list, config: dict, data: dict) -> dict:
    """The checkpoint dict (the schema lives here only).

    ``states`` holds the state_dicts: backbone, head (world-size independent), optimizer, scaler,
    sampler. ``progress`` is what resume converts to any world size; ``step`` names the file.
    """
    missing = {"backbone", "head", "optimizer", "scaler", "sampler"} - set(states)
    if missing:
        raise CheckpointError(f"checkpoint for step {step}: missing state {sorted(missing)}")
    return {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "step": step, "epoch": epoch, "world_size": world_size,
        "progress": {"epoch": epoch, "samples_in_epoch": samples_in_epoch, "global_batch": global_batch, "step": step},
        "data": data, **states, "rng": rng, "config": config,
    }


def checkpoint_path(output: str, step: int) -> str:
    """``<output>/checkpoint_step<9-digit step>.pt``."""
    return os.path.join(output, f"checkpoint_step{step:09d}.pt")


def list_checkpoints(output: str) -> list[str]:
    """Checkpoints in ``output``, oldest first (by step number, not mtime)."""
    found = []
    for path in glob.glob(os.path.join(output, "checkpoint_step*.pt")):
        match = _NAME.search(path)
        if match:
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output: str) -> str | None:
    """The checkpoint with the highest step number (unchecked; see :func:`newest_loadable`)."""
    paths = list_checkpoints(output)
    return paths[-1] if paths else None


# (inode, size, mtime) and progress key of each checkpoint seen: a save prunes by progress, and without the cache
# each save would open every checkpoint in the folder again
_progress_cache: dict[str, tuple[tuple[int, int, int], tuple | None]] = {}


def _progress_key(path: str, state: dict) -> tuple:
    """Order of checkpoints by training progress (epoch, samples into it), then by write time: step
    numbers are in units of the global batch, which a resume on another world size changes."""
    progress = state["progress"]
    return int(progress["epoch"]), int(progress["samples_in_epoch"]), os.path.getmtime(path)


def _cached_progress(path: str) -> tuple | None:
    """The progress key of ``path`` (None: unusable, with one warning), read once per file version."""
    info = os.stat(path)
    version = (info.st_ino, info.st_size, info.st_mtime_ns)
    cached = _progress_cache.get(path)
    if cached is not None and cached[0] == version:
        return cached[1]
    try:
        key = _progress_key(path, load_checkpoint(path))
    except CheckpointError as exc:
        logger.warning("skipping unusable checkpoint: %s", exc)
        key = None
    _progress_cache[path] = (version, key)
    return key


def by_progress(output: str) -> list[tuple[str, tuple | None]]:
    """(path, progress key or None if unusable) of every checkpoint in ``output``, least progress first;
    unusable files (a truncated copy, a foreign file) come first, so they are pruned first."""
    keyed = [(path, _cached_progress(path)) for path in list_checkpoints(output)]
    unusable = [(path, None) for path, key in keyed if key is None]
    usable = sorted(((path, key) for path, key in keyed if key is not None), key=lambda item: item[1])
    return unusable + usable


def newest_loadable(output: str) -> tuple[str | None, dict | None]:
    """The checkpoint furthest into training that loads and validates; unreadable ones (a write cut
    by kill -9 on a file system without atomic rename, a truncated copy) are skipped with a warning."""
    for path, key in reversed(by_progress(output)):
        if key is None:
            break  # the unusable ones come first: nothing loadable is left
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:  # changed since it was read
            logger.warning("skipping unusable checkpoint: %s", exc)
    return None, None


def clean_partial_writes(output: str) -> list[str]:
    """Remove temporary files that an interrupted :func:`atomic_save` left (``<name>.tmp.<pid>``)."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(output), "*.tmp.*")):
        if _TMP_NAME.search(os.path.basename(path)) and os.path.isfile(path):
            os.remove(path)
            removed.append(path)
    if removed:
        logger.warning("removed %d leftover(s) of an interrupted checkpoint write: %s", len(removed),
                       ", ".join(os.path.basename(p) for p in removed))
    return removed


def previous_run_files(output: str) -> list[str]:
    """Checkpoints and model.pt already in ``output`` (what a fresh run would clobber)."""
    files = list_checkpoints(output)
    model = os.path.join(output, "model.pt")
    return files + ([model] if os.path.isfile(model) else [])


def prune_checkpoints(output: str, keep: int, protect: str | None = None) -> None:
    """Delete all but the ``keep`` checkpoints furthest into training (keep <= 0 keeps everything);
    never ``protect`` (the checkpoint just written)."""
    if keep <= 0:
        return
    ordered = [path for path, _ in by_progress(output)]
    if protect is not None:  # the one just written is the newest of this run, whatever its number
        ordered = [p for p in ordered if os.path.abspath(p) != os.path.abspath(protect)] + [protect]
    for path in ordered[:-keep]:
        os.remove(path)


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """Load and validate one of our training checkpoints."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({describe_load_failure(exc)})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an ArcScale training checkpoint (expected format '{CHECKPOINT_FORMAT}')")
    if state.get("version") not in SUPPORTED_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')} is not supported "
                              f"(expected one of {list(SUPPORTED_VERSIONS)})")
    missing = sorted(REQUIRED_KEYS - set(state))
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    if "progress" not in state:  # version 1: derive progress from the sampler and the loop epoch
        sampler = state["sampler"]
        same_epoch = int(sampler.get("epoch", -1)) == int(state["epoch"])
        state["progress"] = {"epoch": int(state["epoch"]), "step": int(state["step"]),
                             "samples_in_epoch": int(sampler.get("consumed", 0)) if same_epoch else 0,
                             "global_batch": int(state["config"].get("batch_size", 0)) * int(state["world_size"])
                             * int(state["config"].get("gradient_acc", 1))}
    return state


def capture_rng_state(device: dict | None = None) -> dict:
    """torch, numpy and Python RNG states as weights_only-safe values, and ``device``: the accelerator's
    generators as the device layer reports them (``utils.devices.device.device_rng_state``; None on CPU)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "device": device,
    }


def restore_rng_state(state: dict) -> dict | None:
    """Restore torch, numpy and python RNG states saved with the checkpoint; returns the device generators'
    entry (None when the checkpoint has none: written on CPU, or before it was saved) for the device layer."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["state"]), py_state["gauss"]))
    return state.get("device")
