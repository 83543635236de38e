"""Backbone registry: ``get_model(name, **kwargs)`` builds any network arcface_torch ships.

Every model returns float32 [N, num_features] and carries its input convention as
``model.input_spec`` (read it with ``input_spec(model)``, turn uint8 images into model input with
``normalize(images, spec)``): insightface's networks take 112x112 ``(x - 127.5) / 127.5``,
``inception_resnet_v1`` takes 160x160 ``(x - 127.5) / 128``. State dicts are key- and shape-identical
to insightface's (facenet-pytorch's for inception_resnet_v1), so published weights load unchanged.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from backbones.common import ARCFACE_INPUT, FACENET_INPUT, BackboneError, InputSpec, input_spec, normalize
from backbones.inception_resnet_v1 import build_inception_resnet_v1
from backbones.iresnet import IRESNET_LAYERS, build_iresnet
from backbones.mobilefacenet import MBF_VARIANTS, build_mobilefacenet
from backbones.tiny import build_tiny
from backbones.vit import VIT_VARIANTS, build_vit

__all__ = ["ARCFACE_INPUT", "FACENET_INPUT", "BackboneError", "InputSpec", "MODEL_NAMES", "get_model",
           "input_spec", "normalize"]

COMMON_KWARGS = ("num_features", "dropout", "fp16", "gradient_checkpointing")

# name -> (builder, model-specific keyword arguments, default dropout or None without a dropout layer)
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], tuple[str, ...], float | None]] = {}
for _name in IRESNET_LAYERS:
    _REGISTRY[_name] = (build_iresnet, (), 0.0)
for _name in MBF_VARIANTS:
    _REGISTRY[_name] = (build_mobilefacenet, (), None)
for _name in VIT_VARIANTS:
    _REGISTRY[_name] = (build_vit, ("drop_path_rate", "mask_ratio"), None)
_REGISTRY["inception_resnet_v1"] = (build_inception_resnet_v1, ("num_classes",), 0.6)  # FaceNet (facenet-pytorch)
_REGISTRY["tiny"] = (build_tiny, (), 0.0)  # CPU demo/test network, not an insightface model

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def _check_number(name: str, key: str, value: Any, low: float, high: float, integer: bool = False) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not (low <= value <= high):
        kind = "an integer" if integer else "a number"
        raise BackboneError(f"network '{name}': {key} must be {kind} in [{low}, {high}], got {value!r}")


def get_model(name: str, num_features: int = 512, dropout: float | None = None, fp16: bool = False,
              gradient_checkpointing: bool = False, **kwargs: Any) -> nn.Module:
    """Build backbone ``name`` (see MODEL_NAMES).

    fp16: run the trunk under float16 autocast on the input's device (embedding head stays float32).
    gradient_checkpointing: recompute each block in backward (non-reentrant; DDP-safe).
    dropout: before the embedding layer; None = the network's default (0.6 for inception_resnet_v1, else 0).
    ViTs also take drop_path_rate and mask_ratio (defaults from the name, as in arcface_torch);
    inception_resnet_v1 takes num_classes (facenet-pytorch's ``logits`` classifier, see its ``classify``).
    The model's ``input_spec`` says which images it takes (see :func:`normalize`).
    """
    if name not in _REGISTRY:
        raise BackboneError(f"unknown network {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    builder, extra_keys, default_dropout = _REGISTRY[name]
    has_dropout = default_dropout is not None
    if dropout is None:
        dropout = default_dropout or 0.0
    unknown = sorted(set(kwargs) - set(extra_keys))
    if unknown:
        accepted = ", ".join(COMMON_KWARGS + extra_keys)
        raise BackboneError(f"network '{name}': unknown keyword argument(s) {', '.join(unknown)}; accepted: {accepted}")
    _check_number(name, "num_features", num_features, 1, 1 << 16, integer=True)
    _check_number(name, "dropout", dropout, 0.0, 1.0)
    for key in ("drop_path_rate", "mask_ratio"):
        if kwargs.get(key) is not None:
            _check_number(name, key, kwargs[key], 0.0, 0.99)
    if dropout and not has_dropout:
        raise BackboneError(f"network '{name}' has no dropout layer (arcface_torch ignores the setting); "
                            f"set dropout=0.0, got {dropout}")
    if has_dropout:
        kwargs["dropout"] = float(dropout)
    model = builder(name, num_features=num_features, fp16=bool(fp16),
                    gradient_checkpointing=bool(gradient_checkpointing), **kwargs)
    if not isinstance(getattr(model, "input_spec", None), InputSpec):
        model.input_spec = ARCFACE_INPUT  # insightface's networks: 112x112, (x - 127.5) / 127.5
    return model
