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
from utils.devices import ddp
from utils.devices import memory as device_memory
from utils.devices import report


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
    model.register_comm_hook(None, ddp.sum_allreduce_hook(fp16_compress=False))
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
    versions = dict(report.software_versions())
    assert versions["torch"].startswith(torch.__version__ + " (git ")
    assert versions["CUDA"] == (f"built with {torch.version.cuda}" if torch.version.cuda else "not in this torch build")
    cpu = dict(report.local_devices())["cpu"]
    assert cpu == f"{os.cpu_count()} logical cores, torch uses {torch.get_num_threads()} threads"
    backends = dict(report.distributed_backends())
    assert backends["gloo"] == ("yes (CPU)" if dist.is_gloo_available() else "no")
    assert list(backends) == ["gloo", "nccl", "hccl", "mpi", "ucc"]
    assert dict(report.native_precisions())["cpu"].startswith("fp32 native, bf16 ")
    assert report.local_device_count("cpu") == 1


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
    monkeypatch.setattr(report, "_first_line", lambda command: "550.54.15" if command[0] == "nvidia-smi" else "")
    versions = dict(report.software_versions())
    assert versions["NCCL"] == "2.21.5" and versions["GPU driver"] == "550.54.15"
    assert report.local_devices()[1:] == [("cuda:0", "NVIDIA H100 80GB HBM3, 80.0 GiB, compute capability 9.0"),
                                           ("cuda:1", "Tesla V100-SXM2-32GB, 32.0 GiB, compute capability 7.0")]
    assert dict(report.distributed_backends())["nccl"] == "yes (CUDA)"
    assert report.native_precisions()[1:] == [
        ("cuda:0", "fp32 native (TF32 tensor cores), fp16 native (tensor cores), bf16 native"),
        ("cuda:1", "fp32 native, fp16 native (tensor cores), bf16 not native")]  # a V100 next to an H100
    assert report.local_device_count("cuda") == 2


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
    for key, value in vars(npu).items():  # torch_npu.npu is the module torch.npu names
        setattr(npu_package, key, value)
    torch_npu.npu, npu_package.utils = npu_package, npu_utils
    for name, module in (("torch_npu", torch_npu), ("torch_npu.npu", npu_package), ("torch_npu.npu.utils", npu_utils)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    versions = dict(report.software_versions())
    assert (versions["torch_npu"], versions["CANN"], versions["NPU driver"]) == ("2.1.0.post8", "8.1.RC1", "24.1.0")
    assert report.local_devices()[-1] == ("npu:0", "Ascend910B2, 64.0 GiB")
    assert dict(report.distributed_backends())["hccl"] == "yes (NPU)"
    assert report.native_precisions()[-1] == ("npu:0", "fp32 native, fp16 native, bf16 native")
    assert report.local_device_count("npu") == 1 and devices.resolve_kind("npu") == "npu"


def _fp16_hook_worker(rank: int, world_size: int) -> tuple:
    """Every rank's gradient is 40000 per element: the SUM (80000) is past fp16's largest value (65504)."""
    plain = torch.full((3,), 40000.0, dtype=torch.float16)
    dist.all_reduce(plain)  # what an fp16 all-reduce without the divide carries
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 1, bias=False))
    model.register_comm_hook(None, ddp.sum_allreduce_hook(fp16_compress=True))
    with torch.no_grad():
        model.module.weight.fill_(1.0)
    model(torch.full((1, 3), 40000.0 if rank == 0 else 40001.0)).sum().backward()
    grad = model.module.weight.grad
    return plain.tolist(), grad.dtype, grad.tolist()


def test_fp16_compression_divides_by_the_world_size_and_still_sums(port):
    results = run_ranks(_fp16_hook_worker, 2, port)
    for plain, dtype, grad in results:
        assert plain == [float("inf")] * 3  # without the divide the fp16 sum overflows
        assert dtype == torch.float32
        # (40000 + 40001) / 2 = 40000.5 rounds to 40000 in fp16 (its spacing there is 32): sum = 2 x 40000
        assert grad == [[80000.0, 80000.0, 80000.0]]


def test_fp16_compression_applies_on_cuda_and_npu_only():
    for kind, expected in (("cuda", True), ("npu", True), ("cpu", False)):
        ctx = devices.DeviceContext(kind, torch.device("cpu"), 0, 0, 2, devices.BACKENDS[kind])
        assert ddp.fp16_compression_applies(ctx, True) is expected
        assert ddp.fp16_compression_applies(ctx, False) is False


@pytest.fixture
def torch_speed_flags():
    """torch's global cuDNN/cuBLAS flags, restored after the test. Not monkeypatch: cuBLAS's flags live behind
    the module object's own __getattr__/__setattr__, which pytest >= 9.2's undo takes for instance attributes
    and deletes (AttributeError: 'cuBLASModule' object has no attribute 'allow_tf32')."""
    saved = torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = False, False
    yield
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = saved


def test_speed_settings_set_the_device_flags(monkeypatch, torch_speed_flags):
    import types

    npu = types.SimpleNamespace(matmul=types.SimpleNamespace(allow_hf32=False))
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    cpu = devices.DeviceContext("cpu", torch.device("cpu"), 0, 0, 1, "gloo")
    devices.apply_speed_settings(cpu, cudnn_benchmark=True, allow_tf32=True)
    assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, npu.matmul.allow_hf32) == \
        (False, False, False)  # nothing on CPU
    cuda = devices.DeviceContext("cuda", torch.device("cpu"), 0, 0, 1, "nccl")
    devices.apply_speed_settings(cuda, cudnn_benchmark=True, allow_tf32=True)
    assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, npu.matmul.allow_hf32) == \
        (True, True, False)
    devices.apply_speed_settings(cuda, cudnn_benchmark=False, allow_tf32=False)
    assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32) == (False, False)
    ascend = devices.DeviceContext("npu", torch.device("cpu"), 0, 0, 1, "hccl")
    devices.apply_speed_settings(ascend, cudnn_benchmark=True, allow_tf32=True)
    assert (torch.backends.cudnn.benchmark, npu.matmul.allow_hf32) == (False, True)


def test_the_trainer_applies_the_configured_speed_settings(monkeypatch, tmp_path):
    """train.main hands the config's keys to the device layer (with the defaults base.py documents)."""
    import train

    seen = []
    monkeypatch.setattr(devices, "apply_speed_settings", lambda ctx, benchmark, tf32: seen.append((benchmark, tf32)))
    monkeypatch.setattr(train, "train", lambda *args: {})
    config = tmp_path / "job.py"
    config.write_text("from easydict import EasyDict as edict\nconfig = edict()\nconfig.device = 'cpu'\n"
                      f"config.output = {str(tmp_path / 'out')!r}\n")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert train.main([str(config)]) == 0
    assert train.main([str(config), "--set", "allow_tf32=True", "--set", "cudnn_benchmark=False"]) == 0
    assert seen == [(True, False), (False, True)]


def test_peak_memory_report_on_cuda_reads_the_allocator_and_the_device(monkeypatch):
    # torch.cuda's documented API, patched: max_memory_allocated/reserved and get_device_properties().total_memory.
    from types import SimpleNamespace

    asked = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: asked.append(device) or 9 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 10 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * 2**30))
    ctx = devices.DeviceContext("cuda", torch.device("cuda", 3), 0, 3, 1, "nccl")
    assert device_memory.peak_memory_report(ctx) == ("peak 9.00 GiB allocated (10.00 GiB reserved by the caching "
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
    assert device_memory.out_of_memory(exc) == device_memory.OutOfMemory(memory, size)


def test_other_errors_are_not_out_of_memory_and_collective_failures_are_told_apart():
    assert device_memory.out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert device_memory.out_of_memory(ValueError("CUDA out of memory")) is None
    timeout = RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms "
                           "for recv operation to complete")
    assert devices.collective_failure(timeout) == "timeout"
    assert devices.collective_failure(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                                                   "[127.0.0.1]:5050")) == "peer"
    assert devices.collective_failure(RuntimeError("something else")) is None


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
        devices.setup("cpu", timeout_s=3)
    message = str(caught.value)
    assert re.match(rf"rank 1 of 2 could not join the gloo process group at 127\.0\.0\.1:{port}, "
                    rf"GLOO_SOCKET_IFNAME=lo: \w+: \S", message) and "\n" not in message, message
    assert not dist.is_initialized()
