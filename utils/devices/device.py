"""The one place that knows device kinds: CPU, CUDA (NCCL) and Ascend NPU (HCCL via torch_npu).

Everything else asks this module for the device, the process-group backend, autocast and the
grad scaler, so that no other file calls ``.cuda()`` or imports ``torch_npu``.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import resource
from dataclasses import dataclass
from typing import ContextManager

import torch
import torch.distributed as dist

from utils.devices import elastic

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


def node_rank(rank: int) -> int:
    """This process's node: torchrun's GROUP_RANK, else rank // LOCAL_WORLD_SIZE (0 when neither is set)."""
    if os.environ.get("GROUP_RANK", "").isdigit():
        return int(os.environ["GROUP_RANK"])
    local_world = os.environ.get("LOCAL_WORLD_SIZE", "")
    return rank // int(local_world) if local_world.isdigit() and int(local_world) > 0 else 0


def setup(requested: str = "auto", legacy_local_rank: int | None = None, timeout_minutes: float = 30.0) -> DeviceContext:
    """Pick the device, set it for this process and join the process group when launched with several ranks."""
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
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)  # this node's count only
    if world_size > 1 and not dist.is_initialized():
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise DeviceError(f"WORLD_SIZE={world_size} but {key} is not set; launch with torchrun")
        timeout = datetime.timedelta(minutes=timeout_minutes)
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
            dist.init_process_group(backend=backend, store=dist.PrefixStore(f"arcscale/generation_{generation}", store),
                                    rank=rank, world_size=world_size, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                    timeout=timeout)
    if world_size > 1:  # without torchrun's store (or a counter from before it): restarted if any node says so
        agreed = torch.tensor([restarts], dtype=torch.int64, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        restarts = int(agreed.item())
    return DeviceContext(kind, device, rank, local_rank, world_size, backend, node_rank(rank), restarts)


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


def device_rng_state(ctx: DeviceContext) -> dict | None:
    """The accelerator's default generators, one state per device this process sees (``get_rng_state_all``
    of ``torch.cuda``, or of ``torch.npu``, which torch_npu gives the same API), as CPU byte tensors that a
    ``weights_only`` checkpoint holds; None on CPU (torch's CPU generator is saved with the other CPU states)."""
    accelerator = _accelerator(ctx)
    if accelerator is None:
        return None
    return {"kind": ctx.kind, "states": [state.detach().cpu().clone() for state in accelerator.get_rng_state_all()]}


def restore_device_rng_state(ctx: DeviceContext, saved: dict | None) -> str:
    """Set the accelerator's generators to ``saved`` (from :func:`device_rng_state`); returns "" when they
    were set, otherwise why not (another device kind or device count): they then keep their seeding."""
    accelerator = _accelerator(ctx)
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


# ---------------------------------------------------------------- what this machine offers (tools/benchmark.py doctor)

def _npu_module():
    """torch_npu when it is installed (importing it registers ``torch.npu`` and HCCL), else None."""
    try:
        import torch_npu
    except ImportError:
        return None
    return torch_npu


def _first_line(command: list[str]) -> str:
    """The first output line of a vendor tool (nvidia-smi), "" when it is missing or fails."""
    import subprocess

    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = result.stdout.strip().splitlines() if result.returncode == 0 else []
    return lines[0].strip() if lines else ""


def _cann_version(torch_npu, module: str) -> str:
    """CANN (or its driver's) version as torch_npu reports it (``get_cann_version``: CANN >= 8.1.RC1)."""
    for owner in ("torch_npu.npu.utils", "torch_npu.utils"):
        try:
            import importlib

            version = importlib.import_module(owner).get_cann_version(module=module)
        except Exception:  # older torch_npu or CANN: the function is missing or cannot tell
            continue
        if version:
            return str(version)
    return str(getattr(torch.version, "cann", "") or "") if module == "CANN" else ""


def local_device_count(kind: str) -> int:
    """Devices of ``kind`` this node sees (CPU: 1 process)."""
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "npu":
        return torch.npu.device_count() if _npu_available() else 0
    return 1


def software_versions() -> list[tuple[str, str]]:
    """(name, version) of Python, torch and what it was built with, the GPU driver, torch_npu and CANN."""
    import platform

    nccl = ""
    if torch.cuda.is_available() and dist.is_nccl_available():
        version = torch.cuda.nccl.version()
        nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    driver = _first_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) \
        if torch.cuda.is_available() else ""
    torch_npu = _npu_module()
    rows = [("python", f"{platform.python_version()} ({platform.machine()}, {platform.system()})"),
            ("torch", f"{torch.__version__} (git {(torch.version.git_version or '?')[:7]})"),
            ("CUDA", f"built with {torch.version.cuda}" if torch.version.cuda else "not in this torch build"),
            ("cuDNN", str(torch.backends.cudnn.version()) if torch.version.cuda and torch.backends.cudnn.is_available()
             else "-"),
            ("NCCL", nccl or "-"),
            ("GPU driver", driver or ("unknown (nvidia-smi gave nothing)" if torch.cuda.is_available() else "-"))]
    if torch_npu is None:
        rows.append(("torch_npu", "not installed"))
    else:
        rows += [("torch_npu", str(getattr(torch_npu, "__version__", "?"))),
                 ("CANN", _cann_version(torch_npu, "CANN") or "unknown (torch_npu does not say)"),
                 ("NPU driver", _cann_version(torch_npu, "DRIVER") or "unknown (torch_npu does not say)")]
    return rows


def local_devices() -> list[tuple[str, str]]:
    """(device, description) of every device this process can train on."""
    rows = [("cpu", f"{os.cpu_count()} logical cores, torch uses {torch.get_num_threads()} threads")]
    for index in range(local_device_count("cuda")):
        props = torch.cuda.get_device_properties(index)
        rows.append((f"cuda:{index}", f"{props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability "
                                      f"{props.major}.{props.minor}"))
    for index in range(local_device_count("npu")):
        try:
            props = torch.npu.get_device_properties(index)
            rows.append((f"npu:{index}", f"{props.name}, {props.total_memory / 2**30:.1f} GiB"))
        except Exception:  # an older torch_npu without device properties
            rows.append((f"npu:{index}", torch.npu.get_device_name(index)))
    return rows


def distributed_backends() -> list[tuple[str, str]]:
    """(backend, whether this machine can use it) for gloo, NCCL, HCCL, MPI and UCC; train.py uses
    BACKENDS[kind]."""
    torch_npu = _npu_module()
    is_hccl_available = getattr(getattr(torch_npu, "distributed", None), "is_hccl_available", None)
    hccl = torch_npu is not None and (is_hccl_available() if is_hccl_available else "hccl" in dist.Backend.backend_list)
    ucc = getattr(dist, "is_ucc_available", lambda: False)()
    return [("gloo", "yes (CPU)" if dist.is_available() and dist.is_gloo_available() else "no"),
            ("nccl", "yes (CUDA)" if dist.is_nccl_available() and local_device_count("cuda") else
             "built in, no CUDA device" if dist.is_nccl_available() else "no"),
            ("hccl", "yes (NPU)" if hccl and local_device_count("npu") else "no"),
            ("mpi", "yes" if dist.is_mpi_available() else "no"), ("ucc", "yes" if ucc else "no")]


def native_precisions() -> list[tuple[str, str]]:
    """(device, which of fp32/fp16/bf16 run natively there); emulated ones are slower than fp32."""
    if cpu_has_native_bf16():
        cpu_bf16 = "bf16 native (AVX512-BF16/AMX)"
    else:
        cpu_bf16 = "bf16 emulated (slower than fp32)"
    rows = [("cpu", f"fp32 native, {cpu_bf16}, fp16 emulated (train.py uses bf16 or fp32 instead)")]
    for index in range(local_device_count("cuda")):
        # Per device from its compute capability (torch.cuda.is_bf16_supported answers for the current device
        # only): bf16 and TF32 tensor cores from sm_80 (Ampere), fp16 tensor cores from sm_70, fp16 math from sm_53.
        major, minor = torch.cuda.get_device_capability(index)
        bf16 = major >= 8
        rows.append((f"cuda:{index}", f"fp32 native{' (TF32 tensor cores)' if major >= 8 else ''}, "
                                      f"fp16 {'native' if (major, minor) >= (5, 3) else 'emulated'}"
                                      f"{' (tensor cores)' if major >= 7 else ''}, "
                                      f"bf16 {'native' if bf16 else 'not native'}"))
    for index in range(local_device_count("npu")):
        bf16 = getattr(torch.npu, "is_bf16_supported", lambda: False)()
        rows.append((f"npu:{index}", f"fp32 native, fp16 native, bf16 {'native' if bf16 else 'not supported'}"))
    return rows
