"""What only an Ascend NPU needs, written against torch_npu's documented API (Ascend/pytorch) and
Ascend ModelZoo's launch conventions; ``device.py`` is the only caller. Nothing here runs on the
machines this project is tested on: the tests patch a stand-in ``torch_npu`` module into
``sys.modules`` (tests/utils/devices/test_ascend.py).

- importing torch_npu, saying why it failed (an installed torch_npu that cannot load its CANN
  libraries is not "no NPU");
- fp16 overflow in saturation mode (Atlas training series, 910A/910 Pro: fp16 overflow becomes
  +-65504, never inf/nan, so finiteness checks cannot see it; torch_npu's GradScaler reads the
  float-status flags instead) and bf16 (Atlas A2/A3, 910B/910_93, have it; 910A does not);
- ModelZoo's ``ASCEND_DEVICE_ID`` / ``RANK_SIZE`` and HCCL's ``HCCL_IF_IP`` / ``HCCL_SOCKET_IFNAME``.
"""
from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import Any

# Device names (torch_npu.npu.get_device_name) of the NPUs with bf16, for torch_npu releases that
# lack torch_npu.npu.is_bf16_supported(): Atlas A2 (Ascend910B1..B4) and A3 (Ascend910_93xx).
BF16_NAME_PREFIXES = ("Ascend910B", "Ascend910_93")


class AscendError(RuntimeError):
    """An NPU launch setting that cannot work as given."""


def import_torch_npu() -> tuple[ModuleType | None, str]:
    """(torch_npu, "") or (None, why): "" when torch_npu is simply not installed."""
    try:
        import torch_npu
    except ModuleNotFoundError as exc:
        if exc.name == "torch_npu":
            return None, ""
        return None, f"torch_npu is installed but failed to import: {_one_line(exc)}"
    except Exception as exc:  # an ImportError/OSError from CANN's libraries, a RuntimeError on a torch mismatch
        return None, f"torch_npu is installed but failed to import: {_one_line(exc)}"
    return torch_npu, ""


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def npu_status() -> tuple[ModuleType | None, str]:
    """(torch_npu, "") when an NPU is usable, else (None, why; "" when torch_npu is not installed)."""
    torch_npu, why = import_torch_npu()
    if torch_npu is None:
        return None, why
    if not torch_npu.npu.is_available():
        visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
        return None, ("torch_npu imported but torch.npu.is_available() is False (no NPU visible"
                      + (f" with ASCEND_RT_VISIBLE_DEVICES={visible!r}" if visible is not None else "")
                      + "; check the driver with npu-smi info and that CANN's set_env.sh was sourced)")
    return torch_npu, ""


def device_index(local_rank: int, local_world_size: int) -> int:
    """The NPU this process uses: ``LOCAL_RANK``, or ModelZoo's ``ASCEND_DEVICE_ID`` for one process per
    node (so several single-card runs land on their own cards, not all on npu:0). With several
    processes per node a different ``ASCEND_DEVICE_ID`` is refused: one value cannot name eight cards."""
    value = os.environ.get("ASCEND_DEVICE_ID")
    if value is None or value == "":
        return local_rank
    if not value.strip().isdigit():
        raise AscendError(f"ASCEND_DEVICE_ID={value!r}: expected a device number such as 0")
    index = int(value)
    if local_world_size > 1 and index != local_rank:
        raise AscendError(f"ASCEND_DEVICE_ID={value} is set but {local_world_size} processes run on this node and "
                          f"each uses npu:<LOCAL_RANK> (this one: LOCAL_RANK={local_rank}); unset ASCEND_DEVICE_ID "
                          f"for multi-card runs (choose cards with ASCEND_RT_VISIBLE_DEVICES)")
    return index


def check_rank_size(world_size: int, local_world_size: int) -> None:
    """ModelZoo scripts export ``RANK_SIZE`` (the number of cards); a value that matches neither the
    launcher's world size nor its processes per node means this is not the run the user set up."""
    value = os.environ.get("RANK_SIZE")
    if value is None or value == "":
        return
    if not value.strip().isdigit():
        raise AscendError(f"RANK_SIZE={value!r}: expected a number of devices such as 8")
    if int(value) not in (world_size, local_world_size):
        raise AscendError(f"RANK_SIZE={value} (Ascend ModelZoo) but this run has {world_size} rank(s), "
                          f"{local_world_size} on this node: launch {value} processes with torchrun "
                          f"--nproc_per_node={value} (bash test/train_full_8p.sh does) or unset RANK_SIZE")


def interface_warning(world_size: int, local_world_size: int) -> str:
    """A warning for several nodes without ``HCCL_IF_IP`` / ``HCCL_SOCKET_IFNAME`` (HCCL then takes its
    root NIC by name order, per CANN's HcclGetRootInfo documentation), else ""."""
    if world_size <= local_world_size or os.environ.get("HCCL_IF_IP") or os.environ.get("HCCL_SOCKET_IFNAME"):
        return ""
    return ("several nodes and neither HCCL_IF_IP nor HCCL_SOCKET_IFNAME is set: HCCL takes the first network "
            "interface by name, which may not reach the other nodes (set one of them, e.g. "
            "bash test/train_full_8p.sh --socket_ifname=eth0)")


def device_name(torch_npu: ModuleType, index: int) -> str:
    """The chip's name, e.g. Ascend910A, Ascend910B3 ("" when torch_npu cannot say)."""
    try:
        return str(torch_npu.npu.get_device_name(index))
    except Exception:  # an old torch_npu without it, or a driver that does not report it
        return ""


def bf16_supported(torch_npu: ModuleType, index: int) -> bool:
    """torch_npu.npu.is_bf16_supported() where torch_npu has it, else the chip name (A2/A3: yes; 910A: no)."""
    query = getattr(torch_npu.npu, "is_bf16_supported", None)
    if query is not None:
        return bool(query())
    return device_name(torch_npu, index).startswith(BF16_NAME_PREFIXES)


def saturation_mode(torch_npu: ModuleType) -> bool:
    """True where fp16 overflow saturates to +-65504 instead of inf/nan. torch_npu releases without
    ``npu.utils.is_support_inf_nan`` predate the INF_NAN mode, so they saturate."""
    query = getattr(torch_npu.npu.utils, "is_support_inf_nan", None)
    return query is None or not query()


def grad_scaler(torch_npu: ModuleType) -> Any:
    """torch_npu's own GradScaler (enabled): in saturation mode it clears the float-status flags in
    ``scale()`` and its unscale reads them (an overflow anywhere since: forward, backward, the head)."""
    return torch_npu.npu.amp.GradScaler(enabled=True)


def scaler_found_overflow(scaler: Any, optimizer: Any) -> bool:
    """Whether torch_npu's GradScaler, in saturation mode, found an overflow when it unscaled
    ``optimizer`` (every rank's verdict: it all-reduces it). False for any other scaler, and in INF_NAN
    mode, where overflow is inf/nan that the trainer's own finite checks see without another host sync."""
    torch_npu = sys.modules.get("torch_npu")
    if torch_npu is None or not isinstance(scaler, torch_npu.npu.amp.GradScaler) or not scaler.is_enabled():
        return False
    if not saturation_mode(torch_npu):
        return False
    # The flags themselves were read and cleared by that unscale; its per-device result is the record
    # (a GradScaler method since torch 1.6, inherited by torch_npu's class).
    found = scaler._found_inf_per_device(optimizer)
    return any(float(value) > 0 for value in found.values())
