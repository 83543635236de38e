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
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)  # this node's count only
    if world_size > 1 and not dist.is_initialized():
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise DeviceError(f"WORLD_SIZE={world_size} but {key} is not set; launch with torchrun")
        timeout = datetime.timedelta(seconds=timeout_s)
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
                dist.init_process_group(backend=backend, store=dist.PrefixStore(f"arcscale/generation_{generation}", store),
                                        rank=rank, world_size=world_size, timeout=timeout)
            else:
                dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                        timeout=timeout)
        except RuntimeError as exc:  # torch's DistStoreError / DistNetworkError are RuntimeErrors
            if collective_failure(exc) != "timeout":
                raise
            raise DeviceError(f"rank {rank}: the {world_size} ranks did not all join the process group at "
                              f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout_s:g} s "
                              f"(are all ranks/nodes started? config key 'collective_timeout_s' sets the "
                              f"wait): {str(exc).strip().splitlines()[0]}") from None
    if world_size > 1:  # without torchrun's store (or a counter from before it): restarted if any node says so
        agreed = torch.tensor([restarts], dtype=torch.int64, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        restarts = int(agreed.item())
    return DeviceContext(kind, device, rank, local_rank, world_size, backend, node_rank(rank), restarts)


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
    """True where bf16 matmuls run natively (on CPU without AVX512-BF16/AMX they are emulated, slower than fp32)."""
    if ctx.kind == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return ctx.kind == "npu" or cpu_has_native_bf16()


def reset_peak_memory(ctx: DeviceContext) -> None:
    """Start a new peak for :func:`memory_gib` on an accelerator (the CPU's peak RSS cannot be reset)."""
    if accelerator_of(ctx) is not None:
        accelerator_of(ctx).reset_peak_memory_stats(ctx.device)


def memory_gib(ctx: DeviceContext) -> float:
    """Peak accelerator memory (allocator) or, on CPU, this process's peak RSS, in GiB."""
    if accelerator_of(ctx) is not None:
        return accelerator_of(ctx).max_memory_allocated(ctx.device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def wrap_ddp(model: torch.nn.Module, ctx: DeviceContext, static_graph: bool, accumulation: int,
             fp16_grad_compression: bool) -> torch.nn.Module:
    """DDP with summed (not averaged) gradients (:func:`sum_allreduce_hook`); ``model`` itself without a
    process group. ``static_graph`` (config key) is used only when every micro-step syncs (``accumulation``
    1): torch's static graph and ``no_sync()`` do not mix (an internal assert at the first step, and once
    past it gradients that stop being all-reduced: pytorch#143580, #187732)."""
    if not ctx.distributed:
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # BatchNorm statistics stay per rank between steps (arcface_torch's broadcast_buffers=False); newer
    # torch spells it forward_sync_buffers and warns about the old name.
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    static = bool(static_graph) and int(accumulation) == 1
    if static_graph and not static:
        logger.info("gradient_acc=%d: DDP runs with static_graph=False (torch's static graph breaks under "
                    "no_sync, pytorch#143580)", accumulation)
    wrapped = DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.kind != "cpu" else None,
                                      static_graph=static, **no_buffer_sync)
    wrapped.register_comm_hook(None, sum_allreduce_hook(fp16_compression_applies(ctx, fp16_grad_compression)))
    return wrapped


def sum_allreduce_hook(fp16_compress: bool):
    """DDP communication hook that SUMS gradients (the Partial FC head returns true gradients of the
    global-mean loss, so averaging over ranks would divide them by the world size).

    ``fp16_compress``: the bucket travels as fp16, divided by the world size first and multiplied back
    after, so the fp16 all-reduce carries the mean (whose magnitude is that of one rank's gradient)
    instead of a sum that can pass fp16's 65504 (torch's own fp16 compress hook also divides first);
    the result is still the SUM, in the bucket's own dtype.
    """

    def hook(state, bucket):  # no annotations: DDP inspects them and `from __future__` makes them strings
        buffer = bucket.buffer()
        if not fp16_compress:
            future = dist.all_reduce(buffer, async_op=True).get_future()
            return future.then(lambda fut: fut.value()[0])
        world_size = dist.get_world_size()
        compressed = buffer.div_(world_size).to(torch.float16)  # divide in the bucket's precision, then round
        future = dist.all_reduce(compressed, async_op=True).get_future()

        def decompress(fut):
            return buffer.copy_(fut.value()[0]).mul_(world_size)

        return future.then(decompress)

    return hook


def fp16_compression_applies(ctx: DeviceContext, requested: bool) -> bool:
    """Whether ``fp16_grad_compression`` is used: on CUDA (NCCL) and Ascend (HCCL, where torch_npu documents
    the same DDP hook); on CPU/gloo it would only cost conversions, so it is left off there with a note."""
    if requested and ctx.kind == "cpu":
        logger.info("fp16_grad_compression=True: not applied on CPU (gloo gains nothing from fp16 buckets)")
    return bool(requested) and ctx.kind in ("cuda", "npu")
