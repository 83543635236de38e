"""Backbone weights from any file users have: model.pt, a DDP state_dict, or a training checkpoint.

Problems are reported in one line (counts and the first few keys per kind) instead of PyTorch's
wall of text, e.g.
``model.pt: 2 missing keys (fc.weight, fc.bias), 1 shape mismatch (features.weight: file [256] vs model [512]) for network 'r50'``.
"""
from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from utils.run.checkpoint import CHECKPOINT_FORMAT, CheckpointError, describe_load_failure

logger = logging.getLogger(__name__)

SHOWN_KEYS = 3  # keys listed per problem kind; the rest are counted
# Prefixes that wrappers add to every key: DDP / DataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# facenet-pytorch's released files (vggface2.pt, casia-webface.pt) carry their training classifier.
CLASSIFIER_PREFIX = "logits."


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in obj.items())


def extract_backbone_state(obj: Any, path: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The backbone state_dict inside whatever was saved, and the training config if there is one."""
    config = None
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
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


def _holder_hint(file_state: Mapping[str, torch.Tensor], config: Mapping | None, label: str, model: nn.Module) -> str:
    """What a file that does not fit ``label`` holds: its network (the training config's, else the
    registered network with its keys and shapes) and embedding size; else the embedding-size hint."""
    holders = [str(config["network"])] if config and config.get("network") else matching_networks(file_state)
    if holders and label not in holders:
        size = (config or {}).get("embedding_size") or embedding_size_of(file_state)
        return f"; the file looks like network '{holders[0]}' with embedding size {size}"
    return _embedding_hint(file_state, model)


def split_classifier(file_state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(embedding-network state, ``{"weight", "bias"}`` of a ``logits.*`` classifier the model lacks, or None)."""
    extra = [key for key in file_state if key.startswith(CLASSIFIER_PREFIX) and key not in model_state]
    if not extra:
        return dict(file_state), None
    classifier = {key[len(CLASSIFIER_PREFIX):]: file_state[key] for key in extra}
    return {key: value for key, value in file_state.items() if key not in extra}, classifier


def load_backbone(path: str, name: str | None = None, model: nn.Module | None = None, strict: bool = True,
                  map_location: str | torch.device = "cpu", return_classifier: bool = False,
                  **model_kwargs: Any) -> nn.Module | tuple[nn.Module, dict[str, torch.Tensor] | None]:
    """Load backbone weights from ``path`` into ``model``, or into a new ``get_model(name, **model_kwargs)``.

    With neither, the network (and embedding size) come from a training checkpoint's config.
    A model built here is returned in eval mode; a given ``model`` keeps its mode. ``strict=False``
    loads every key whose name and shape fit and logs what did not. A ``logits.*`` classifier the
    model does not have (facenet-pytorch's released files) is not part of the embedding network:
    with ``return_classifier`` the result is ``(model, {"weight": ..., "bias": ...} or None)``,
    otherwise the classifier is dropped with one log line.
    """
    if model is not None and model_kwargs:
        raise CheckpointError(f"{path}: model keyword arguments {sorted(model_kwargs)} are only used when "
                              f"load_backbone builds the model (name=...), not with model=...")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling refused, truncated or not a torch file
        raise CheckpointError(f"{path}: cannot read with torch.load(weights_only=True): {describe_load_failure(exc)}") from exc
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
    file_state, classifier = split_classifier(file_state, model_state)
    if classifier is not None and not return_classifier:
        shapes = ", ".join(f"{CLASSIFIER_PREFIX}{key} {list(value.shape)}" for key, value in classifier.items())
        logger.info("%s: dropped the file's classifier (%s): not part of the embedding network", path, shapes)
    report = compare_state_dicts(file_state, model_state)
    if report and strict:
        raise CheckpointError(f"{path}: {report} for network '{label}'{_holder_hint(file_state, config, label, model)}")
    if report:
        logger.warning("%s: loading non-strictly, skipped %s for network '%s'", path, report, label)
    fitting = {key: value for key, value in file_state.items()
               if key in model_state and value.shape == model_state[key].shape}
    model.load_state_dict(fitting, strict=False)
    if built_here:
        model.eval()
    logger.info("loaded %d tensors from %s into network '%s'", len(fitting), path, label)
    return (model, classifier) if return_classifier else model


# ----------------------------------------------------------------------------- what a file holds
# The command-line tools (eval.verification, eval.ijb, tools/torch2onnx.py, tools/inference.py) ask the
# file before they ask the user: a training checkpoint names its network and embedding size in its
# config; a bare model.pt is matched against every registered network's keys and shapes.

class _SkipInitOnMeta(TorchFunctionMode):
    """In-place initialisers (normal_, uniform_, ...) on meta tensors do nothing: meta tensors hold no
    data, and torch implements some of them on meta through decompositions that import torch._dynamo
    (seconds) on first use."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            first = next((value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)), None)
            if first is not None and first.is_meta:
                return first
        return func(*args, **kwargs)


def _comparable(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    # BatchNorm counters are absent from some exported files; a training classifier is not the network.
    return {key: tuple(value.shape) for key, value in state.items()
            if not key.endswith("num_batches_tracked") and not key.startswith("logits.")}


@functools.lru_cache(maxsize=None)
def network_signature(name: str, num_features: int = 512) -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``get_model(name, num_features=...)``, built on the meta device (no memory, ~0.1 s)."""
    from backbones import get_model

    with torch.device("meta"), _SkipInitOnMeta():
        model = get_model(name, num_features=num_features)
    return _comparable(model.state_dict())


def embedding_size_of(state: Mapping[str, torch.Tensor]) -> int | None:
    """Embedding size of a backbone state_dict: the length of its last BatchNorm's running mean.

    Every registered network ends in a BatchNorm over the embedding (insightface's ``features``)."""
    last = [key for key, value in state.items() if key.endswith(".running_mean") and value.dim() == 1
            and not key.startswith("logits.")]
    return int(state[last[-1]].shape[0]) if last else None


def matching_networks(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Registered networks whose keys and shapes equal the state_dict's (variants differing only in
    training-time settings, e.g. vit_t and vit_t_dp005_mask0, share weights and are all listed)."""
    from backbones import MODEL_NAMES

    embedding_size = embedding_size_of(state)
    if embedding_size is None:
        return []
    wanted = _comparable(state)
    found = []
    for name in MODEL_NAMES:
        try:
            # Key names do not depend on the embedding size: compare them with the (cached) default build
            # first, so only real candidates are built again at the file's size.
            if set(network_signature(name)) == set(wanted) and network_signature(name, embedding_size) == wanted:
                found.append(name)
        except Exception as exc:  # a network that cannot be built at this size is not a match
            logger.debug("cannot build %s with embedding size %d: %s", name, embedding_size, exc)
    return found


def guess_network(state: Mapping[str, torch.Tensor]) -> str | None:
    """The registered network whose keys and shapes equal the state_dict's (first variant), or None."""
    found = matching_networks(state)
    return found[0] if found else None


def closest_network(state: Mapping[str, torch.Tensor]) -> tuple[str, float] | None:
    """(name, share of keys in common) of the registered network nearest by key names; None if under half."""
    from backbones import MODEL_NAMES

    keys = set(_comparable(state))
    best = None
    for name in MODEL_NAMES:
        try:
            theirs = set(network_signature(name))
        except Exception:
            continue
        score = len(keys & theirs) / max(1, len(keys | theirs))
        if best is None or score > best[1]:
            best = (name, score)
    return best if best and best[1] >= 0.5 else None


def read_backbone_state(path: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(backbone state_dict, training config or None) of a file; tensors memory-mapped, so a training
    checkpoint with a large head costs no memory here."""
    return extract_backbone_state(read_weights_file(path), path)


def read_weights_file(path: str) -> Any:
    """What ``torch.load(weights_only=True)`` reads from a weights file, tensors memory-mapped where the
    format allows; a CheckpointError (one line) for a missing or unreadable file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) torch files cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read with torch.load(weights_only=True): {describe_load_failure(exc)}") from exc
    return obj


def _describe(path: str, state: Mapping[str, torch.Tensor], config: Mapping | None,
              guess: bool = True) -> tuple[str | None, int]:
    embedding_size = embedding_size_of(state)
    if config and config.get("network"):
        return str(config["network"]), int(config.get("embedding_size") or embedding_size or 512)
    if embedding_size is None:
        raise CheckpointError(f"{path}: no BatchNorm running statistics in the file, cannot tell its embedding "
                              f"size; is it a backbone state_dict?")
    return (guess_network(state) if guess else None), embedding_size


def describe_backbone_file(path: str) -> tuple[str | None, int]:
    """(network name or None when no registered network matches, embedding size) of a backbone file."""
    state, config = read_backbone_state(path)
    return _describe(path, state, config)


def load_backbone_file(path: str, network: str | None = None, embedding_size: int | None = None,
                       map_location: str | torch.device = "cpu") -> tuple[nn.Module, str, int]:
    """(model in eval mode, network, embedding size) for a file: what is not given comes from the file.

    A wrong ``network`` ends in a CheckpointError that says which network the file looks like."""
    state, config = read_backbone_state(path)
    # Matching against every registered network costs ~2 s: only when the name is needed or a load failed.
    file_network, file_embedding = _describe(path, state, config, guess=network is None)
    if network is None:
        if file_network is None:
            near = closest_network(state)
            hint = f" (closest: '{near[0]}', {near[1]:.0%} of the keys in common)" if near else ""
            raise CheckpointError(f"{path}: the file has no training config and its keys and shapes match no "
                                  f"registered network{hint}; pass the network name (--network)")
        network = file_network
    embedding_size = int(embedding_size or file_embedding)
    del state  # memory-mapped; load_backbone reads the file again in full
    # A file of another network, or another embedding size, says what it holds (load_backbone).
    model = load_backbone(path, name=network, map_location=map_location, num_features=embedding_size)
    logger.info("%s: network '%s', embedding size %d", path, network, embedding_size)
    return model, network, embedding_size
