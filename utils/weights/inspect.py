"""What a backbone file says about itself beyond its network: whether its weights ever saw training data."""
from __future__ import annotations

from collections.abc import Mapping

import torch


def batchnorm_at_init(state: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(BatchNorm layers whose running statistics are still torch's initial values, BatchNorm layers).

    Every training step in train mode moves a BatchNorm's running mean away from 0 and its running
    variance away from 1, so a file where all of them are still there never saw a batch of data:
    a freshly initialised (untrained) network."""
    at_init = total = 0
    for key, mean in state.items():
        if not key.endswith(".running_mean") or key.startswith("logits."):
            continue
        var = state.get(key[: -len("running_mean")] + "running_var")
        if var is None:
            continue
        total += 1
        at_init += bool(torch.all(mean == 0)) and bool(torch.all(var == 1))
    return at_init, total


def file_kind(path: str) -> str:
    """What kind of weights file ``path`` is, in words: an ArcScale training checkpoint (with its step and
    epoch), arcface_torch's training checkpoint, a DDP-wrapped state_dict, or a backbone state_dict (model.pt,
    backbone.pth; with facenet-pytorch's classifier when it carries ``logits.*``)."""
    from utils.run.checkpoint import CHECKPOINT_FORMAT
    from utils.weights.load import CLASSIFIER_PREFIX, WRAPPER_PREFIXES, read_weights_file

    obj = read_weights_file(path)
    if not isinstance(obj, Mapping):
        return type(obj).__name__
    if obj.get("format") == CHECKPOINT_FORMAT:
        return f"ArcScale training checkpoint, step {obj.get('step')}, epoch {obj.get('epoch')}"
    if "state_dict_backbone" in obj:
        return "arcface_torch training checkpoint (state_dict_backbone)"
    keys = [str(key) for key in obj]
    wrapped = next((prefix for prefix in WRAPPER_PREFIXES if keys and all(key.startswith(prefix) for key in keys)), None)
    if wrapped:
        return f"backbone state_dict saved with the '{wrapped}' prefix of its wrapper"
    if any(key.startswith(CLASSIFIER_PREFIX) for key in keys):
        return f"backbone state_dict with a training classifier ({CLASSIFIER_PREFIX}*)"
    return "backbone state_dict"
