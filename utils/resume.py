"""Training checkpoints: atomic writes, keep-last-N, newest-first discovery, RNG state.

A checkpoint is one ``torch.save`` file holding only tensors, numbers, strings, lists and dicts,
so it loads with ``torch.load(weights_only=True)`` (no pickle code execution) and a
half-written file never replaces a good one (temp file + fsync + rename).
"""
from __future__ import annotations

import glob
import os
import random
import re
from typing import Any

import numpy as np
import torch

CHECKPOINT_FORMAT = "arcscale-checkpoint"
CHECKPOINT_VERSION = 1
_NAME = re.compile(r"checkpoint_step(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or not ours; one line naming the file."""


def atomic_save(obj: Any, path: str) -> None:
    """Write ``obj`` next to ``path`` under a temporary name, fsync it, then rename over ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp_path = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp_path, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def checkpoint_path(output: str, step: int) -> str:
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
    paths = list_checkpoints(output)
    return paths[-1] if paths else None


def prune_checkpoints(output: str, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (keep <= 0 keeps everything)."""
    if keep <= 0:
        return
    for path in list_checkpoints(output)[:-keep]:
        os.remove(path)


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """Load and validate one of our training checkpoints."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an ArcScale training checkpoint (expected format '{CHECKPOINT_FORMAT}')")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')} is not supported (expected {CHECKPOINT_VERSION})")
    return state


def capture_rng_state() -> dict:
    """torch, numpy and Python RNG states as weights_only-safe values."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["state"]), py_state["gauss"]))
