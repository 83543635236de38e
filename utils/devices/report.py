"""What this machine offers, for ``tools/benchmark.py doctor``: software versions (torch, CUDA, cuDNN, NCCL,
torch_npu, CANN, drivers), local devices, distributed backends and the precisions each device runs natively."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from utils.devices.device import cpu_has_native_bf16

def _npu_module():
    """torch_npu when it is installed (importing it registers ``torch.npu`` and HCCL), else None."""
    try:
        import torch_npu
    except ImportError:
        return None
    return torch_npu


def _first_line(command: list[str]) -> str:
    """The first output line of a vendor tool (nvidia-smi), "" when it is missing or fails."""
    import subprocess

    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = result.stdout.strip().splitlines() if result.returncode == 0 else []
    return lines[0].strip() if lines else ""


def _cann_version(torch_npu, module: str) -> str:
    """CANN (or its driver's) version as torch_npu reports it (``get_cann_version``: CANN >= 8.1.RC1)."""
    for owner in ("torch_npu.npu.utils", "torch_npu.utils"):
        try:
            import importlib

            version = importlib.import_module(owner).get_cann_version(module=module)
        except Exception:  # older torch_npu or CANN: the function is missing or cannot tell
            continue
        if version:
            return str(version)
    return str(getattr(torch.version, "cann", "") or "") if module == "CANN" else ""


def local_device_count(kind: str) -> int:
    """Devices of ``kind`` this node sees (CPU: 1 process)."""
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "npu":
        return torch.npu.device_count() if _npu_module() is not None and torch.npu.is_available() else 0
    return 1


def software_versions() -> list[tuple[str, str]]:
    """(name, version) of Python, torch and what it was built with, the GPU driver, torch_npu and CANN."""
    import platform

    nccl = ""
    if torch.cuda.is_available() and dist.is_nccl_available():
        version = torch.cuda.nccl.version()
        nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    driver = _first_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) \
        if torch.cuda.is_available() else ""
    torch_npu = _npu_module()
    rows = [("python", f"{platform.python_version()} ({platform.machine()}, {platform.system()})"),
            ("torch", f"{torch.__version__} (git {(torch.version.git_version or '?')[:7]})"),
            ("CUDA", f"built with {torch.version.cuda}" if torch.version.cuda else "not in this torch build"),
            ("cuDNN", str(torch.backends.cudnn.version()) if torch.version.cuda and torch.backends.cudnn.is_available()
             else "-"),
            ("NCCL", nccl or "-"),
            ("GPU driver", driver or ("unknown (nvidia-smi gave nothing)" if torch.cuda.is_available() else "-"))]
    if torch_npu is None:
        rows.append(("torch_npu", "not installed"))
    else:
        rows += [("torch_npu", str(getattr(torch_npu, "__version__", "?"))),
                 ("CANN", _cann_version(torch_npu, "CANN") or "unknown (torch_npu does not say)"),
                 ("NPU driver", _cann_version(torch_npu, "DRIVER") or "unknown (torch_npu does not say)")]
    return rows


def local_devices() -> list[tuple[str, str]]:
    """(device, description) of every device this process can train on."""
    rows = [("cpu", f"{os.cpu_count()} logical cores, torch uses {torch.get_num_threads()} threads")]
    for index in range(local_device_count("cuda")):
        props = torch.cuda.get_device_properties(index)
        rows.append((f"cuda:{index}", f"{props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability "
                                      f"{props.major}.{props.minor}"))
    for index in range(local_device_count("npu")):
        try:
            props = torch.npu.get_device_properties(index)
            rows.append((f"npu:{index}", f"{props.name}, {props.total_memory / 2**30:.1f} GiB"))
        except Exception:  # an older torch_npu without device properties
            rows.append((f"npu:{index}", torch.npu.get_device_name(index)))
    return rows


def distributed_backends() -> list[tuple[str, str]]:
    """(backend, whether this machine can use it) for gloo, NCCL, HCCL, MPI and UCC; train.py uses
    BACKENDS[kind]."""
    torch_npu = _npu_module()
    is_hccl_available = getattr(getattr(torch_npu, "distributed", None), "is_hccl_available", None)
    hccl = torch_npu is not None and (is_hccl_available() if is_hccl_available else "hccl" in dist.Backend.backend_list)
    ucc = getattr(dist, "is_ucc_available", lambda: False)()
    return [("gloo", "yes (CPU)" if dist.is_available() and dist.is_gloo_available() else "no"),
            ("nccl", "yes (CUDA)" if dist.is_nccl_available() and local_device_count("cuda") else
             "built in, no CUDA device" if dist.is_nccl_available() else "no"),
            ("hccl", "yes (NPU)" if hccl and local_device_count("npu") else "no"),
            ("mpi", "yes" if dist.is_mpi_available() else "no"), ("ucc", "yes" if ucc else "no")]


def native_precisions() -> list[tuple[str, str]]:
    """(device, which of fp32/fp16/bf16 run natively there); emulated ones are slower than fp32."""
    if cpu_has_native_bf16():
        cpu_bf16 = "bf16 native (AVX512-BF16/AMX)"
    else:
        cpu_bf16 = "bf16 emulated (slower than fp32)"
    rows = [("cpu", f"fp32 native, {cpu_bf16}, fp16 emulated (train.py uses bf16 or fp32 instead)")]
    for index in range(local_device_count("cuda")):
        # Per device from its compute capability (torch.cuda.is_bf16_supported answers for the current device
        # only): bf16 and TF32 tensor cores from sm_80 (Ampere), fp16 tensor cores from sm_70, fp16 math from sm_53.
        major, minor = torch.cuda.get_device_capability(index)
        bf16 = major >= 8
        rows.append((f"cuda:{index}", f"fp32 native{' (TF32 tensor cores)' if major >= 8 else ''}, "
                                      f"fp16 {'native' if (major, minor) >= (5, 3) else 'emulated'}"
                                      f"{' (tensor cores)' if major >= 7 else ''}, "
                                      f"bf16 {'native' if bf16 else 'not native'}"))
    for index in range(local_device_count("npu")):
        bf16 = getattr(torch.npu, "is_bf16_supported", lambda: False)()
        rows.append((f"npu:{index}", f"fp32 native, fp16 native, bf16 {'native' if bf16 else 'not supported'}"))
    return rows
