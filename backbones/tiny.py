"""``tiny``: a ~20 MMAC stack of MobileFaceNet's conv-BN-PReLU block, for CPU demos and tests
(not an insightface model).

MobileFaceNet costs 0.45 GMAC per 112x112 image, which on a 2-core CPU allows only a few
thousand training images in a few minutes. This network keeps the same interface (112x112 in,
``num_features`` out, BatchNorm1d embedding like the zoo models) at ~1/20 of the cost, so the
README demo trains to a meaningful verification accuracy on a laptop.
"""
from __future__ import annotations

import torch
from torch import nn

from backbones.common import check_input, fp32_region, run_block, trunk_autocast
from backbones.mobilefacenet import ConvBlock

# (out_channels, stride) per conv: 112 -> 56 -> 28 -> 14 -> 14 -> 7
TINY_STAGES = ((16, 2), (32, 2), (64, 2), (64, 1), (128, 2))


class TinyFaceNet(nn.Module):
    """A small CNN (the ``tiny`` backbone) for CPU demos and tests."""

    def __init__(self, num_features: int = 512, fp16: bool = False, gradient_checkpointing: bool = False,
                 dropout: float = 0.0, name: str = "tiny") -> None:
        super().__init__()
        self.name = name
        self.fp16 = fp16
        self.gradient_checkpointing = gradient_checkpointing
        layers, in_channels = [], 3
        for out_channels, stride in TINY_STAGES:
            layers.append(ConvBlock(in_channels, out_channels, kernel=3, stride=stride, padding=1))
            in_channels = out_channels
        self.layers = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features)

    def finetune_stages(self) -> list[list[nn.Module]]:
        """What config key ``freeze_stages`` counts: each of the five convolution blocks, from the input."""
        return [[layer] for layer in self.layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings [N, num_features] of normalised images."""
        check_input(x, self.name)
        use_checkpoint = self.gradient_checkpointing and self.training
        # Same precision rules as the zoo models: fp16 trunk on request, any outer autocast kept,
        # embedding head always float32.
        with trunk_autocast(x, self.fp16):
            for layer in self.layers:
                x = run_block(layer, x, use_checkpoint)
            x = self.dropout(torch.flatten(x, 1))
        with fp32_region(x):
            return self.features(self.fc(x.float()))


def build_tiny(name: str, **kwargs) -> TinyFaceNet:
    """The registered ``tiny`` backbone."""
    return TinyFaceNet(name=name, **kwargs)
