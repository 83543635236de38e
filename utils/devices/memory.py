"""Memory: what an out-of-memory error reports (CUDA, NPU, ACL, the CPU allocator: which memory, how many
bytes were asked for), how much the device holds, and the peak so far against it."""
from __future__ import annotations

import os
import re
import resource
from dataclasses import dataclass

import torch

from utils.devices.device import DeviceContext, accelerator_of

# CUDA: torch.OutOfMemoryError "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity
# of ..."; torch_npu's caching allocator: "NPU out of memory. Tried to allocate 2.00 GiB (NPU 0; 28.50 GiB
# total capacity; ...)", ACL's own "EL0004: Failed to allocate memory"; c10's CPU allocator:
# "DefaultCPUAllocator: can't allocate memory: you tried to allocate 722534400 bytes. Error code 12".
_OOM_TEXT = re.compile(r"(CUDA|NPU|XPU) out of memory|DefaultCPUAllocator: (can't allocate memory|not enough memory)|"
                       r"EL0004: Failed to allocate memory")
_ASKED_SIZE = re.compile(r"Tried to allocate ([0-9.]+) ?(bytes|B|KiB|MiB|GiB|TiB)")
_ASKED_BYTES = re.compile(r"you tried to allocate ([0-9]+) bytes")
_UNITS = {"bytes": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


@dataclass(frozen=True)
class OutOfMemory:
    """An allocation that failed: on which memory, and how many bytes were asked for (None: not said)."""

    memory: str                 # "CUDA", "NPU", "CPU" (host memory), "accelerator" (an OutOfMemoryError that says no more)
    requested_bytes: int | None


def out_of_memory(exc: BaseException) -> OutOfMemory | None:
    """The allocation failure ``exc`` reports (also when a DataLoader worker's re-raised text carries it), or None."""
    if isinstance(exc, MemoryError):
        return OutOfMemory("CPU", None)
    if not isinstance(exc, RuntimeError):  # torch.OutOfMemoryError is a RuntimeError
        return None
    text = str(exc)
    match = _OOM_TEXT.search(text)
    if match is None and not isinstance(exc, torch.OutOfMemoryError):
        return None
    memory = "accelerator" if match is None else \
        match.group(1) or ("NPU" if match.group(0).startswith("EL0004") else "CPU")
    size = _ASKED_SIZE.search(text)
    if size is not None:
        return OutOfMemory(memory, int(float(size.group(1)) * _UNITS[size.group(2)]))
    size = _ASKED_BYTES.search(text)
    return OutOfMemory(memory, int(size.group(1)) if size else None)


def format_bytes(count: float) -> str:
    """``722534400`` -> ``"689.1 MiB"``; GiB from 1 GiB up."""
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def _cgroup_memory_limit() -> int | None:
    # A container's or a batch job's memory limit (cgroup v2, then v1); "max" or a huge v1 value = none.
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as handle:
                value = handle.read().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < 2**60:
            return int(value)
    return None


def memory_capacity(ctx: DeviceContext) -> int:
    """Bytes the training memory can hold: the accelerator's total, or on CPU the machine's RAM (or the
    cgroup limit of this container/job when lower)."""
    accelerator = accelerator_of(ctx)
    if accelerator is not None:
        return int(accelerator.get_device_properties(ctx.device).total_memory)
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_memory_limit()
    return min(physical, limit) if limit else physical


def peak_memory_report(ctx: DeviceContext) -> str:
    """The peak memory so far against what the device holds, e.g. ``peak 9.81 GiB allocated (10.20 GiB
    reserved) of 79.15 GiB on cuda:0: 68.95 GiB headroom`` (CPU: this process's peak RSS of the RAM)."""
    total = memory_capacity(ctx)
    accelerator = accelerator_of(ctx)
    if accelerator is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return (f"peak {format_bytes(peak)} resident (this process) of {format_bytes(total)} RAM: "
                f"{format_bytes(max(total - peak, 0))} headroom")
    allocated = accelerator.max_memory_allocated(ctx.device)
    reserved = accelerator.max_memory_reserved(ctx.device)
    return (f"peak {format_bytes(allocated)} allocated ({format_bytes(reserved)} reserved by the caching "
            f"allocator) of {format_bytes(total)} on {ctx.device}: {format_bytes(max(total - reserved, 0))} headroom")
