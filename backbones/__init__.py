"""Backbone registry: ``get_model(name, **kwargs)`` builds any network arcface_torch ships.

Every model takes float input [N, 3, 112, 112] in [-1, 1] and returns float32 [N, num_features];
state_dicts are key- and shape-identical to insightface's, so published weights load unchanged.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from backbones.common import BackboneError
from backbones.iresnet import IRESNET_LAYERS, build_iresnet
from backbones.mobilefacenet import MBF_VARIANTS, build_mobilefacenet
from backbones.tiny import build_tiny
from backbones.vit import VIT_VARIANTS, build_vit

__all__ = ["BackboneError", "MODEL_NAMES", "get_model"]

COMMON_KWARGS = ("num_features", "dropout", "fp16", "gradient_checkpointing")

# name -> (builder, model-specific keyword arguments, whether the network has a dropout layer)
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], tuple[str, ...], bool]] = {}
for _name in IRESNET_LAYERS:
    _REGISTRY[_name] = (build_iresnet, (), True)
for _name in MBF_VARIANTS:
    _REGISTRY[_name] = (build_mobilefacenet, (), False)
for _name in VIT_VARIANTS:
    _REGISTRY[_name] = (build_vit, ("drop_path_rate", "mask_ratio"), False)
_REGISTRY["tiny"] = (build_tiny, (), True)  # CPU demo/test network, not an insightface model

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def _check_number(name: str, key: str, value: Any, low: float, high: float, integer: bool = False) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not (low <= value <= high):
        kind = "an integer" if integer else "a number"
        raise BackboneError(f"network '{name}': {key} must be {kind} in [{low}, {high}], got {value!r}")


def get_model(name: str, num_features: int = 512, dropout: float = 0.0, fp16: bool = False,
              gradient_checkpointing: bool = False, **kwargs: Any) -> nn.Module:
    """Build backbone ``name`` (see MODEL_NAMES).

    fp16: run the trunk under float16 autocast on the input's device (embedding head stays float32).
    gradient_checkpointing: recompute each block in backward (non-reentrant; DDP-safe).
    ViTs also take drop_path_rate and mask_ratio (defaults from the name, as in arcface_torch).
    """
    if name not in _REGISTRY:
        raise BackboneError(f"unknown network {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    builder, extra_keys, has_dropout = _REGISTRY[name]
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
    return builder(name, num_features=num_features, fp16=bool(fp16),
                   gradient_checkpointing=bool(gradient_checkpointing), **kwargs)
