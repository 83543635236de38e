"""Pieces shared by every backbone: input convention, precision regions, input checks, gradient checkpointing."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Mapping

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


class BackboneError(ValueError):
    """A bad backbone name, keyword or input; the message is one line for the user."""


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: RGB float [N, 3, H, W] made from uint8 pixels as ``(pixel - mean) / std``."""

    image_size: tuple[int, int] = (112, 112)
    mean: float = 127.5
    std: float = 127.5

    def __post_init__(self) -> None:
        size = tuple(self.image_size) if isinstance(self.image_size, (tuple, list)) else ()
        if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
            raise BackboneError(f"InputSpec: image_size must be (height, width) positive integers, "
                                f"got {self.image_size!r}")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise BackboneError(f"InputSpec: {key} must be a finite number, got {value!r}")
        if self.std <= 0:
            raise BackboneError(f"InputSpec: std must be positive, got {self.std!r}")
        object.__setattr__(self, "image_size", size)
        object.__setattr__(self, "mean", float(self.mean))
        object.__setattr__(self, "std", float(self.std))

    def to_metadata(self) -> dict[str, str]:
        """String key/values for file metadata (ONNX metadata_props); read back by :meth:`from_metadata`."""
        return {"input_height": str(self.image_size[0]), "input_width": str(self.image_size[1]),
                "input_mean": repr(self.mean), "input_std": repr(self.std)}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], source: str = "metadata") -> "InputSpec":
        """The spec written by :meth:`to_metadata`; files without it get insightface's convention."""
        if "input_height" not in metadata and "input_mean" not in metadata:
            return ARCFACE_INPUT
        default = ARCFACE_INPUT
        try:
            height = int(metadata.get("input_height", default.image_size[0]))
            width = int(metadata.get("input_width", default.image_size[1]))
            mean = float(metadata.get("input_mean", default.mean))
            std = float(metadata.get("input_std", default.std))
        except ValueError as exc:
            raise BackboneError(f"{source}: unreadable input convention in the metadata ({exc})") from None
        return cls((height, width), mean, std)

    def describe(self) -> str:
        """``160x160, (x - 127.5) / 128``: for log lines and CLI output."""
        return f"{self.image_size[0]}x{self.image_size[1]}, (x - {self.mean:g}) / {self.std:g}"


# insightface's models (iresnet, mbf, ViT): ((x / 255) - 0.5) / 0.5 on 112x112 crops.
ARCFACE_INPUT = InputSpec((112, 112), 127.5, 127.5)
# facenet-pytorch's InceptionResnetV1: fixed_image_standardization on 160x160 crops.
FACENET_INPUT = InputSpec((160, 160), 127.5, 128.0)


def declared_input_spec(model: Any) -> InputSpec | None:
    """``model.input_spec`` through DDP/DataParallel (``.module``) and torch.compile (``._orig_mod``)
    wrappers; None when the model declares none."""
    for _ in range(8):  # wrappers nest at most a few deep (compile(DDP(model)))
        spec = getattr(model, "input_spec", None)
        if isinstance(spec, InputSpec):
            return spec
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return None


def input_spec(model: Any) -> InputSpec:
    """The input convention of ``model`` (see :func:`declared_input_spec`); models that declare none
    follow insightface's (112x112, 127.5/127.5)."""
    return declared_input_spec(model) or ARCFACE_INPUT


def normalize(images: torch.Tensor, spec: InputSpec, resize: bool = False) -> torch.Tensor:
    """uint8 RGB [N, 3, H, W] -> float32 model input ``(pixel - mean) / std`` on the tensor's device.

    With ``resize``, images of another size are bilinearly resized to ``spec.image_size`` (antialiased
    when shrinking); without it a size mismatch is an error.
    """
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 \
            or images.shape[1] != 3:
        what = f"{images.dtype} {list(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise BackboneError(f"normalize: expected uint8 RGB images [N, 3, H, W], got {what}")
    size = tuple(images.shape[-2:])
    if size != spec.image_size and not resize:
        raise BackboneError(f"normalize: images are {size[0]}x{size[1]}, the model expects "
                            f"{spec.image_size[0]}x{spec.image_size[1]}")
    x = images.float()
    if spec.mean == spec.std == 127.5:
        # insightface's exact order of operations ((x / 255) - 0.5) / 0.5, so embeddings are bit-identical
        # to arcface_torch's; (x - 127.5) / 128 (facenet-pytorch's) is already exact in float32.
        x = x.div_(255).sub_(0.5).div_(0.5)
    else:
        x = x.sub_(spec.mean).div_(spec.std)
    if size != spec.image_size:
        shrink = size[0] > spec.image_size[0] or size[1] > spec.image_size[1]
        x = F.interpolate(x, size=spec.image_size, mode="bilinear", align_corners=False, antialias=shrink)
    return x


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
                            f"(use backbones.normalize on uint8 images)")


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
