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
    return _pack({"sizes": sizes, "gathered": gathered.detach(), "labels": labels, "grad": local.grad,
                  "max": peak.item()})


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
