"""utils/devices/device.py: device resolution (and why auto passed over CUDA), autocast and scaler on CPU, the
summing DDP hook (gloo), CUDA set-up and bf16 with patched torch.cuda, a process group that cannot be joined."""
import inspect
import os
import re
import sys
import warnings

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


def _no_torch_npu(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # "not installed", whatever this machine has
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)


def test_cuda_setup_checks_the_count_and_binds_the_process_group(monkeypatch):
    _no_torch_npu(monkeypatch)
    joined, selected = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: joined.append(kwargs))
    for key, value in dict(WORLD_SIZE="4", RANK="3", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29500", NCCL_SOCKET_IFNAME="ib0").items():
        monkeypatch.setenv(key, value)
    ctx = devices.setup("auto")
    assert (ctx.kind, ctx.device, ctx.backend, selected) == ("cuda", torch.device("cuda", 1), "nccl", [1])
    assert ctx.chosen == ("device cuda:1 (NVIDIA A100-SXM4-80GB), backend nccl, world size 4 (2 per node), "
                          "NCCL_SOCKET_IFNAME=ib0; chosen by device=auto")
    (kwargs,) = joined
    assert (kwargs["backend"], kwargs["rank"], kwargs["world_size"]) == ("nccl", 3, 4)
    if "device_id" in inspect.signature(dist.init_process_group).parameters:  # torch >= 2.3
        assert kwargs["device_id"] == torch.device("cuda", 1)
    else:
        assert "device_id" not in kwargs
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(devices.DeviceError, match=r"^LOCAL_RANK=2 but only 2 CUDA device\(s\) are visible$"):
        devices.setup("cuda")
    assert len(joined) == 1


def test_auto_says_why_it_passed_over_cuda(monkeypatch, caplog):
    _no_torch_npu(monkeypatch)
    monkeypatch.setattr(torch.version, "cuda", "12.1")
    too_old = "CUDA initialization: The NVIDIA driver on your system is too old (found version 11040)"

    def failing_init():
        warnings.warn(too_old)  # what torch.cuda.is_available() does when the driver cannot be used
        return False

    monkeypatch.setattr(torch.cuda, "is_available", failing_init)
    ctx = devices.setup("auto")
    why = f"torch {torch.__version__} is a CUDA build but CUDA failed: {too_old}"
    assert ctx.kind == "cpu" and ctx.warnings == (f"device=auto trains on CPU: {why}",)
    assert ctx.chosen == f"device cpu, backend gloo, world size 1; chosen by device=auto (cuda: {why})"
    with caplog.at_level("INFO", logger="utils.devices.device"):
        devices.log_choice(ctx)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("INFO", ctx.chosen),
                                                                      ("WARNING", ctx.warnings[0])]
    with pytest.raises(devices.DeviceError, match=re.escape(f"device='cuda' requested but torch.cuda.is_available() "
                                                            f"is False ({why})")):
        devices.setup("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CUDA build on a machine without a GPU
    ctx = devices.setup("auto")
    assert ctx.warnings == () and ctx.chosen.endswith("(cuda: no CUDA GPU visible (CUDA_VISIBLE_DEVICES, nvidia-smi))")


def test_bf16_is_refused_on_a_gpu_without_it(monkeypatch):
    cuda = devices.DeviceContext("cuda", torch.device("cpu"), 0, 0, 1, "nccl")
    # torch >= 2.3 counts emulated bf16 (pre-Ampere) as supported unless asked not to.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert not devices.bf16_supported(cuda)
    with pytest.raises(devices.DeviceError, match=r"config key 'bf16' is True but .* has no bf16 \(torch.cuda."
                                                  r"is_bf16_supported\(\) is False: .*Ampere.*\); use fp16=True"):
        devices.resolve_precision(cuda, False, True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert devices.resolve_precision(cuda, False, True) == (False, True)


@pytest.mark.timeout(60)
def test_a_process_group_that_cannot_be_joined_is_one_line(monkeypatch, port):
    _no_torch_npu(monkeypatch)
    for key, value in dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                           GLOO_SOCKET_IFNAME="lo").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(devices.DeviceError) as caught:  # nobody listens on the port: the rendezvous times out
        devices.setup("cpu", timeout_minutes=0.05)
    message = str(caught.value)
    assert re.match(rf"rank 1 of 2 could not join the gloo process group at 127\.0\.0\.1:{port}, "
                    rf"GLOO_SOCKET_IFNAME=lo: \w+: \S", message) and "\n" not in message, message
    assert not dist.is_initialized()
