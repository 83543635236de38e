"""MobileFaceNet (mbf, mbf_large) with insightface arcface_torch's exact state_dict layout.

Module nesting (``layers.i.layers.j...``) looks redundant but is what the published weights use.
"""
from __future__ import annotations

import torch
from torch import nn

from backbones.common import check_input, fp32_region, run_block, trunk_autocast

MBF_VARIANTS = {
    # name: (blocks per residual group, width scale)
    "mbf": ((1, 4, 6, 2), 2),
    "mbf_large": ((2, 8, 12, 4), 4),
}


class ConvBlock(nn.Module):
    """conv -> BN -> PReLU (``activation=False``: conv -> BN, insightface's LinearBlock)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1,
                 padding: int = 0, groups: int = 1, activation: bool = True) -> None:
        super().__init__()
        layers = [nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, groups=groups, bias=False),
                  nn.BatchNorm2d(out_channels)]
        if activation:
            layers.append(nn.PReLU(out_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """conv -> BN (-> PReLU when ``activation``)."""
        return self.layers(x)


def LinearBlock(in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, padding: int = 0,
                groups: int = 1) -> ConvBlock:
    """conv -> BN, no activation (same state_dict keys as insightface's LinearBlock)."""
    return ConvBlock(in_channels, out_channels, kernel, stride, padding, groups, activation=False)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to ``hidden`` -> depthwise 3x3 -> linear 1x1 project."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, stride: int = 1,
                 residual: bool = False) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_channels, hidden),
            ConvBlock(hidden, hidden, kernel=3, stride=stride, padding=1, groups=hidden),
            LinearBlock(hidden, out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pointwise, depthwise, linear pointwise (+ input when residual)."""
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    """``num_blocks`` stride-1 residual DepthWise units of constant width."""

    def __init__(self, channels: int, num_blocks: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(channels, channels, hidden, residual=True) for _ in range(num_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The stacked residual depthwise blocks."""
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise 7x7 conv -> flatten -> linear -> BN1d (the embedding)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(512, 512, kernel=7, groups=512),
            nn.Flatten(),
            nn.Linear(512, num_features, bias=False),
            nn.BatchNorm1d(num_features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Global depthwise conv, then the embedding layer."""
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet (insightface's ``mbf``/``mbf_large``): state-dict compatible with arcface_torch."""

    def __init__(self, blocks: tuple[int, int, int, int] = (1, 4, 6, 2), scale: int = 2, num_features: int = 512,
                 fp16: bool = False, gradient_checkpointing: bool = False, name: str = "mbf") -> None:
        super().__init__()
        self.name = name
        self.fp16 = fp16
        self.gradient_checkpointing = gradient_checkpointing
        narrow, wide = 64 * scale, 128 * scale
        self.layers = nn.ModuleList([ConvBlock(3, narrow, kernel=3, stride=2, padding=1)])
        if blocks[0] == 1:
            self.layers.append(ConvBlock(narrow, narrow, kernel=3, padding=1, groups=64))
        else:
            self.layers.append(Residual(narrow, blocks[0], hidden=128))
        self.layers.extend([
            DepthWise(narrow, narrow, hidden=128, stride=2),
            Residual(narrow, blocks[1], hidden=128),
            DepthWise(narrow, wide, hidden=256, stride=2),
            Residual(wide, blocks[2], hidden=256),
            DepthWise(wide, wide, hidden=512, stride=2),
            Residual(wide, blocks[3], hidden=256),
        ])
        self.conv_sep = ConvBlock(wide, 512)
        self.features = GDC(num_features)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def finetune_stages(self) -> list[list[nn.Module]]:
        """What config key ``freeze_stages`` counts, from the input: four stages, each ending where the next
        halves the resolution (the stem pair, then each depthwise downsample with its residual blocks)."""
        layers = list(self.layers)
        return [layers[0:2], layers[2:4], layers[4:6], layers[6:8]]

    def units(self) -> list[nn.Module]:
        """Checkpointing granularity: every residual unit on its own, other layers whole."""
        units: list[nn.Module] = []
        for layer in self.layers:
            units.extend(layer.layers if isinstance(layer, Residual) else [layer])
        return units

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings [N, num_features] of normalised images [N, 3, 112, 112]."""
        check_input(x, self.name)
        use_checkpoint = self.gradient_checkpointing and self.training
        with trunk_autocast(x, self.fp16):
            for unit in self.units():
                x = run_block(unit, x, use_checkpoint)
        # Like arcface_torch, the last 1x1 conv and the GDC head run in float32.
        with fp32_region(x):
            return self.features(self.conv_sep(x.float()))


def build_mobilefacenet(name: str, **kwargs) -> MobileFaceNet:
    """The registered MobileFaceNet variant ``name``."""
    blocks, scale = MBF_VARIANTS[name]
    return MobileFaceNet(blocks, scale, name=name, **kwargs)
