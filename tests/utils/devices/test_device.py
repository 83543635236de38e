"""utils/device.py: device resolution, autocast and scaler on CPU, the summing DDP hook (gloo)."""
import os
import re

import pytest
import torch
import torch.distributed as dist

from tests.spawn_helpers import run_ranks
from utils.devices import device as devices


def test_cpu_resolution_and_errors(monkeypatch):
    assert devices.resolve_kind("cpu") == "cpu"
    with pytest.raises(devices.DeviceError, match="expected auto, cuda, npu or cpu, got 'gpu'"):
        devices.resolve_kind("gpu")
    if not torch.cuda.is_available():
        assert devices.resolve_kind("auto") in ("cpu", "npu")
        with pytest.raises(devices.DeviceError, match="device='cuda' requested"):
            devices.resolve_kind("cuda")


def test_single_process_setup_needs_no_process_group(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    ctx = devices.setup("cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.distributed) == (0, 1, "gloo", False)
    assert not dist.is_initialized()
    assert devices.launch_env(legacy_local_rank=3) == (0, 3, 1)


def test_multi_rank_without_master_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(devices.DeviceError, match="WORLD_SIZE=2 but MASTER_ADDR is not set"):
        devices.setup("cpu")


def test_autocast_and_scaler_on_cpu():
    ctx = devices.DeviceContext("cpu", torch.device("cpu"), 0, 0, 1, "gloo")
    with devices.autocast(ctx, fp16=False, bf16=True):
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16
    with pytest.raises(devices.DeviceError, match="both True"):
        devices.autocast(ctx, fp16=True, bf16=True)
    assert not devices.grad_scaler(ctx, fp16=False).is_enabled()


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_cpu_memory_is_the_peak_rss_in_gib():
    ctx = devices.DeviceContext("cpu", torch.device("cpu"), 0, 0, 1, "gloo")
    block = bytearray(64 << 20)  # touch 64 MiB so the peak is not just the interpreter's
    # The kernel's own peak-RSS figure (kB = KiB), read independently of getrusage.
    with open("/proc/self/status") as handle:
        peak_kib = int(re.search(r"VmHWM:\s+(\d+) kB", handle.read()).group(1))
    assert devices.memory_gib(ctx) == pytest.approx(peak_kib / 2**20, rel=0.02)
    del block


def _hook_worker(rank: int, world_size: int) -> list:
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 1, bias=False))
    model.register_comm_hook(None, devices.sum_allreduce_hook(fp16_compress=False))
    with torch.no_grad():
        model.module.weight.fill_(1.0)
    model(torch.full((1, 3), float(rank + 1))).sum().backward()
    return model.module.weight.grad.tolist()


def test_sum_hook_sums_instead_of_averaging(port):
    grads = run_ranks(_hook_worker, 2, port)
    assert grads[0] == grads[1] == [[3.0, 3.0, 3.0]]  # 1 + 2, not their mean 1.5


@pytest.mark.parametrize("native_bf16, expected", [(False, (False, False)), (True, (False, True))])
def test_fp16_on_cpu_falls_back_with_one_warning(monkeypatch, caplog, native_bf16, expected):
    ctx = devices.DeviceContext("cpu", torch.device("cpu"), 0, 0, 1, "gloo")
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native_bf16)
    with caplog.at_level("WARNING", logger="utils.devices.device"):
        assert devices.resolve_precision(ctx, True, False) == expected
    assert len(caplog.records) == 1 and "fp16=True on CPU" in caplog.records[0].getMessage()
    caplog.clear()
    assert devices.resolve_precision(ctx, False, True) == (False, True)  # an explicit bf16 stays
    assert devices.resolve_precision(ctx, False, False) == (False, False) and not caplog.records
    cuda = devices.DeviceContext("cuda", torch.device("cpu"), 0, 0, 1, "nccl")
    assert devices.resolve_precision(cuda, True, False) == (True, False)  # real fp16 hardware keeps it
    with pytest.raises(devices.DeviceError, match="'fp16' and 'bf16' are both True"):
        devices.resolve_precision(ctx, True, True)


def test_peak_memory_report_on_cuda_reads_the_allocator_and_the_device(monkeypatch):
    # torch.cuda's documented API, patched: max_memory_allocated/reserved and get_device_properties().total_memory.
    from types import SimpleNamespace

    asked = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: asked.append(device) or 9 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 10 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * 2**30))
    ctx = devices.DeviceContext("cuda", torch.device("cuda", 3), 0, 3, 1, "nccl")
    assert devices.peak_memory_report(ctx) == ("peak 9.00 GiB allocated (10.00 GiB reserved by the caching "
                                               "allocator) of 80.00 GiB on cuda:3: 70.00 GiB headroom")
    assert asked == [torch.device("cuda", 3)]


@pytest.mark.parametrize("exc, memory, size", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.15 GiB"),
     "CUDA", 20 * 2**20),
    (RuntimeError("NPU out of memory. Tried to allocate 2.00 GiB (NPU 0; 28.50 GiB total capacity; 10.24 GiB already "
                  "allocated)"), "NPU", 2 * 2**30),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                  "to allocate 722534400 bytes. Error code 12 (Cannot allocate memory)"), "CPU", 722534400),
    (RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                  "RuntimeError: DefaultCPUAllocator: not enough memory: you tried to allocate 64 bytes."), "CPU", 64),
    (RuntimeError("EL0004: Failed to allocate memory."), "NPU", None),
    (MemoryError(), "CPU", None),
    (torch.OutOfMemoryError("out of memory"), "accelerator", None),
], ids=["cuda", "npu", "cpu", "cpu-in-a-worker", "acl", "python", "bare"])
def test_out_of_memory_is_recognised_with_the_size_asked_for(exc, memory, size):
    assert devices.out_of_memory(exc) == devices.OutOfMemory(memory, size)


def test_other_errors_are_not_out_of_memory_and_collective_failures_are_told_apart():
    assert devices.out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert devices.out_of_memory(ValueError("CUDA out of memory")) is None
    timeout = RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms "
                           "for recv operation to complete")
    assert devices.collective_failure(timeout) == "timeout"
    assert devices.collective_failure(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                                                   "[127.0.0.1]:5050")) == "peer"
    assert devices.collective_failure(RuntimeError("something else")) is None
