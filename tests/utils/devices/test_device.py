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


# ---------------------------------------------------------------- the environment report (tools/benchmark.py doctor)

def test_environment_report_on_this_cpu_machine():
    versions = dict(devices.software_versions())
    assert versions["torch"].startswith(torch.__version__ + " (git ")
    assert versions["CUDA"] == (f"built with {torch.version.cuda}" if torch.version.cuda else "not in this torch build")
    cpu = dict(devices.local_devices())["cpu"]
    assert cpu == f"{os.cpu_count()} logical cores, torch uses {torch.get_num_threads()} threads"
    backends = dict(devices.distributed_backends())
    assert backends["gloo"] == ("yes (CPU)" if dist.is_gloo_available() else "no")
    assert list(backends) == ["gloo", "nccl", "hccl", "mpi", "ucc"]
    assert dict(devices.native_precisions())["cpu"].startswith("fp32 native, bf16 ")
    assert devices.local_device_count("cpu") == 1


def test_environment_report_for_two_cuda_devices_uses_the_documented_api(monkeypatch):
    # No GPU here: torch.cuda's documented calls are stood in for, to run the CUDA branches.
    import types

    props = [types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80 * 2**30, major=9, minor=0),
             types.SimpleNamespace(name="Tesla V100-SXM2-32GB", total_memory=32 * 2**30, major=7, minor=0)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props[index])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (props[index].major, props[index].minor))
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 21, 5))
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    monkeypatch.setattr(devices, "_first_line", lambda command: "550.54.15" if command[0] == "nvidia-smi" else "")
    versions = dict(devices.software_versions())
    assert versions["NCCL"] == "2.21.5" and versions["GPU driver"] == "550.54.15"
    assert devices.local_devices()[1:] == [("cuda:0", "NVIDIA H100 80GB HBM3, 80.0 GiB, compute capability 9.0"),
                                           ("cuda:1", "Tesla V100-SXM2-32GB, 32.0 GiB, compute capability 7.0")]
    assert dict(devices.distributed_backends())["nccl"] == "yes (CUDA)"
    assert devices.native_precisions()[1:] == [
        ("cuda:0", "fp32 native (TF32 tensor cores), fp16 native (tensor cores), bf16 native"),
        ("cuda:1", "fp32 native, fp16 native (tensor cores), bf16 not native")]  # a V100 next to an H100
    assert devices.local_device_count("cuda") == 2


def test_environment_report_for_an_ascend_npu_uses_the_documented_api(monkeypatch):
    # No NPU here: torch_npu is stood in for by modules with its documented names (torch_npu.__version__,
    # torch_npu.npu.utils.get_cann_version, torch_npu.distributed.is_hccl_available, torch.npu.*).
    import sys
    import types

    def get_cann_version(module="CANN"):
        return {"CANN": "8.1.RC1", "DRIVER": "24.1.0"}.get(module, "")

    npu = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 1, is_bf16_supported=lambda: True,
                                get_device_properties=lambda index: types.SimpleNamespace(name="Ascend910B2",
                                                                                          total_memory=64 * 2**30))
    torch_npu = types.ModuleType("torch_npu")
    torch_npu.__version__ = "2.1.0.post8"
    torch_npu.distributed = types.SimpleNamespace(is_hccl_available=lambda: True)
    npu_package, npu_utils = types.ModuleType("torch_npu.npu"), types.ModuleType("torch_npu.npu.utils")
    npu_utils.get_cann_version = get_cann_version
    for name, module in (("torch_npu", torch_npu), ("torch_npu.npu", npu_package), ("torch_npu.npu.utils", npu_utils)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    versions = dict(devices.software_versions())
    assert (versions["torch_npu"], versions["CANN"], versions["NPU driver"]) == ("2.1.0.post8", "8.1.RC1", "24.1.0")
    assert devices.local_devices()[-1] == ("npu:0", "Ascend910B2, 64.0 GiB")
    assert dict(devices.distributed_backends())["hccl"] == "yes (NPU)"
    assert devices.native_precisions()[-1] == ("npu:0", "fp32 native, fp16 native, bf16 native")
    assert devices.local_device_count("npu") == 1 and devices.resolve_kind("npu") == "npu"
