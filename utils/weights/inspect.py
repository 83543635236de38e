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
