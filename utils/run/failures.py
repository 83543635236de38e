"""Failures that come from inside torch, said in one line a user can act on: out of memory (where, how
much was asked for, what to lower) and a collective that timed out or lost another rank.

``failure_line`` returns None for anything else; the trainer then decides (our own errors are one line
already, anything unknown keeps its traceback).
"""
from __future__ import annotations

import os
from typing import Any

from utils.devices import device as devices

from utils.devices import memory
from utils.run.watchdog import StepWatch, describe_missing, process_group_timeout_s

_MEMORY_WORDS = {"CPU": "host memory (RAM)", "CUDA": "GPU memory", "NPU": "NPU memory",
                 "accelerator": "accelerator memory"}


def _during_verification(exc: BaseException) -> bool:
    # The verification callback and the embedding live in eval/; the training step never enters it.
    eval_dir = os.sep + "eval" + os.sep
    traceback = exc.__traceback__
    while traceback is not None:
        if eval_dir in traceback.tb_frame.f_code.co_filename:
            return True
        traceback = traceback.tb_next
    return False


def memory_advice(oom: memory.OutOfMemory, cfg: Any, where: str, verification: bool = False) -> str:
    """``out of GPU memory at step 1: tried to allocate 2.00 GiB; lower batch_size ...``: the keys that
    shrink what ran out, with their current values."""
    asked = f"tried to allocate {memory.format_bytes(oom.requested_bytes)}" if oom.requested_bytes else \
        "an allocation failed"
    if verification:
        where = "the verification before the first step" if where.startswith("setting up") else f"{where}'s verification"
        lower = [f"val_batch_size (now {cfg.val_batch_size})"]
    else:
        lower = [f"batch_size (now {cfg.batch_size}; raise gradient_acc, now {cfg.gradient_acc}, to keep the "
                 f"global batch)"]
        if "loading" in where:
            lower.append(f"num_workers (now {cfg.num_workers}; each worker holds batches in flight)")
        elif cfg.loss != "triplet" and cfg.head != "softmax":  # Partial FC: the class centres and their rows
            lower.append(f"sample_rate (now {cfg.sample_rate:g})")
            lower.append(f"the head's storage: pfc_weight_dtype (now {cfg.pfc_weight_dtype}) and pfc_state_dtype "
                         f"(now {cfg.pfc_state_dtype}) = bfloat16 or, for the state, int8")
    advice = lower[0] if len(lower) == 1 else ", ".join(lower[:-1]) + ", or " + lower[-1]
    return f"out of {_MEMORY_WORDS[oom.memory]} at {where}: {asked}; lower {advice}"


def failure_line(exc: BaseException, cfg: Any, watch: StepWatch) -> str | None:
    """The one line for an out-of-memory or collective failure ``exc``; None for anything else."""
    oom = memory.out_of_memory(exc)
    if oom is not None:
        return memory_advice(oom, cfg, watch.where(), _during_verification(exc))
    kind = devices.collective_failure(exc)
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if kind == "timeout":
        who = (f"{describe_missing(watch.missing)} did not arrive" if watch.missing else
               "every rank had arrived, so one of them spent that long inside it (a checkpoint write, a verification)")
        return (f"{watch.where()}: a collective operation timed out after "
                f"{process_group_timeout_s(cfg.collective_timeout_s):g} s (collective_timeout_s + a grace): {who}; "
                f"stopped without writing anything: continue with resume=True")
    if kind == "peer":
        return (f"{watch.where()}: lost the connection to another rank ({first_line}): it stopped or was "
                f"killed, and its own error line says why")
    return None
