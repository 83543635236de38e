"""Load backbone weights from any file users have: model.pt, a DDP state_dict, or a training checkpoint.

Problems are reported in one line (counts and the first few keys per kind) instead of PyTorch's
wall of text, e.g.
``model.pt: 2 missing keys (fc.weight, fc.bias), 1 shape mismatch (features.weight: file [256] vs model [512]) for network 'r50'``.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

SHOWN_KEYS = 3  # keys listed per problem kind; the rest are counted
# Prefixes that wrappers add to every key: DDP / DataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; one line for the user."""


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in obj.items())


def extract_backbone_state(obj: Any, path: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The backbone state_dict inside whatever was saved, and the training config if there is one."""
    config = None
    if isinstance(obj, Mapping) and obj.get("format") == "arcscale-checkpoint":
        state, config = obj.get("backbone"), obj.get("config")
        if not _is_state_dict(state):
            raise CheckpointError(f"{path}: training checkpoint has no usable 'backbone' state_dict")
    elif isinstance(obj, Mapping) and _is_state_dict(obj.get("state_dict_backbone")):
        state = obj["state_dict_backbone"]  # arcface_torch's checkpoint_gpu_<rank>.pt
    elif _is_state_dict(obj):
        state = obj
    else:
        found = f"dict with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{path}: expected a backbone state_dict, a DDP state_dict or an ArcScale training "
                              f"checkpoint, found {found}")
    state = dict(state)
    for prefix in WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state, config if isinstance(config, Mapping) else None


def _listing(keys: list[str], describe=str) -> str:
    shown = ", ".join(describe(key) for key in keys[:SHOWN_KEYS])
    more = f", ... {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return f"({shown}{more})"


def _plural(count: int, singular: str, plural: str) -> str:
    return f"{count} {singular if count == 1 else plural}"


def compare_state_dicts(file_state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor]) -> str:
    """Empty string when keys and shapes agree, else a one-line summary of what differs."""
    missing = [key for key in model_state if key not in file_state]
    unexpected = [key for key in file_state if key not in model_state]
    mismatched = [key for key in model_state
                  if key in file_state and file_state[key].shape != model_state[key].shape]

    def shape_of(key: str) -> str:
        return f"{key}: file {list(file_state[key].shape)} vs model {list(model_state[key].shape)}"

    parts = []
    if missing:
        parts.append(f"{_plural(len(missing), 'missing key', 'missing keys')} {_listing(missing)}")
    if unexpected:
        parts.append(f"{_plural(len(unexpected), 'unexpected key', 'unexpected keys')} {_listing(unexpected)}")
    if mismatched:
        parts.append(f"{_plural(len(mismatched), 'shape mismatch', 'shape mismatches')} "
                     f"{_listing(mismatched, shape_of)}")
    return ", ".join(parts)


def _embedding_hint(file_state: Mapping[str, torch.Tensor], model: nn.Module) -> str:
    """Point at num_features when only the embedding size differs (a common porting slip)."""
    last_bn = [name for name, module in model.named_modules() if isinstance(module, nn.BatchNorm1d)]
    if not last_bn:
        return ""
    key = f"{last_bn[-1]}.bias"
    model_value = model.state_dict().get(key)
    if key in file_state and model_value is not None and file_state[key].shape != model_value.shape:
        return f"; the file's embedding size is {file_state[key].shape[0]}: pass num_features={file_state[key].shape[0]}"
    return ""


def _load_failure(exc: BaseException) -> str:
    """The informative sentence of torch.load's multi-paragraph error, plus what to do about it."""
    root = exc.__cause__ or exc.__context__ or exc
    text = " ".join(str(root).split()) or type(root).__name__
    sentence = text.split(". ")[0][:200]
    if "Unsupported global" in text:
        return (f"{sentence} (the file pickles Python objects, e.g. a whole model; load it once with "
                f"weights_only=False where you trust it and save model.state_dict() instead)")
    return f"{type(root).__name__}: {sentence}"


def load_backbone(path: str, name: str | None = None, model: nn.Module | None = None, strict: bool = True,
                  map_location: str | torch.device = "cpu", **model_kwargs: Any) -> nn.Module:
    """Load backbone weights from ``path`` into ``model``, or into a new ``get_model(name, **model_kwargs)``.

    With neither, the network (and embedding size) come from a training checkpoint's config.
    A model built here is returned in eval mode; a given ``model`` keeps its mode. ``strict=False``
    loads every key whose name and shape fit and logs what did not.
    """
    if model is not None and model_kwargs:
        raise CheckpointError(f"{path}: model keyword arguments {sorted(model_kwargs)} are only used when "
                              f"load_backbone builds the model (name=...), not with model=...")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling refused, truncated or not a torch file
        raise CheckpointError(f"{path}: cannot read with torch.load(weights_only=True): {_load_failure(exc)}") from exc
    file_state, config = extract_backbone_state(obj, path)

    built_here = model is None
    if built_here:
        if name is None:
            if not config or not config.get("network"):
                raise CheckpointError(f"{path}: no network name given and the file has no training config; "
                                      f"pass name= (e.g. 'r50') or model=")
            name = config["network"]
            model_kwargs.setdefault("num_features", config.get("embedding_size", 512))
        from backbones import get_model  # the registry imports torch models; keep this module light
        model = get_model(name, **model_kwargs)
    label = name or getattr(model, "name", None) or type(model).__name__

    model_state = model.state_dict()
    report = compare_state_dicts(file_state, model_state)
    if report and strict:
        raise CheckpointError(f"{path}: {report} for network '{label}'{_embedding_hint(file_state, model)}")
    if report:
        logger.warning("%s: loading non-strictly, skipped %s for network '%s'", path, report, label)
    fitting = {key: value for key, value in file_state.items()
               if key in model_state and value.shape == model_state[key].shape}
    model.load_state_dict(fitting, strict=False)
    if built_here:
        model.eval()
    logger.info("loaded %d tensors from %s into network '%s'", len(fitting), path, label)
    return model
