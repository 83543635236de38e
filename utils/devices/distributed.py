"""Process-group helpers that also work in a single process without one, the contiguous split of
items over ranks, and a gradient-correct all-gather for local batches of unequal size (pad + strip).

The all-gather's backward SUMS the gradient of the gathered tensor over all ranks and hands
each rank the slice of its own rows: every rank computes a part of the global loss from the
same gathered rows, so the true gradient of a row is the sum of the parts.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank; 0 without an initialised process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """The number of ranks; 1 without an initialised process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@contextlib.contextmanager
def rank0_buffers(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, ``module``'s buffers (BatchNorm running statistics) hold rank 0's values on every
    rank; each rank gets its own back afterwards, so training is unchanged. A no-op without a process group.

    DDP here leaves buffers per rank (arcface_torch's broadcast_buffers=False), and rank 0 saves the model:
    a sharded evaluation must embed every shard with rank 0's statistics to score the saved model.
    (Parameters need no such step: DDP starts every rank from rank 0's and applies the same update.)
    """
    if not is_distributed():
        yield module
        return
    buffers = [buffer for buffer in module.buffers() if buffer.numel()]
    own = [buffer.detach().clone() for buffer in buffers] if get_rank() != 0 else []
    with torch.no_grad():
        for buffer in buffers:
            dist.broadcast(buffer, src=0)
    try:
        yield module
    finally:
        with torch.no_grad():
            for buffer, saved in zip(buffers, own):
                buffer.copy_(saved)


def shard_bounds(num_items: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` per rank; the first ``num_items % world_size`` ranks get one item more."""
    base, extra = divmod(num_items, world_size)
    bounds, start = [], 0
    for rank in range(world_size):
        end = start + base + (1 if rank < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum`` or ``max``); a no-op without a process group."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def all_gather_sizes(local_size: int, device: torch.device) -> list[int]:
    """Every rank's local batch size (one tiny collective)."""
    if not is_distributed():
        return [int(local_size)]
    mine = torch.tensor([local_size], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(mine) for _ in range(get_world_size())]
    dist.all_gather(sizes, mine)
    return [int(size.item()) for size in sizes]


def _gather_padded(tensor: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` (row counts ``sizes``) in rank order."""
    max_rows = max(sizes)
    if tensor.shape[0] == max_rows:
        padded = tensor.contiguous()
    else:
        # Pad to the largest local batch: all_gather needs equal shapes on every rank.
        padded = tensor.new_zeros((max_rows,) + tuple(tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
    buffers = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(buffers, padded)
    if all(size == max_rows for size in sizes):
        return torch.cat(buffers)
    return torch.cat([buffer[:size] for buffer, size in zip(buffers, sizes)])


class _AllGatherRows(torch.autograd.Function):
    """Differentiable :func:`_gather_padded`: backward sums over ranks, then keeps this rank's rows."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: tuple, rank: int) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        return _gather_padded(tensor, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start: start + ctx.sizes[ctx.rank]], None, None


def all_gather_rows(tensor: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """All ranks' rows concatenated in rank order; local row counts may differ between ranks.

    Differentiable when ``tensor`` requires grad (backward = sum over ranks, then own slice).
    ``sizes`` (from :func:`all_gather_sizes`) saves a collective when already known.
    Returns ``tensor`` itself without a process group.
    """
    if not is_distributed():
        return tensor
    if sizes is None:
        sizes = all_gather_sizes(tensor.shape[0], tensor.device)
    if tensor.requires_grad:
        return _AllGatherRows.apply(tensor, tuple(sizes), get_rank())
    return _gather_padded(tensor, sizes)
