"""The one place that knows device kinds: CPU, CUDA (NCCL) and Ascend NPU (HCCL via torch_npu).

Everything else asks this module for the device, the process-group backend, autocast and the
grad scaler, so that no other file calls ``.cuda()`` or imports ``torch_npu``.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import resource
from dataclasses import dataclass
from typing import ContextManager

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}


class DeviceError(RuntimeError):
    """A requested device or launch setting that this machine cannot provide."""


@dataclass
class DeviceContext:
    """Where this process runs and how it talks to the others."""

    kind: str            # "cpu" | "cuda" | "npu"
    device: torch.device
    rank: int
    local_rank: int
    world_size: int
    backend: str

    @property
    def distributed(self) -> bool:
        """True with more than one rank."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that logs and writes files."""
        return self.rank == 0


def _npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except ImportError:
        return False
    return bool(torch.npu.is_available())


def resolve_kind(requested: str) -> str:
    """``auto`` picks cuda, then npu, then cpu; an explicit kind must exist on this machine."""
    requested = (requested or "auto").lower()
    if requested not in ("auto", "cuda", "npu", "cpu"):
        raise DeviceError(f"config key 'device': expected auto, cuda, npu or cpu, got {requested!r}")
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "npu" if _npu_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device='cuda' requested but torch.cuda.is_available() is False (CPU build or no GPU)")
    if requested == "npu" and not _npu_available():
        raise DeviceError("device='npu' requested but torch_npu is not installed or no NPU is visible")
    return requested


def launch_env(legacy_local_rank: int | None = None) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment (or torch.distributed.launch's)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None:
        local_rank = legacy_local_rank if legacy_local_rank is not None else 0
    return rank, int(local_rank), world_size


def setup(requested: str = "auto", legacy_local_rank: int | None = None, timeout_s: float = 1800.0) -> DeviceContext:
    """Pick the device, set it for this process and join the process group when launched with several ranks.

    ``timeout_s`` bounds forming the group and every collective (torch's default is 30 minutes; the
    trainer passes its ``collective_timeout_s`` plus a grace, see utils/run/watchdog.py)."""
    kind = resolve_kind(requested)
    rank, local_rank, world_size = launch_env(legacy_local_rank)
    if kind == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DeviceError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    elif kind == "npu":
        torch.npu.set_device(local_rank)
        device = torch.device("npu", local_rank)
    else:
        device = torch.device("cpu")
    backend = BACKENDS[kind]
    if world_size > 1 and not dist.is_initialized():
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise DeviceError(f"WORLD_SIZE={world_size} but {key} is not set; launch with torchrun")
        try:
            _join_process_group(backend, rank, world_size, datetime.timedelta(seconds=timeout_s))
        except RuntimeError as exc:  # torch's DistStoreError / DistNetworkError are RuntimeErrors
            if collective_failure(exc) != "timeout":
                raise
            raise DeviceError(f"rank {rank}: the {world_size} ranks did not all join the process group at "
                              f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout_s:g} s "
                              f"(are all ranks/nodes started? config key 'collective_timeout_s' sets the "
                              f"wait): {str(exc).strip().splitlines()[0]}") from None
    return DeviceContext(kind, device, rank, local_rank, world_size, backend)


def _join_process_group(backend: str, rank: int, world_size: int, timeout: datetime.timedelta) -> None:
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and restart != "0":
        # torchrun keeps its store across restarts: a fresh key prefix per attempt keeps the restarted
        # ranks from reading the dead ranks' gloo/NCCL addresses.
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                              is_master=False, timeout=timeout)
        dist.init_process_group(backend=backend, store=dist.PrefixStore(f"arcscale/attempt_{restart}", store),
                                rank=rank, world_size=world_size, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=timeout)


def store_client(timeout_s: float) -> "dist.TCPStore":
    """A new client of the rendezvous TCP store this process group formed through (torchrun's agent
    hosts it, or rank 0 under a plain env:// launch), for side channels such as heartbeats."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def store_host_rank() -> int | None:
    """The rank whose process hosts the rendezvous store (None: torchrun's agent hosts it)."""
    return None if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else 0


# What torch's backends raise when a collective waits too long or its peer is gone (gloo's, NCCL's and
# HCCL's messages; DistBackendError where torch has it).
_TIMEOUT_TEXT = re.compile(r"Timed out waiting|Watchdog caught collective operation timeout|timed out after|"
                           r"HCCL.*time ?out|Socket Timeout", re.IGNORECASE)
_PEER_GONE_TEXT = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|"
                             r"NCCL communicator was aborted|remote process exited", re.IGNORECASE)


def collective_failure(exc: BaseException) -> str | None:
    """``"timeout"``, ``"peer"`` (another rank went away) or None for an exception from a collective."""
    if not isinstance(exc, RuntimeError):
        return None
    text = str(exc)
    if _TIMEOUT_TEXT.search(text):
        return "timeout"
    return "peer" if _PEER_GONE_TEXT.search(text) else None


def teardown(together: bool = False) -> None:
    """Leave the process group, if this process joined one.

    ``together``: first wait for every rank (after a normal end). A rank that tears gloo down while a
    peer is still finishing (rank 0 writing the summary) can abort in gloo's threads at exit.
    """
    if dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def autocast(ctx: DeviceContext, fp16: bool, bf16: bool) -> ContextManager:
    """Autocast for the trunk; the head computes in fp32 whatever this says."""
    if fp16 and bf16:
        raise DeviceError("config keys 'fp16' and 'bf16' are both True; choose one")
    if not (fp16 or bf16):
        return contextlib.nullcontext()
    return torch.autocast(device_type=ctx.kind, dtype=torch.float16 if fp16 else torch.bfloat16)


def cpu_has_native_bf16() -> bool:
    """True when the CPU has AVX512-BF16 or AMX (bf16 matmuls run in hardware, not emulated)."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(ctx: DeviceContext, fp16: bool, bf16: bool) -> tuple[bool, bool]:
    """(fp16, bf16) to use on this device: on CPU fp16 autocast is emulated (several times slower
    than fp32, with a loss scaler that mostly backs off), so it falls back, with one warning, to bf16
    where the CPU computes bf16 natively and to fp32 otherwise."""
    if fp16 and bf16:
        raise DeviceError("config keys 'fp16' and 'bf16' are both True; choose one")
    if ctx.kind != "cpu" or not fp16:
        return fp16, bf16
    if cpu_has_native_bf16():
        logger.warning("fp16=True on CPU: using bf16 autocast instead (this CPU computes bf16 natively; "
                       "CPU fp16 is emulated)")
        return False, True
    logger.warning("fp16=True on CPU: training in fp32 instead (CPU fp16 is emulated and several times slower)")
    return False, False


def grad_scaler(ctx: DeviceContext, fp16: bool) -> torch.amp.GradScaler:
    """Loss scaling is needed for fp16 only; bf16 has fp32's exponent range."""
    return torch.amp.GradScaler(ctx.kind, enabled=fp16)


def pin_memory(ctx: DeviceContext) -> bool:
    """Pinned host memory only helps copies to an accelerator."""
    return ctx.kind in ("cuda", "npu")


def _accelerator(ctx: DeviceContext):
    """``torch.cuda`` or ``torch.npu`` (same API for what this module calls) for ``ctx``; None on CPU."""
    if ctx.kind == "cuda":
        return torch.cuda
    return torch.npu if ctx.kind == "npu" else None  # torch.npu exists once torch_npu is imported


def synchronize(ctx: DeviceContext) -> None:
    """Wait for the accelerator's queued work (timing); a no-op on CPU."""
    if _accelerator(ctx) is not None:
        _accelerator(ctx).synchronize(ctx.device)


def bf16_supported(ctx: DeviceContext) -> bool:
    """True where bf16 matmuls run natively (on CPU without AVX512-BF16/AMX they are emulated, slower than fp32)."""
    if ctx.kind == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return ctx.kind == "npu" or cpu_has_native_bf16()


def reset_peak_memory(ctx: DeviceContext) -> None:
    """Start a new peak for :func:`memory_gib` on an accelerator (the CPU's peak RSS cannot be reset)."""
    if _accelerator(ctx) is not None:
        _accelerator(ctx).reset_peak_memory_stats(ctx.device)


def memory_gib(ctx: DeviceContext) -> float:
    """Peak accelerator memory (allocator) or, on CPU, this process's peak RSS, in GiB."""
    if _accelerator(ctx) is not None:
        return _accelerator(ctx).max_memory_allocated(ctx.device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


# ---------------------------------------------------------------- out of memory

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
    accelerator = _accelerator(ctx)
    if accelerator is not None:
        return int(accelerator.get_device_properties(ctx.device).total_memory)
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_memory_limit()
    return min(physical, limit) if limit else physical


def peak_memory_report(ctx: DeviceContext) -> str:
    """The peak memory so far against what the device holds, e.g. ``peak 9.81 GiB allocated (10.20 GiB
    reserved) of 79.15 GiB on cuda:0: 68.95 GiB headroom`` (CPU: this process's peak RSS of the RAM)."""
    total = memory_capacity(ctx)
    accelerator = _accelerator(ctx)
    if accelerator is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return (f"peak {format_bytes(peak)} resident (this process) of {format_bytes(total)} RAM: "
                f"{format_bytes(max(total - peak, 0))} headroom")
    allocated = accelerator.max_memory_allocated(ctx.device)
    reserved = accelerator.max_memory_reserved(ctx.device)
    return (f"peak {format_bytes(allocated)} allocated ({format_bytes(reserved)} reserved by the caching "
            f"allocator) of {format_bytes(total)} on {ctx.device}: {format_bytes(max(total - reserved, 0))} headroom")


def sum_allreduce_hook(fp16_compress: bool):
    """DDP communication hook that SUMS gradients (the Partial FC head returns true gradients of the
    global-mean loss, so averaging over ranks would divide them by the world size)."""

    def hook(state, bucket):  # no annotations: DDP inspects them and `from __future__` makes them strings
        buffer = bucket.buffer()
        if not fp16_compress:
            future = dist.all_reduce(buffer, async_op=True).get_future()
            return future.then(lambda fut: fut.value()[0])
        compressed = buffer.to(torch.float16)
        future = dist.all_reduce(compressed, async_op=True).get_future()

        def decompress(fut):
            buffer.copy_(fut.value()[0])
            return buffer

        return future.then(decompress)

    return hook
