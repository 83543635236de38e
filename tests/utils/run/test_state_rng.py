"""utils/run/state.py RNG rules with the device's generators (CUDA/NPU cannot run here): torch.npu / torch.cuda
are replaced by a generator module with the same API whose generators are real torch generators, so a state
that does not round-trip changes the numbers drawn. Same world size: every rank gets its CPU and device
states back; another world size, another device kind or count: the generators keep the run's seeding."""
from __future__ import annotations

import io
import logging

import pytest
import torch

from tests.spawn_helpers import run_ranks
from utils.devices import device as devices
from utils.run import state as run_state
from utils.run.checkpoint import atomic_save, load_checkpoint, build_checkpoint


class DeviceGenerators:
    """``torch.cuda``/``torch.npu``'s generator functions (``device_count``, ``get_rng_state_all``,
    ``set_rng_state_all``, ``manual_seed_all``) over one real ``torch.Generator`` per device."""

    def __init__(self, count: int, seed: int) -> None:
        self.generators = [torch.Generator() for _ in range(count)]
        self.manual_seed_all(seed)

    def device_count(self) -> int:
        return len(self.generators)

    def manual_seed_all(self, seed: int) -> None:
        for generator in self.generators:
            generator.manual_seed(seed)

    def get_rng_state_all(self) -> list[torch.Tensor]:
        return [generator.get_state() for generator in self.generators]

    def set_rng_state_all(self, states) -> None:
        for generator, state in zip(self.generators, states):
            generator.set_state(state)

    def draw(self) -> list[torch.Tensor]:
        """What dropout on each device would draw next."""
        return [torch.rand(4, generator=generator) for generator in self.generators]


def npu_context(monkeypatch, generators: DeviceGenerators, rank: int = 0, world_size: int = 1) -> devices.DeviceContext:
    monkeypatch.setattr(torch, "npu", generators, raising=False)  # where torch_npu puts its module
    return devices.DeviceContext("npu", torch.device("cpu"), rank, rank, world_size, "hccl")


def save_and_load(tmp_path, rng: list, world_size: int) -> dict:
    """Through a real checkpoint file, loaded weights_only."""
    states = {key: {} for key in ("backbone", "head", "optimizer", "scaler", "sampler")}
    path = str(tmp_path / "checkpoint_step000000001.pt")
    atomic_save(build_checkpoint(step=1, epoch=0, samples_in_epoch=8, global_batch=8, world_size=world_size,
                                 states=states, rng=rng, config={}, data={}), path)
    return load_checkpoint(path)


def test_device_generators_round_trip_through_a_checkpoint(tmp_path, monkeypatch):
    generators = DeviceGenerators(count=2, seed=5)
    ctx = npu_context(monkeypatch, generators)
    generators.draw()  # the run has drawn a little
    torch.manual_seed(11)
    checkpoint = save_and_load(tmp_path, run_state.gather_rng_states(ctx), world_size=1)
    expected_device, expected_cpu = generators.draw(), torch.rand(3)  # what the uninterrupted run draws next
    assert [len(state) for state in checkpoint["rng"][0]["device"]["states"]] == [len(s) for s in
                                                                              generators.get_rng_state_all()]
    generators.manual_seed_all(99), torch.manual_seed(99)  # the resumed process starts seeded differently
    run_state.restore_rng(checkpoint, ctx)
    for got, expected in zip(generators.draw(), expected_device):
        assert torch.equal(got, expected)
    assert torch.equal(torch.rand(3), expected_cpu)


def test_another_world_size_or_device_count_keeps_the_seeding(tmp_path, monkeypatch, caplog):
    writer = DeviceGenerators(count=2, seed=5)
    writer.draw()
    checkpoint = save_and_load(tmp_path, run_state.gather_rng_states(npu_context(monkeypatch, writer)), world_size=1)
    fresh = DeviceGenerators(count=2, seed=7)
    seeded = DeviceGenerators(count=2, seed=7).draw()
    # Resumed on 2 ranks: rank r's saved state has no counterpart, so nothing is restored (as the head is re-split).
    with caplog.at_level(logging.INFO, logger="arcscale.train"):
        run_state.restore_rng(checkpoint, npu_context(monkeypatch, fresh, world_size=2))
    assert "resuming 1-rank checkpoint on 2 ranks: head shards re-split, RNG reseeded" in caplog.text
    for got, expected in zip(fresh.draw(), seeded):
        assert torch.equal(got, expected)
    # Same world size, another device count: the device keeps its seeding, with one warning saying why.
    three = DeviceGenerators(count=3, seed=7)
    caplog.clear()
    run_state.restore_rng(checkpoint, npu_context(monkeypatch, three))
    assert "device RNG not restored (the checkpoint holds 2 npu generator state(s); this process sees 3 npu" \
           in caplog.text
    for got, expected in zip(three.draw(), DeviceGenerators(count=3, seed=7).draw()):
        assert torch.equal(got, expected)
    # A checkpoint written on CPU resumed on a device, and the reverse: the same warning, CPU states restored.
    cpu_checkpoint = save_and_load(tmp_path, run_state.gather_rng_states(
        devices.DeviceContext("cpu", torch.device("cpu"), 0, 0, 1, "gloo")), world_size=1)
    assert cpu_checkpoint["rng"][0]["device"] is None
    caplog.clear()
    run_state.restore_rng(cpu_checkpoint, npu_context(monkeypatch, DeviceGenerators(count=2, seed=7)))
    assert "holds no device generator state" in caplog.text
    caplog.clear()
    run_state.restore_rng(checkpoint, devices.DeviceContext("cpu", torch.device("cpu"), 0, 0, 1, "gloo"))
    assert "the checkpoint holds npu generator states; this run is on cpu" in caplog.text


def test_cuda_generators_go_through_torch_cuda(tmp_path, monkeypatch):
    generators = DeviceGenerators(count=1, seed=3)
    for name in ("device_count", "get_rng_state_all", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, getattr(generators, name))
    ctx = devices.DeviceContext("cuda", torch.device("cpu"), 0, 0, 1, "nccl")
    checkpoint = save_and_load(tmp_path, run_state.gather_rng_states(ctx), world_size=1)
    assert checkpoint["rng"][0]["device"]["kind"] == "cuda"
    expected = generators.draw()
    generators.manual_seed_all(0)
    run_state.restore_rng(checkpoint, ctx)
    assert torch.equal(generators.draw()[0], expected[0])


def _per_rank_worker(rank: int, world_size: int) -> bytes:
    import pytest as _pytest

    patch = _pytest.MonkeyPatch()
    try:
        generators = DeviceGenerators(count=2, seed=100 + rank)  # each rank's devices at their own state
        ctx = npu_context(patch, generators, rank=rank, world_size=world_size)
        states = run_state.gather_rng_states(ctx)  # collective: every rank's states, in rank order
        expected = generators.draw()
        generators.manual_seed_all(0)
        run_state.restore_rng({"world_size": world_size, "rng": states}, ctx)
        buffer = io.BytesIO()
        torch.save({"restored": generators.draw(), "expected": expected, "saved_ranks": len(states)}, buffer)
        return buffer.getvalue()
    finally:
        patch.undo()


def test_each_rank_gets_its_own_device_states_back(port):
    results = [torch.load(io.BytesIO(data), weights_only=True) for data in run_ranks(_per_rank_worker, 2, port)]
    assert [result["saved_ranks"] for result in results] == [2, 2]
    for result in results:
        for got, expected in zip(result["restored"], result["expected"]):
            assert torch.equal(got, expected)
    assert not torch.equal(results[0]["expected"][0], results[1]["expected"][0])
