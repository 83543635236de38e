"""FaceNet's Inception-ResNet-v1 (``inception_resnet_v1``), state_dict-identical to facenet-pytorch's.

The released ``20180402-114759-vggface2.pt`` / ``20180408-102900-casia-webface.pt`` files load
unchanged: 714 keys for the embedding network, plus ``logits.weight``/``logits.bias`` when the model
is built with ``num_classes``. Input: 160x160 RGB, ``(pixel - 127.5) / 128`` (``FACENET_INPUT``).
``forward`` returns the unnormalised 512-d embedding after ``last_bn`` (facenet-pytorch L2-normalises
inside its forward; ArcScale normalises where cosine scores are computed, as for every backbone).
"""
from __future__ import annotations

import torch
from torch import nn

from backbones.common import FACENET_INPUT, BackboneError, check_input, fp32_region, run_block, trunk_autocast

BN_EPS = 1e-3  # TensorFlow's default, which the released weights were trained with
EMBEDDING_CHANNELS = 1792  # channels after the last Inception-ResNet-C block

# A conv spec: (in_channels, out_channels, kernel, stride, padding).
ConvSpec = tuple


class ConvBNReLU(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU; keys ``conv.*`` and ``bn.*``."""

    def __init__(self, in_channels: int, out_channels: int, kernel, stride: int = 1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Conv, BN, ReLU."""
        return self.relu(self.bn(self.conv(x)))


def _branch(*convs: ConvSpec) -> nn.Module:
    """One conv stands alone, several form an nn.Sequential: the nesting the published keys use."""
    layers = [ConvBNReLU(*spec) for spec in convs]
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


class ResidualInception(nn.Module):
    """Parallel conv branches, concatenated, projected by a 1x1 conv (with bias), scaled and added back.

    Inception-ResNet-A/B/C (facenet's Block35/Block17/Block8) differ only in their branches and scale.
    """

    def __init__(self, channels: int, branches: list[list[ConvSpec]], scale: float, relu: bool = True) -> None:
        super().__init__()
        self.scale = scale
        self.num_branches = len(branches)
        for index, convs in enumerate(branches):
            setattr(self, f"branch{index}", _branch(*convs))
        concatenated = sum(convs[-1][1] for convs in branches)
        self.conv2d = nn.Conv2d(concatenated, channels, kernel_size=1)
        # The final block feeds the pooling without ReLU, as in the released graph.
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Branches concatenated, projected, scaled and added to the input."""
        out = torch.cat([getattr(self, f"branch{i}")(x) for i in range(self.num_branches)], 1)
        return self.relu(self.conv2d(out) * self.scale + x)


class Reduction(nn.Module):
    """Stride-2 conv branches next to a 3x3/2 max-pool, concatenated (facenet's Mixed_6a / Mixed_7a)."""

    def __init__(self, branches: list[list[ConvSpec]]) -> None:
        super().__init__()
        self.num_branches = len(branches) + 1
        for index, convs in enumerate(branches):
            setattr(self, f"branch{index}", _branch(*convs))
        setattr(self, f"branch{len(branches)}", nn.MaxPool2d(3, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Branches concatenated (the spatial size halves)."""
        return torch.cat([getattr(self, f"branch{i}")(x) for i in range(self.num_branches)], 1)


def block_a(scale: float = 0.17) -> ResidualInception:
    """Inception-ResNet-A on 256 channels (17x17 for a 160 input)."""
    return ResidualInception(256, [[(256, 32, 1)],
                                   [(256, 32, 1), (32, 32, 3, 1, 1)],
                                   [(256, 32, 1), (32, 32, 3, 1, 1), (32, 32, 3, 1, 1)]], scale)


def block_b(scale: float = 0.10) -> ResidualInception:
    """Inception-ResNet-B on 896 channels with factorised 1x7 / 7x1 convolutions."""
    return ResidualInception(896, [[(896, 128, 1)],
                                   [(896, 128, 1), (128, 128, (1, 7), 1, (0, 3)), (128, 128, (7, 1), 1, (3, 0))]],
                             scale)


def block_c(scale: float = 0.20, relu: bool = True) -> ResidualInception:
    """Inception-ResNet-C on 1792 channels with factorised 1x3 / 3x1 convolutions."""
    return ResidualInception(1792, [[(1792, 192, 1)],
                                    [(1792, 192, 1), (192, 192, (1, 3), 1, (0, 1)), (192, 192, (3, 1), 1, (1, 0))]],
                             scale, relu)


class InceptionResnetV1(nn.Module):
    """FaceNet's Inception-ResNet-v1: 160x160 face -> unnormalised ``num_features`` embedding."""

    def __init__(self, num_features: int = 512, dropout: float = 0.6, num_classes: int | None = None,
                 fp16: bool = False, gradient_checkpointing: bool = False,
                 name: str = "inception_resnet_v1") -> None:
        super().__init__()
        self.name = name
        self.fp16 = fp16
        self.gradient_checkpointing = gradient_checkpointing
        self.input_spec = FACENET_INPUT
        # Attribute order = state_dict order = facenet-pytorch's.
        self.conv2d_1a = ConvBNReLU(3, 32, 3, stride=2)
        self.conv2d_2a = ConvBNReLU(32, 32, 3)
        self.conv2d_2b = ConvBNReLU(32, 64, 3, padding=1)
        self.maxpool_3a = nn.MaxPool2d(3, stride=2)
        self.conv2d_3b = ConvBNReLU(64, 80, 1)
        self.conv2d_4a = ConvBNReLU(80, 192, 3)
        self.conv2d_4b = ConvBNReLU(192, 256, 3, stride=2)
        self.repeat_1 = nn.Sequential(*[block_a() for _ in range(5)])
        self.mixed_6a = Reduction([[(256, 384, 3, 2)],
                                   [(256, 192, 1), (192, 192, 3, 1, 1), (192, 256, 3, 2)]])
        self.repeat_2 = nn.Sequential(*[block_b() for _ in range(10)])
        self.mixed_7a = Reduction([[(896, 256, 1), (256, 384, 3, 2)],
                                   [(896, 256, 1), (256, 256, 3, 2)],
                                   [(896, 256, 1), (256, 256, 3, 1, 1), (256, 256, 3, 2)]])
        self.repeat_3 = nn.Sequential(*[block_c() for _ in range(5)])
        self.block8 = block_c(scale=1.0, relu=False)  # unscaled and without ReLU, as released
        self.avgpool_1a = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.last_linear = nn.Linear(EMBEDDING_CHANNELS, num_features, bias=False)
        self.last_bn = nn.BatchNorm1d(num_features, eps=BN_EPS)
        self.num_classes = num_classes
        if num_classes is not None:
            self.logits = nn.Linear(num_features, num_classes)

    def finetune_stages(self) -> list[list[nn.Module]]:
        """What config key ``freeze_stages`` counts, from the input: the convolutional stem, repeat_1 (block35),
        mixed_6a with repeat_2 (block17), mixed_7a with repeat_3 and block8."""
        stem = [self.conv2d_1a, self.conv2d_2a, self.conv2d_2b, self.maxpool_3a, self.conv2d_3b, self.conv2d_4a,
                self.conv2d_4b]
        return [stem, [self.repeat_1], [self.mixed_6a, self.repeat_2], [self.mixed_7a, self.repeat_3, self.block8]]

    def stages(self) -> list[nn.Module]:
        """The trunk in order; each entry is one unit of gradient checkpointing."""
        return [self.conv2d_1a, self.conv2d_2a, self.conv2d_2b, self.maxpool_3a, self.conv2d_3b, self.conv2d_4a,
                self.conv2d_4b, *self.repeat_1, self.mixed_6a, *self.repeat_2, self.mixed_7a, *self.repeat_3,
                self.block8]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised embedding [N, num_features] (float32) of normalised 160x160 faces."""
        check_input(x, self.name, self.input_spec.image_size)
        use_checkpoint = self.gradient_checkpointing and self.training
        with trunk_autocast(x, self.fp16):
            for stage in self.stages():
                x = run_block(stage, x, use_checkpoint)
        with fp32_region(x):
            x = self.dropout(self.avgpool_1a(x.float()))
            return self.last_bn(self.last_linear(torch.flatten(x, 1)))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of the ``logits`` layer (facenet-pytorch's ``classify=True`` output)."""
        if self.num_classes is None:
            raise BackboneError(f"network '{self.name}': built without num_classes, so it has no logits layer")
        embedding = self.forward(x)
        with fp32_region(embedding):
            return self.logits(embedding)


def build_inception_resnet_v1(name: str, num_classes: int | None = None, **kwargs) -> InceptionResnetV1:
    """The registry's builder (``num_classes`` adds facenet-pytorch's ``logits`` classifier)."""
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise BackboneError(f"network '{name}': num_classes must be a positive integer or None, got {num_classes!r}")
    return InceptionResnetV1(name=name, num_classes=num_classes, **kwargs)
