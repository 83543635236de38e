"""utils/distributed.py: works without a process group; all-gather of unequal local batches with a
gradient that sums over ranks (3 gloo ranks, local batches 3, 1, 2)."""
import io

import torch

from tests.spawn_helpers import run_ranks
from utils.devices import distributed as dist_utils

SIZES = [3, 1, 2]


def test_single_process_without_group():
    assert (dist_utils.get_rank(), dist_utils.get_world_size(), dist_utils.is_distributed()) == (0, 1, False)
    x = torch.randn(4, 2, requires_grad=True)
    assert dist_utils.all_gather_rows(x) is x
    assert dist_utils.all_gather_sizes(4, x.device) == [4]
    y = torch.tensor([1.0, 5.0])
    assert dist_utils.all_reduce_(y, "max") is y and y.tolist() == [1.0, 5.0]
    assert dist_utils.broadcast_text("as is", x.device) == "as is"
    assert dist_utils.all_gather_ints([3, 4], x.device) == [[3, 4]]


def test_shard_bounds_are_contiguous_and_balanced():
    assert dist_utils.shard_bounds(40, 3) == [(0, 14), (14, 27), (27, 40)]
    assert dist_utils.shard_bounds(5, 2) == [(0, 3), (3, 5)]
    assert dist_utils.shard_bounds(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]  # more ranks than items: empty tails


def _pack(obj) -> bytes:
    """Results cross the spawn queue as bytes: a tensor would travel as a shared-memory handle that dies
    with the child (FileNotFoundError in multiprocessing's resource sharer when the parent reads it late)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _gather_worker(rank: int, world_size: int) -> bytes:
    local = torch.arange(SIZES[rank] * 2, dtype=torch.float32).view(-1, 2) + 100 * rank
    local.requires_grad_(True)
    sizes = dist_utils.all_gather_sizes(local.shape[0], local.device)
    gathered = dist_utils.all_gather_rows(local, sizes)
    labels = dist_utils.all_gather_rows(torch.full((SIZES[rank],), rank, dtype=torch.int64))
    # Each rank weights the gathered rows differently; the true gradient of the sum of all ranks'
    # losses w.r.t. a row is the sum of the weights: 1 + 2 + 3 = 6 (times the column factor).
    (gathered * (rank + 1) * torch.tensor([1.0, 10.0])).sum().backward()
    peak = torch.tensor([float(rank)])
    dist_utils.all_reduce_(peak, "max")
    text = dist_utils.broadcast_text("/données/ckpt_2.pt" if rank == 0 else "not sent", local.device)
    empty = dist_utils.broadcast_text("" if rank == 0 else "not sent", local.device)
    return _pack({"sizes": sizes, "gathered": gathered.detach(), "labels": labels, "grad": local.grad,
                  "max": peak.item(), "text": text, "empty": empty,
                  "ints": dist_utils.all_gather_ints([rank, 7], local.device)})


def test_all_gather_unequal_batches_and_gradient(port):
    packed = run_ranks(_gather_worker, 3, port, timeout=60)
    results = [torch.load(io.BytesIO(data), weights_only=True) for data in packed]
    expected = torch.cat([torch.arange(size * 2, dtype=torch.float32).view(-1, 2) + 100 * rank
                          for rank, size in enumerate(SIZES)])
    expected_labels = torch.tensor([0, 0, 0, 1, 2, 2])
    for rank, result in enumerate(results):
        assert result["sizes"] == SIZES and result["max"] == 2.0
        assert torch.equal(result["gathered"], expected)
        assert torch.equal(result["labels"], expected_labels)
        assert torch.equal(result["grad"], torch.tensor([[6.0, 60.0]]).expand(SIZES[rank], 2))
        assert (result["text"], result["empty"]) == ("/données/ckpt_2.pt", "")  # rank 0's, on every rank
        assert result["ints"] == [[0, 7], [1, 7], [2, 7]]


# ---------------------------------------------------------------- gathering shards to rank 0
GATHER_BOUNDS = [(0, 7), (7, 13), (13, 19)]  # 19 rows over 3 ranks (7, 6, 6)
CHUNK_ROWS = 2


def _shard(rank: int, dtype: torch.dtype) -> torch.Tensor:
    start, end = GATHER_BOUNDS[rank]
    rows = torch.arange(start * 5, end * 5, dtype=torch.float32).view(-1, 5) / 7
    return rows.to(dtype) if dtype != torch.int8 else (rows * 3).to(torch.int8)


class _NewStorageBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of every storage an op creates (a view or an in-place write into an existing tensor adds 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                self.total += tensor.untyped_storage().nbytes()
        return out


def _gather_to_rank0_worker(rank: int, world_size: int) -> bytes:
    import torch.distributed as dist

    transfers = []
    real_batch = dist.batch_isend_irecv

    def spy(ops):  # the real gloo transfer, recorded: direction, peer and size of each
        transfers.extend((op.op.__name__, op.peer, op.tensor.numel(), op.tensor.dtype) for op in ops)
        return real_batch(ops)

    dist.batch_isend_irecv = spy
    results = {}
    try:
        for dtype in (torch.float32, torch.bfloat16, torch.int8):
            shard = _shard(rank, dtype)
            before = dist_utils.all_gather_rows(shard)  # what the head's checkpoint gathered before: all-gather
            counter = _NewStorageBytes()
            with counter:
                gathered = dist_utils.gather_rows_to_rank0(shard, GATHER_BOUNDS, CHUNK_ROWS)
            results[str(dtype)] = {"gathered": gathered, "before": before, "allocated": counter.total,
                                   "shard_bytes": shard.numel() * shard.element_size()}
    finally:
        dist.batch_isend_irecv = real_batch
    results["transfers"] = [(name, peer, numel, str(dtype)) for name, peer, numel, dtype in transfers]
    return _pack(results)


def test_gather_to_rank0_sends_to_rank0_only_in_bounded_pieces_bit_identical(port):
    results = [torch.load(io.BytesIO(data), weights_only=True) for data in run_ranks(_gather_to_rank0_worker, 3, port)]
    for dtype in (torch.float32, torch.bfloat16, torch.int8):
        expected = torch.cat([_shard(rank, dtype) for rank in range(3)])
        rank0 = results[0][str(dtype)]
        # bit for bit what the all-gather gave (and the rows themselves)
        assert rank0["gathered"].dtype == dtype and torch.equal(rank0["gathered"].view(torch.uint8),
                                                                rank0["before"].view(torch.uint8))
        assert torch.equal(rank0["gathered"], expected)
        # rank 0 allocates the result and nothing else (on CPU it receives straight into it); the other ranks
        # allocate nothing at all: they send views of their shard, whatever the world size
        assert rank0["allocated"] == expected.numel() * expected.element_size()
        for rank in (1, 2):
            assert results[rank][str(dtype)]["gathered"] is None
            assert results[rank][str(dtype)]["allocated"] == 0
    # point to point, to rank 0 only, at most CHUNK_ROWS rows (x 5 values) per transfer
    for rank in (1, 2):
        sent = results[rank]["transfers"]
        assert {(name, peer) for name, peer, _, _ in sent} == {("isend", 0)}
        assert max(numel for _, _, numel, _ in sent) == CHUNK_ROWS * 5
        rows = GATHER_BOUNDS[rank][1] - GATHER_BOUNDS[rank][0]
        assert sum(numel for _, _, numel, _ in sent) == 3 * rows * 5  # three dtypes, each row once
    received = results[0]["transfers"]
    assert {name for name, _, _, _ in received} == {"irecv"} and max(n for _, _, n, _ in received) == CHUNK_ROWS * 5
    assert sorted({peer for _, peer, _, _ in received}) == [1, 2]


def _buffers_worker(rank: int, world_size: int) -> bytes:
    # Each rank's BatchNorm has seen other data: its running statistics differ from the other ranks'.
    norm = torch.nn.BatchNorm1d(3)
    norm(torch.randn(8, 3, generator=torch.Generator().manual_seed(rank)) * (rank + 1))
    own = {key: value.clone() for key, value in norm.state_dict().items()}
    with dist_utils.rank0_buffers(norm) as module:
        inside = {key: value.clone() for key, value in module.state_dict().items()}
    return _pack({"own": own, "inside": inside, "after": norm.state_dict()})


def test_rank0_buffers_lends_rank_0s_statistics_and_gives_each_rank_its_own_back(port):
    results = [torch.load(io.BytesIO(data), weights_only=True) for data in run_ranks(_buffers_worker, 2, port)]
    rank0_own = results[0]["own"]
    assert not torch.equal(results[1]["own"]["running_mean"], rank0_own["running_mean"])
    for result in results:
        for key in rank0_own:
            assert torch.equal(result["inside"][key], rank0_own[key]), key   # every rank evaluates rank 0's
            assert torch.equal(result["after"][key], result["own"][key]), key  # and trains on with its own
    norm = torch.nn.BatchNorm1d(3)
    with dist_utils.rank0_buffers(norm) as module:  # without a process group: the module as it is
        assert module is norm
