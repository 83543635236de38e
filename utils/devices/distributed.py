"""Process-group helpers that also work in a single process without one, the contiguous split of
items over ranks, a gradient-correct all-gather for local batches of unequal size (pad + strip), and
the gather of row shards to rank 0 alone in bounded pieces (checkpoints of sharded tensors).

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


def broadcast_text(text: str, device: torch.device) -> str:
    """Rank 0's ``text`` on every rank (sent as int64 values: a dtype gloo, NCCL and HCCL all carry)."""
    if not is_distributed():
        return text
    data = torch.tensor(list(text.encode()), dtype=torch.int64) if get_rank() == 0 else None
    length = torch.tensor([0 if data is None else data.numel()], dtype=torch.int64, device=device)
    dist.broadcast(length, src=0)
    if int(length.item()) == 0:
        return ""
    buffer = data.to(device) if data is not None else torch.empty(int(length.item()), dtype=torch.int64, device=device)
    dist.broadcast(buffer, src=0)
    return bytes(buffer.tolist()).decode()


def all_gather_ints(values: Sequence[int], device: torch.device) -> list[list[int]]:
    """Every rank's ``values`` (the same count on each), in rank order; ``[values]`` without a process group."""
    if not is_distributed():
        return [list(values)]
    mine = torch.tensor(list(values), dtype=torch.int64, device=device)
    rows = [torch.empty_like(mine) for _ in range(get_world_size())]
    dist.all_gather(rows, mine)
    return [row.tolist() for row in rows]


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


def _transfer(op, tensor: torch.Tensor, peer: int) -> None:
    """One point-to-point transfer, waited for. Batched (``batch_isend_irecv``) even when alone: NCCL then
    uses the group's communicator instead of creating one per pair of ranks (2-rank communicators cost
    device memory each, so rank 0 would pay for W - 1 of them); torch_npu implements the batched form for
    HCCL; gloo runs it as a plain isend/irecv."""
    for work in dist.batch_isend_irecv([dist.P2POp(op, tensor, peer)]):
        work.wait()


def gather_rows_to_rank0(shard: torch.Tensor, bounds: Sequence[tuple[int, int]], chunk_rows: int) -> torch.Tensor | None:
    """Every rank's ``shard`` (rows ``bounds[rank]`` of one tensor) assembled on rank 0's CPU; None elsewhere.

    Collective (every rank calls it). Rows travel point to point to rank 0 only, rank after rank, at most
    ``chunk_rows`` rows per transfer: a sending rank sends views of its shard (no copy), rank 0 receives
    into one device buffer of at most ``chunk_rows`` rows (on CPU straight into the result), so the
    transient memory is independent of the world size. Without a process group: a CPU copy of ``shard``.
    """
    shard = shard.detach()
    if not is_distributed():
        return shard.to("cpu", copy=True)
    chunk_rows = max(1, int(chunk_rows))
    rank = get_rank()
    if shard.shape[0] != bounds[rank][1] - bounds[rank][0]:
        raise ValueError(f"rank {rank}: shard has {shard.shape[0]} rows, bounds say {bounds[rank]}")
    shard = shard.contiguous()  # row slices of a contiguous tensor are contiguous views: sent without a copy
    if rank != 0:
        for offset in range(0, shard.shape[0], chunk_rows):
            _transfer(dist.isend, shard[offset: offset + chunk_rows], 0)
        return None
    full = torch.empty((bounds[-1][1],) + tuple(shard.shape[1:]), dtype=shard.dtype)
    for offset in range(0, shard.shape[0], chunk_rows):  # rank 0's own rows: copied chunk by chunk too
        rows = shard[offset: offset + chunk_rows]
        full[offset: offset + rows.shape[0]].copy_(rows)
    on_cpu = shard.device.type == "cpu"
    buffer = None if on_cpu else torch.empty((min(chunk_rows, max(e - s for s, e in bounds)),) + tuple(shard.shape[1:]),
                                             dtype=shard.dtype, device=shard.device)
    for peer, (start, end) in enumerate(bounds[1:], start=1):
        for offset in range(start, end, chunk_rows):
            rows = min(chunk_rows, end - offset)
            target = full[offset: offset + rows]
            if on_cpu:
                _transfer(dist.irecv, target, peer)
            else:
                _transfer(dist.irecv, buffer[:rows], peer)
                target.copy_(buffer[:rows])
    return full
