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
import re
import resource
import warnings
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
import torch.distributed as dist

from utils.devices import ascend, compat, elastic

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
    node: int = 0        # torchrun's node rank (GROUP_RANK), for messages naming where something failed
    restarts: int = 0    # elastic restarts of this job so far, the same on every rank (0: first attempt)
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


def node_rank(rank: int) -> int:
    """This process's node: torchrun's GROUP_RANK, else rank // LOCAL_WORLD_SIZE (0 when neither is set)."""
    if os.environ.get("GROUP_RANK", "").isdigit():
        return int(os.environ["GROUP_RANK"])
    local_world = os.environ.get("LOCAL_WORLD_SIZE", "")
    return rank // int(local_world) if local_world.isdigit() and int(local_world) > 0 else 0


# Variables that choose the network interface each backend's sockets use (several nodes); logged when set.
SOCKET_SETTINGS = {"gloo": ("GLOO_SOCKET_IFNAME",), "nccl": ("NCCL_SOCKET_IFNAME",),
                   "hccl": ("HCCL_IF_IP", "HCCL_SOCKET_IFNAME")}


def setup(requested: str = "auto", legacy_local_rank: int | None = None, timeout_s: float = 1800.0) -> DeviceContext:
    """Pick the device, set it for this process and join the process group when launched with several
    ranks. ``ctx.chosen`` is the start-up line (device, backend, world size, why); see :func:`log_choice`.
    ``timeout_s`` bounds forming the group and every collective (the trainer passes its
    ``collective_timeout_s`` plus a grace, see utils/run/watchdog.py)."""
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
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)  # this node's count only
    if world_size > 1 and not dist.is_initialized():
        restarts = _join_process_group(backend, device, rank, world_size, timeout_s, network, restarts)
    if world_size > 1 and "TORCHELASTIC_RESTART_COUNT" in os.environ:  # per-node counts: restarted if any node says so
        agreed = torch.tensor([restarts], dtype=torch.int64, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        restarts = int(agreed.item())
    chosen = (f"device {device}{f' ({name})' if name else ''}, backend {backend}, world size {world_size}"
              + (f" ({local_world_size} per node)" if world_size > 1 else "")
              + "".join(f", {setting}" for setting in network)
              + ("; chosen by device=auto" + (f" ({'; '.join(notes)})" if notes else "")
                 if (requested or "auto").lower() == "auto" else ""))
    return DeviceContext(kind, device, rank, local_rank, world_size, backend, node_rank(rank), restarts, chosen,
                         tuple(loud))


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


def _join_process_group(backend: str, device: torch.device, rank: int, world_size: int, timeout_s: float,
                        network: list[str], restarts: int) -> int:
    """init_process_group from torchrun's environment; returns the restart count (see :func:`setup`). A
    failure is one line naming the rendezvous (a timeout: which wait, and the key that sets it)."""
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise DeviceError(f"WORLD_SIZE={world_size} but {key} is not set; launch with torchrun")
    timeout = datetime.timedelta(seconds=timeout_s)
    options = dict(backend=backend, rank=rank, world_size=world_size, timeout=timeout,
                   **compat.process_group_device_id(device))
    try:
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun keeps its store for the whole job: each attempt's process group needs keys of its own
            # (or the restarted ranks read the dead ranks' gloo/NCCL addresses), named by a generation that
            # rank 0 hands out, since the per-node restart counters disagree between nodes.
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                  is_master=False, timeout=timeout)
            generation = elastic.agree_on_generation(store, rank, world_size, timeout)
            # rank 0's count of this job's process groups; the node's own count too, for a store that torchrun
            # re-created (c10d rendezvous whose rank-0 node changed)
            restarts = max(restarts, generation - 1)
            dist.init_process_group(store=dist.PrefixStore(f"arcscale/generation_{generation}", store), **options)
        else:
            dist.init_process_group(init_method="env://", **options)
    except Exception as exc:  # torch's messages run over many lines; the user needs which rendezvous failed
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}" + "".join(f", {s}" for s in network)
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        waited = (f" (not all ranks joined within {timeout_s:g} s: are all ranks/nodes started? config key "
                  f"'collective_timeout_s' sets the wait)" if collective_failure(exc) == "timeout" else "")
        raise DeviceError(f"rank {rank} of {world_size} could not join the {backend} process group at {where}: "
                          f"{type(exc).__name__}: {lines[0] if lines else ''}{waited}") from None
    return restarts


def log_choice(ctx: DeviceContext) -> None:
    """Log the start-up line (rank 0) and every rank's warnings, once logging is set up."""
    if ctx.chosen:
        logger.info("%s", ctx.chosen)
    for warning in ctx.warnings:
        logger.warning("%s", warning)


def apply_speed_settings(ctx: DeviceContext, cudnn_benchmark: bool, allow_tf32: bool) -> None:
    """The config's speed switches for this process's device (config keys ``cudnn_benchmark`` and
    ``allow_tf32``). CUDA: ``torch.backends.cudnn.benchmark`` and ``torch.backends.cuda.matmul.allow_tf32``;
    Ascend: ``torch.npu.matmul.allow_hf32`` (torch_npu's TF32 counterpart; there is no cuDNN benchmark);
    CPU: nothing to set."""
    if ctx.kind == "cuda":
        torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
        torch.backends.cuda.matmul.allow_tf32 = bool(allow_tf32)
    elif ctx.kind == "npu":
        torch.npu.matmul.allow_hf32 = bool(allow_tf32)
    else:
        return
    logger.info("%s: cudnn_benchmark=%s, allow_tf32=%s", ctx.kind, bool(cudnn_benchmark) if ctx.kind == "cuda"
                else "n/a", bool(allow_tf32))


def store_client(timeout_s: float) -> "dist.TCPStore":
    """A new client of the rendezvous TCP store this process group formed through (torchrun's agent
    hosts it, or rank 0 under a plain env:// launch), for side channels such as heartbeats."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def attempt_store(name: str, ctx: DeviceContext, timeout_s: float) -> "dist.PrefixStore":
    """A new client of the rendezvous store under keys of this attempt alone: ``arcscale/<name>/<attempt>/``,
    the attempt being ``ctx.restarts``, which every rank agreed on at start-up. Not torchrun's
    ``TORCHELASTIC_RESTART_COUNT``: it is per node, so after one node's worker failed the nodes' counts differ,
    and keys named by it would split one attempt's ranks between two prefixes, one of them beside the dead
    attempt's keys (the watchdog would read a healthy node's heartbeats as the dead attempt's last ones)."""
    return dist.PrefixStore(f"arcscale/{name}/{ctx.restarts}/", store_client(timeout_s))


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


def loss_scale(scaler: torch.amp.GradScaler, device: torch.device) -> torch.Tensor:
    """The scaler's current scale as a float32 tensor on ``device``, not read on the host: torch's own scale
    tensor (``_get_scale_async``, what torch's fused optimizers read), else ``get_scale()`` (a host read)."""
    read_async = getattr(scaler, "_get_scale_async", None)
    scale = read_async() if read_async is not None else None
    if scale is None:
        return torch.full((), float(scaler.get_scale()), device=device)
    return scale.detach().float().to(device).reshape(())


def scaler_found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """The inf/nan count ``scaler.unscale_(optimizer)`` recorded (a device tensor; torch_npu's scaler puts its
    overflow-status flags there too), or None when the scaler is off or keeps no such record."""
    if not scaler.is_enabled():
        return None
    states = getattr(scaler, "_per_optimizer_states", {})
    found = states.get(id(optimizer), {}).get("found_inf_per_device") if isinstance(states, dict) else None
    if not found:
        return None
    return torch.stack([value.reshape(()).float().to(next(iter(found.values())).device) for value in found.values()]).sum()


def flags_tensor(values, device: torch.device) -> torch.Tensor:
    """float32 [len(values)] on ``device`` from host numbers, with no host-to-device copy: a copy of a
    host tensor waits for the device's queue (a stream sync); filling elements passes the numbers as
    kernel arguments."""
    flags = torch.zeros(len(values), dtype=torch.float32, device=device)
    for index, value in enumerate(values):
        if value:
            flags[index].fill_(float(value))
    return flags


def pin_memory(ctx: DeviceContext) -> bool:
    """Pinned host memory only helps copies to an accelerator."""
    return ctx.kind in ("cuda", "npu")


def accelerator_of(ctx: DeviceContext):
    """``torch.cuda`` or ``torch.npu`` (same API for what this module calls) for ``ctx``; None on CPU."""
    if ctx.kind == "cuda":
        return torch.cuda
    return torch.npu if ctx.kind == "npu" else None  # torch.npu exists once torch_npu is imported


def synchronize(ctx: DeviceContext) -> None:
    """Wait for the accelerator's queued work (timing); a no-op on CPU."""
    if accelerator_of(ctx) is not None:
        accelerator_of(ctx).synchronize(ctx.device)


def device_rng_state(ctx: DeviceContext) -> dict | None:
    """The accelerator's default generators, one state per device this process sees (``get_rng_state_all``
    of ``torch.cuda``, or of ``torch.npu``, which torch_npu gives the same API), as CPU byte tensors that a
    ``weights_only`` checkpoint holds; None on CPU (torch's CPU generator is saved with the other CPU states)."""
    accelerator = accelerator_of(ctx)
    if accelerator is None:
        return None
    return {"kind": ctx.kind, "states": [state.detach().cpu().clone() for state in accelerator.get_rng_state_all()]}


def restore_device_rng_state(ctx: DeviceContext, saved: dict | None) -> str:
    """Set the accelerator's generators to ``saved`` (from :func:`device_rng_state`); returns "" when they
    were set, otherwise why not (another device kind or device count): they then keep their seeding."""
    accelerator = accelerator_of(ctx)
    if accelerator is None:
        return "" if saved is None else f"the checkpoint holds {saved['kind']} generator states; this run is on cpu"
    if saved is None:
        return "the checkpoint holds no device generator state (written on cpu, or by an older version)"
    count = accelerator.device_count()
    if saved["kind"] != ctx.kind or len(saved["states"]) != count:
        return (f"the checkpoint holds {len(saved['states'])} {saved['kind']} generator state(s); this process "
                f"sees {count} {ctx.kind} device(s)")
    accelerator.set_rng_state_all(saved["states"])
    return ""


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
    if accelerator_of(ctx) is not None:
        accelerator_of(ctx).reset_peak_memory_stats(ctx.device)


def memory_gib(ctx: DeviceContext) -> float:
    """Peak accelerator memory (allocator) or, on CPU, this process's peak RSS, in GiB."""
    if accelerator_of(ctx) is not None:
        return accelerator_of(ctx).max_memory_allocated(ctx.device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux
