"""Pieces shared by every backbone: precision regions, input checks, gradient checkpointing."""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class BackboneError(ValueError):
    """A bad backbone name, keyword or input; the message is one line for the user."""


def _autocast_available(device_type: str) -> bool:
    is_available = getattr(torch.amp, "is_autocast_available", None)
    if is_available is None:  # older torch: the usual suspects only
        return device_type in ("cpu", "cuda", "npu", "xpu")
    return bool(is_available(device_type))


def trunk_autocast(x: torch.Tensor, fp16: bool) -> ContextManager:
    """fp16 autocast on the input's device when ``fp16``; otherwise leave any outer autocast alone.

    arcface_torch writes ``torch.cuda.amp.autocast(self.fp16)``, which with fp16=False also switches
    OFF a caller's bf16 autocast; entering nothing keeps the trainer's choice in force.
    """
    if not fp16 or not _autocast_available(x.device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, dtype=torch.float16)


def fp32_region(x: torch.Tensor) -> ContextManager:
    """Autocast off: the embedding head runs in float32 whatever the caller's autocast is."""
    if not _autocast_available(x.device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, enabled=False)


def check_input(x: torch.Tensor, network: str, image_size: tuple[int, int] = (112, 112)) -> None:
    """One-line error for a wrong input instead of a shape error deep inside the fc layer."""
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
        return  # exporters trace symbolic shapes; the check would only add warnings
    if not isinstance(x, torch.Tensor):
        raise BackboneError(f"network '{network}': expected a tensor input, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != tuple(image_size):
        raise BackboneError(f"network '{network}': expected input [N, 3, {image_size[0]}, {image_size[1]}], "
                            f"got {list(x.shape)}")
    if not x.is_floating_point():
        raise BackboneError(f"network '{network}': expected a float input normalised to [-1, 1], got {x.dtype} "
                            f"(use dataset.normalize_batch on uint8 images)")


class _RestoreBuffers:
    """Snapshot a module's buffers and put them back on exit.

    Gradient checkpointing runs a block's forward twice; without this, BatchNorm would update its
    running statistics (and num_batches_tracked) twice per step and drift from an unchecked run.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> "_RestoreBuffers":
        self.saved = [(buf, buf.detach().clone()) for buf in self.module.buffers()]
        return self

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for buf, value in self.saved:
                buf.copy_(value)
        self.saved = []


def run_block(block: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """``block(x)``, recomputed in backward instead of stored when ``use_checkpoint``.

    Non-reentrant checkpointing works with DDP (also with unused parameters) and keeps the RNG
    state, so drop-path masks are identical in the recomputation.
    """
    if not (use_checkpoint and torch.is_grad_enabled()):
        return block(x)
    module = block if isinstance(block, nn.Module) else None
    if module is None:
        return checkpoint(block, x, use_reentrant=False)
    return checkpoint(block, x, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _RestoreBuffers(module)))
