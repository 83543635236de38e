"""DistributedDataParallel as the trainer uses it: summed (not averaged) gradients, optional fp16 buckets
(divided by the world size first) on CUDA and NPU, static graph only where torch supports it."""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from utils.devices.device import DeviceContext

logger = logging.getLogger(__name__)


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
