"""Improved ResNet (iresnet18..200) with insightface arcface_torch's exact state_dict layout.

Block order is pre-activation style: bn1 -> conv1(3x3) -> bn2 -> prelu -> conv2(3x3, stride) -> bn3,
plus the (possibly downsampled) identity, with no activation after the addition.
"""
from __future__ import annotations

import torch
from torch import nn

from backbones.common import check_input, fp32_region, run_block, trunk_autocast

# Blocks per stage; the stage widths are always 64, 128, 256, 512.
IRESNET_LAYERS = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}
STAGE_WIDTHS = (64, 128, 256, 512)
BN_EPS = 1e-5
FEATURE_MAP = 7  # 112 / 2**4


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Residual unit; a stage's first block halves the resolution and owns a 1x1 downsample."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=BN_EPS)
        self.conv1 = _conv3x3(in_channels, channels)
        self.bn2 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.prelu = nn.PReLU(channels)
        self.conv2 = _conv3x3(channels, channels, stride)
        self.bn3 = nn.BatchNorm2d(channels, eps=BN_EPS)
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(channels, eps=BN_EPS),
            )
        else:
            self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activation basic block with the (possibly downsampled) input added."""
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        out += identity  # in place: BN backward keeps its input, not its output, so this is safe
        return out


class IResNet(nn.Module):
    """iresnet trunk + arcface_torch embedding head (bn2 -> dropout -> fc -> features BN1d)."""

    def __init__(self, layers: tuple[int, int, int, int], num_features: int = 512, dropout: float = 0.0,
                 fp16: bool = False, gradient_checkpointing: bool = False, name: str = "iresnet") -> None:
        super().__init__()
        self.name = name
        self.fp16 = fp16
        self.gradient_checkpointing = gradient_checkpointing
        self.conv1 = nn.Conv2d(3, STAGE_WIDTHS[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0], eps=BN_EPS)
        self.prelu = nn.PReLU(STAGE_WIDTHS[0])
        in_channels = STAGE_WIDTHS[0]
        for stage_index, (num_blocks, width) in enumerate(zip(layers, STAGE_WIDTHS), start=1):
            blocks = [IBasicBlock(in_channels, width, stride=2)]
            blocks += [IBasicBlock(width, width) for _ in range(num_blocks - 1)]
            setattr(self, f"layer{stage_index}", nn.Sequential(*blocks))
            in_channels = width
        self.bn2 = nn.BatchNorm2d(in_channels, eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_channels * FEATURE_MAP * FEATURE_MAP, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=BN_EPS)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # The embedding BN only shifts: its scale stays 1 (saved in the state_dict, never trained).
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad = False

    def finetune_stages(self) -> list[list[nn.Module]]:
        """What config key ``freeze_stages`` counts, from the input: the stem with layer1, layer2, layer3, layer4."""
        return [[self.conv1, self.bn1, self.prelu, self.layer1], [self.layer2], [self.layer3], [self.layer4]]

    def stages(self) -> list[nn.Sequential]:
        """The four residual stages, in order."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings [N, num_features] of normalised images [N, 3, 112, 112]."""
        check_input(x, self.name)
        use_checkpoint = self.gradient_checkpointing and self.training
        with trunk_autocast(x, self.fp16):
            x = self.prelu(self.bn1(self.conv1(x)))
            for stage in self.stages():
                for block in stage:
                    x = run_block(block, x, use_checkpoint)
            x = self.bn2(x)
            x = torch.flatten(x, 1)
            x = self.dropout(x)
        with fp32_region(x):
            return self.features(self.fc(x.float()))


def build_iresnet(name: str, **kwargs) -> IResNet:
    """The registered iresnet ``name`` (r18 ... r200)."""
    return IResNet(IRESNET_LAYERS[name], name=name, **kwargs)
