"""``head = "softmax"``: a plain linear classifier with bias plus cross-entropy (facenet-pytorch's
``logits`` layer, ``nn.Linear(512, num_classes)``), for fine-tuning, next to the Partial FC heads.

Distributed: the classifier is REPLICATED on every rank (unlike Partial FC's sharded centers), so its
gradients must be all-reduced like the backbone's. The trainer should put it under the same DDP
wrapper as the backbone: ``DDP(BackboneWithHead(backbone, head))`` with the sum hook. Gradient
convention, matching that hook (utils/device.py's sum_allreduce_hook SUMS over ranks): each rank's
loss has the gradient of (sum of its rows' cross-entropy) / (global row count), so the summed
gradients are those of the global-batch mean, as one process with the W*B batch would get; the
returned VALUE is the global mean (one scalar all-reduce), so every rank logs the same number.
"""
from __future__ import annotations

import logging
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from utils.devices import distributed as dist_utils

logger = logging.getLogger(__name__)

LOGITS_KEYS = ("logits.weight", "logits.bias")


class SoftmaxHeadError(ValueError):
    """A bad softmax-head setting, input or checkpoint; the message is one line."""


class SoftmaxHead(nn.Module):
    """``loss = SoftmaxHead(embedding_size, num_classes)(embeddings [N, D], labels [N])``: cross-entropy of
    ``embeddings @ W^T + b`` (raw, un-normalised embeddings, as facenet-pytorch's classify mode)."""

    def __init__(self, embedding_size: int, num_classes: int) -> None:
        super().__init__()
        if int(embedding_size) < 1 or int(num_classes) < 2:
            raise SoftmaxHeadError(f"softmax head: embedding_size={embedding_size} num_classes={num_classes}, "
                                   f"expected >= 1 and >= 2")
        self.logits = nn.Linear(int(embedding_size), int(num_classes))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Global-batch mean cross-entropy (value); gradient convention in the module docstring."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.logits.in_features:
            raise SoftmaxHeadError(f"softmax head: embeddings must be [N, {self.logits.in_features}], got "
                                   f"{tuple(embeddings.shape)}")
        if labels.shape != (embeddings.shape[0],):
            raise SoftmaxHeadError(f"softmax head: labels must be [N={embeddings.shape[0]}], got {tuple(labels.shape)}")
        labels = labels.to(embeddings.device).long()
        num_classes = self.logits.out_features
        if labels.numel():
            low, high = torch.stack(torch.aminmax(labels)).tolist()  # one sync; CUDA would only device-assert
            if low < 0 or high >= num_classes:
                raise SoftmaxHeadError(f"softmax head: label {low if low < 0 else high} out of range, expected "
                                       f"0 <= label < num_classes={num_classes}")
        # fp32 head whatever the trunk's autocast says (as for Partial FC).
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            local_sum = F.cross_entropy(self.logits(embeddings.float()), labels, reduction="sum")
        if not dist_utils.is_distributed():
            return local_sum / max(1, labels.numel())
        totals = torch.stack([local_sum.detach(), local_sum.new_tensor(float(labels.numel()))])
        dist_utils.all_reduce_(totals)
        count = totals[1].clamp_min(1.0)
        scaled = local_sum / count
        # Value: the global mean; gradient: this rank's share (the DDP hook sums the shares).
        return scaled + (totals[0] / count - scaled).detach()

    @torch.no_grad()
    def load_logits(self, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> bool:
        """Copy ``logits.weight`` / ``logits.bias`` from a facenet-style state dict when the shapes match.

        Returns True when copied; False (with a log line) when the checkpoint was trained on another
        number of classes, so the classifier keeps its fresh initialisation (the usual fine-tuning case).
        """
        # facenet-pytorch names, DataParallel's "module." names, or load_backbone(return_classifier=True)'s
        # {"weight", "bias"}.
        found = {}
        for key in LOGITS_KEYS:
            candidates = (key, "module." + key, key.split(".", 1)[1])
            match = next((name for name in candidates if name in state), None)
            if match is None:
                raise SoftmaxHeadError(f"{source}: no '{key}' tensor (expected a facenet-pytorch InceptionResnetV1 "
                                       f"state dict trained with classify=True)")
            found[key] = state[match]
        weight, bias = found["logits.weight"], found["logits.bias"]
        if tuple(weight.shape) != tuple(self.logits.weight.shape) or tuple(bias.shape) != tuple(self.logits.bias.shape):
            logger.warning("%s: logits.weight %s does not match this head's %s (num_classes, embedding_size); the "
                           "classifier keeps its fresh initialisation", source, tuple(weight.shape),
                           tuple(self.logits.weight.shape))
            return False
        self.logits.weight.copy_(weight)
        self.logits.bias.copy_(bias)
        logger.info("%s: classifier initialised from logits.weight/logits.bias %s", source, tuple(weight.shape))
        return True


class BackboneWithHead(nn.Module):
    """Backbone + replicated head as one module, so one DDP wrapper all-reduces both; ``forward(images,
    labels) -> (loss, embeddings)``. The backbone's own state_dict stays the exported ``model.pt``."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss of the batch and the embeddings it came from."""
        embeddings = self.backbone(images)
        return self.head(embeddings, labels), embeddings
