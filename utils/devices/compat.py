"""What differs between the oldest torch this project supports (2.1, the torch that common torch_npu
stacks pin) and the newest: each name here uses torch's own API where it exists and an equivalent
otherwise, so the rest of the code calls one spelling. On current torch every function is the plain
torch call (same behaviour, same results).

| here | torch >= | before that |
| --- | --- | --- |
| ``grad_scaler`` | 2.3 (``torch.amp.GradScaler(device)``) | ``torch.cuda.amp.GradScaler`` (also for a disabled scaler on any device); an enabled scaler on CPU needs 2.3 |
| ``total_norm`` | 2.6 (``torch.nn.utils.get_total_norm``) | the same norm of norms, computed here |
| ``process_group_device_id`` | 2.3 (``init_process_group(device_id=...)``) | no argument |
| ``onnx_export_kwargs`` | 2.5 (``torch.onnx.export(dynamo=False)``) | no argument (the TorchScript exporter was the only one) |
| ``own_session_under_torchrun`` | torchrun starts each rank in a session of its own (2.13 does) | the rank leaves torchrun's process group itself (2.1) |
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Iterable

import torch
import torch.distributed as dist

GRAD_SCALER_DEVICE_ARG = hasattr(torch.amp, "GradScaler")


def grad_scaler(device_type: str, enabled: bool, **options: Any) -> Any:
    """A GradScaler for ``device_type`` (``torch.amp.GradScaler``; ``torch.cuda.amp.GradScaler`` before
    torch 2.3, which serves CUDA and any disabled scaler). ``options``: init_scale, growth_interval..."""
    if GRAD_SCALER_DEVICE_ARG:
        return torch.amp.GradScaler(device_type, enabled=enabled, **options)
    if enabled and device_type != "cuda":
        raise RuntimeError(f"an enabled GradScaler on '{device_type}' needs torch >= 2.3 (this is torch "
                           f"{torch.__version__}); the trainer never asks for one there (fp16 on CPU falls back)")
    return torch.cuda.amp.GradScaler(enabled=enabled, **options)


def total_norm(tensors: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The ``norm_type`` norm of all ``tensors`` together (torch.nn.utils.get_total_norm)."""
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:
        return get_total_norm(tensors, norm_type)
    tensors = [tensor for tensor in tensors if tensor is not None]
    if not tensors:
        return torch.tensor(0.0)
    norms = [torch.linalg.vector_norm(tensor, norm_type) for tensor in tensors]
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([norm.to(device) for norm in norms]), norm_type)


def process_group_device_id(device: torch.device) -> dict[str, torch.device]:
    """``{"device_id": device}`` for init_process_group where torch takes it (2.3+: binds the process
    group to this rank's accelerator, so barriers and NCCL's first communicator need no guess), else {}.
    Never for CPU (gloo has no device to bind)."""
    if device.type == "cpu" or "device_id" not in inspect.signature(dist.init_process_group).parameters:
        return {}
    return {"device_id": device}


def onnx_export_kwargs() -> dict[str, bool]:
    """``{"dynamo": False}`` where torch.onnx.export has the dynamo exporter (2.5+): the TorchScript
    exporter, which needs no onnxscript; {} before (it was the only exporter)."""
    return {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}


def own_session_under_torchrun() -> None:
    """Put this rank in a session of its own when torchrun did not (torch 2.1's torchrun leaves its ranks
    in its own process group; 2.13's starts each with ``start_new_session``). A terminal's Ctrl-C goes to
    the foreground process group: in torchrun's group it reached every rank directly *and* again through
    torchrun's forwarding, a "second" SIGINT that stops without a checkpoint. A no-op where the rank
    already leads its session, and outside torchrun."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not hasattr(os, "setsid") or os.getsid(0) == os.getpid():
        return
    try:
        os.setsid()
    except OSError:  # already a process-group leader: started deliberately that way, leave it
        pass
