"""The one place that knows device kinds: CPU, CUDA (NCCL) and Ascend NPU (HCCL via torch_npu).

Everything else asks this module for the device, the process-group backend, autocast and the
grad scaler, so that no other file calls ``.cuda()`` or imports ``torch_npu`` (whose specifics live
in ``ascend.py``; torch-version fallbacks in ``compat.py``).
"""
from __future__ import annotations

import contextlib
import datetime
import inspect
import logging
import os
import resource
import warnings
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
import torch.distributed as dist

from utils.devices import ascend, compat

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
    chosen: str = ""     # the start-up line: device, backend, world size and why (see log_choice)
    warnings: tuple[str, ...] = ()  # what the start-up log must not leave out (a GPU/NPU library that failed)

    @property
    def distributed(self) -> bool:
        """True with more than one rank."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that logs and writes files."""
        return self.rank == 0


def _cuda_status() -> tuple[bool, str, bool]:
    """(usable, why not, whether CUDA itself failed): torch's CUDA-initialisation warning is the reason
    when it gave one (a driver too old, a broken install), else simply no GPU visible."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if available:
        return True, "", False
    if torch.version.cuda is None:
        return False, "", False  # a CPU build of torch: nothing to explain
    reasons = [str(warning.message).strip().splitlines()[0] for warning in caught if str(warning.message).strip()]
    if reasons:
        return False, f"torch {torch.__version__} is a CUDA build but CUDA failed: {'; '.join(reasons)}", True
    return False, "no CUDA GPU visible (CUDA_VISIBLE_DEVICES, nvidia-smi)", False


def _choose(requested: str) -> tuple[str, list[str], list[str]]:
    """(kind, notes for the start-up line, warnings). ``auto`` takes cuda, then npu, then cpu, and says
    why it passed over a GPU/NPU library that is installed; an explicit kind must exist here."""
    requested = (requested or "auto").lower()
    if requested not in ("auto", "cuda", "npu", "cpu"):
        raise DeviceError(f"config key 'device': expected auto, cuda, npu or cpu, got {requested!r}")
    if requested == "cpu":
        return "cpu", [], []
    cuda_why, cuda_failed = "", False
    if requested in ("auto", "cuda"):
        cuda, cuda_why, cuda_failed = _cuda_status()
        if cuda:
            return "cuda", [], []
        if requested == "cuda":
            raise DeviceError(f"device='cuda' requested but torch.cuda.is_available() is False "
                              f"({cuda_why or 'a CPU build of torch'})")
    torch_npu, npu_why = ascend.npu_status()  # npu_why is "" only when torch_npu is not installed
    notes = [f"cuda: {cuda_why}"] if cuda_why else []
    if torch_npu is not None:
        return "npu", notes, []
    if requested == "npu":
        raise DeviceError("device='npu' requested but "
                          + (npu_why or "torch_npu is not installed (install the torch-npu matching torch and CANN)"))
    failed = ([cuda_why] if cuda_failed else []) + ([npu_why] if npu_why else [])
    return "cpu", notes + ([f"npu: {npu_why}"] if npu_why else []), [f"device=auto trains on CPU: {why}" for why in failed]


def resolve_kind(requested: str) -> str:
    """``auto`` picks cuda, then npu, then cpu; an explicit kind must exist on this machine."""
    return _choose(requested)[0]


def launch_env(legacy_local_rank: int | None = None) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment (or torch.distributed.launch's)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None:
        local_rank = legacy_local_rank if legacy_local_rank is not None else 0
    return rank, int(local_rank), world_size


# Variables that choose the network interface each backend's sockets use (several nodes); logged when set.
SOCKET_SETTINGS = {"gloo": ("GLOO_SOCKET_IFNAME",), "nccl": ("NCCL_SOCKET_IFNAME",),
                   "hccl": ("HCCL_IF_IP", "HCCL_SOCKET_IFNAME")}


def setup(requested: str = "auto", legacy_local_rank: int | None = None, timeout_minutes: float = 30.0) -> DeviceContext:
    """Pick the device, set it for this process and join the process group when launched with several
    ranks. ``ctx.chosen`` is the start-up line (device, backend, world size, why); see :func:`log_choice`."""
    compat.own_session_under_torchrun()  # first: a Ctrl-C must reach this rank once, through torchrun
    kind, notes, loud = _choose(requested)
    rank, local_rank, world_size = launch_env(legacy_local_rank)
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE") or (1 if world_size == 1 else world_size))
    if kind == "npu":
        ascend.check_rank_size(world_size, local_world_size)
        warning = ascend.interface_warning(world_size, local_world_size)
        loud += [warning] if warning else []
    device, name = _set_device(kind, local_rank, local_world_size)
    backend = BACKENDS[kind]
    network = [f"{key}={os.environ[key]}" for key in SOCKET_SETTINGS[backend] if os.environ.get(key)]
    if world_size > 1 and not dist.is_initialized():
        _join_process_group(backend, device, rank, world_size, timeout_minutes, network)
    chosen = (f"device {device}{f' ({name})' if name else ''}, backend {backend}, world size {world_size}"
              + (f" ({local_world_size} per node)" if world_size > 1 else "")
              + "".join(f", {setting}" for setting in network)
              + ("; chosen by device=auto" + (f" ({'; '.join(notes)})" if notes else "")
                 if (requested or "auto").lower() == "auto" else ""))
    return DeviceContext(kind, device, rank, local_rank, world_size, backend, chosen, tuple(loud))


def _set_device(kind: str, local_rank: int, local_world_size: int) -> tuple[torch.device, str]:
    """This process's device (after checking it exists) and its name ("" on CPU)."""
    if kind == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise DeviceError(f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible"
                              + _visible("CUDA_VISIBLE_DEVICES"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), torch.cuda.get_device_name(local_rank)
    if kind == "npu":
        torch_npu = ascend.import_torch_npu()[0]
        index = ascend.device_index(local_rank, local_world_size)
        count = torch_npu.npu.device_count()
        if index >= count:
            source = f"LOCAL_RANK={local_rank}" if index == local_rank else f"ASCEND_DEVICE_ID={index}"
            raise DeviceError(f"{source} but only {count} NPU(s) are visible" + _visible("ASCEND_RT_VISIBLE_DEVICES"))
        torch_npu.npu.set_device(index)
        return torch.device("npu", index), ascend.device_name(torch_npu, index)
    return torch.device("cpu"), ""


def _visible(variable: str) -> str:
    return f" ({variable}={os.environ[variable]!r})" if variable in os.environ else ""


def _join_process_group(backend: str, device: torch.device, rank: int, world_size: int, timeout_minutes: float,
                        network: list[str]) -> None:
    """init_process_group from torchrun's environment; a failure is one line naming the rendezvous."""
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise DeviceError(f"WORLD_SIZE={world_size} but {key} is not set; launch with torchrun")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    options = dict(backend=backend, rank=rank, world_size=world_size, timeout=timeout,
                   **compat.process_group_device_id(device))
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    try:
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and restart != "0":
            # torchrun keeps its store across restarts: a fresh key prefix per attempt keeps the restarted
            # ranks from reading the dead ranks' gloo/NCCL addresses.
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                  is_master=False, timeout=timeout)
            dist.init_process_group(store=dist.PrefixStore(f"arcscale/attempt_{restart}", store), **options)
        else:
            dist.init_process_group(init_method="env://", **options)
    except Exception as exc:  # torch's messages run over many lines; the user needs which rendezvous failed
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise DeviceError(f"rank {rank} of {world_size} could not join the {backend} process group at "
                          f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
                          + "".join(f", {setting}" for setting in network)
                          + f": {type(exc).__name__}: {lines[0] if lines else ''}") from exc


def log_choice(ctx: DeviceContext) -> None:
    """Log the start-up line (rank 0) and every rank's warnings, once logging is set up."""
    if ctx.chosen:
        logger.info("%s", ctx.chosen)
    for warning in ctx.warnings:
        logger.warning("%s", warning)


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
    """(fp16, bf16) to use on this device. bf16 on a GPU/NPU without it (pre-Ampere GPUs, Ascend 910A) is
    refused with one line. On CPU fp16 autocast is emulated (several times slower than fp32, with a loss
    scaler that mostly backs off), so it falls back, with one warning, to bf16 where the CPU computes bf16
    natively and to fp32 otherwise."""
    if fp16 and bf16:
        raise DeviceError("config keys 'fp16' and 'bf16' are both True; choose one")
    if bf16 and ctx.kind != "cpu" and not bf16_supported(ctx):
        how = ("torch.cuda.is_bf16_supported() is False: bf16 needs compute capability 8.0 (Ampere) or newer"
               if ctx.kind == "cuda" else "torch_npu reports no bf16: Atlas training series (910A) lacks it, "
                                          "Atlas A2/A3 (910B, 910_93) have it")
        raise DeviceError(f"config key 'bf16' is True but {ctx.device} has no bf16 ({how}); use fp16=True")
    if ctx.kind == "npu" and fp16 and ascend.saturation_mode(ascend.import_torch_npu()[0]):
        logger.info("fp16 on an NPU in saturation mode (fp16 overflow clamps to +-65504, no inf/nan): torch_npu's "
                    "GradScaler reads the float-status flags and the step is skipped on an overflow")
    if ctx.kind != "cpu" or not fp16:
        return fp16, bf16
    if cpu_has_native_bf16():
        logger.warning("fp16=True on CPU: using bf16 autocast instead (this CPU computes bf16 natively; "
                       "CPU fp16 is emulated)")
        return False, True
    logger.warning("fp16=True on CPU: training in fp32 instead (CPU fp16 is emulated and several times slower)")
    return False, False


def grad_scaler(ctx: DeviceContext, fp16: bool) -> Any:
    """Loss scaling is needed for fp16 only; bf16 has fp32's exponent range. On an NPU, torch_npu's own
    GradScaler (it detects saturated overflow, which torch.amp.GradScaler cannot)."""
    if ctx.kind == "npu" and fp16:
        return ascend.grad_scaler(ascend.import_torch_npu()[0])
    return compat.grad_scaler(ctx.kind, enabled=fp16)


def scaler_found_overflow(scaler: Any, optimizer: torch.optim.Optimizer) -> bool:
    """After ``scaler.unscale_(optimizer)``: an overflow that finite checks cannot see (an NPU in
    saturation mode, all ranks' verdict). False for every other device and scaler (no host sync)."""
    return ascend.scaler_found_overflow(scaler, optimizer)


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
    """True where bf16 runs natively: CUDA compute capability 8.0+ (not counting emulation), NPUs that
    torch_npu says have it (910B/910_93, not 910A), CPUs with AVX512-BF16/AMX."""
    if ctx.kind == "cuda":
        check = torch.cuda.is_bf16_supported
        native = {"including_emulation": False} if "including_emulation" in inspect.signature(check).parameters else {}
        return bool(check(**native))
    if ctx.kind == "npu":
        return ascend.bf16_supported(ascend.import_torch_npu()[0], ctx.device.index or 0)
    return cpu_has_native_bf16()


def reset_peak_memory(ctx: DeviceContext) -> None:
    """Start a new peak for :func:`memory_gib` on an accelerator (the CPU's peak RSS cannot be reset)."""
    if _accelerator(ctx) is not None:
        _accelerator(ctx).reset_peak_memory_stats(ctx.device)


def memory_gib(ctx: DeviceContext) -> float:
    """Peak accelerator memory (allocator) or, on CPU, this process's peak RSS, in GiB."""
    if _accelerator(ctx) is not None:
        return _accelerator(ctx).max_memory_allocated(ctx.device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


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
