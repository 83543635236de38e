"""MTCNN's three networks (PNet, RNet, ONet) in plain torch, and their weight loader.

The layers and weights are facenet-pytorch's (MIT, converted from the original TensorFlow/Caffe models);
the files ship in ``utils/faces/mtcnn_weights/`` with their licence. PNet runs each convolution in the memory
layout its CPU kernel is fast in, and its 2x2 ceil-mode pooling on channels_last maps as strided maxima
(exact; torch's pooling kernel is several times slower on 10 channels).
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mtcnn_weights")
_NATIVE_CONV_VALUES = 20480  # torch's CPU rule: one image of at most this many input values skips oneDNN
_BAND_PIXELS = 1 << 16  # input pixels (x images) per PNet band: its maps then fit in a core's share of cache


class MTCNNError(ValueError):
    """Bad detector input or settings; the message is one line."""


def max_pool2_ceil(x: torch.Tensor) -> torch.Tensor:
    """``max_pool2d(x, 2, 2, ceil_mode=True)``; of a channels_last map as maxima of strided slices of its NHWC
    view: the same values, several times faster than torch's pooling kernel on PNet's 10-channel maps."""
    if not x.is_contiguous(memory_format=torch.channels_last):
        return F.max_pool2d(x, 2, 2, ceil_mode=True)
    nhwc = x.permute(0, 2, 3, 1)
    height, width = nhwc.shape[1:3]
    rows = torch.maximum(nhwc[:, 0:height - 1:2], nhwc[:, 1::2])
    if height % 2:  # ceil mode: the last row is a window of its own
        rows = torch.cat([rows, nhwc[:, height - 1:]], 1)
    out = torch.maximum(rows[:, :, 0:width - 1:2], rows[:, :, 1::2])
    if width % 2:
        out = torch.cat([out, rows[:, :, width - 1:]], 2)
    return out.permute(0, 3, 1, 2)


def _conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` in the memory layout its CPU kernel is fast in. torch sends a single image of at most
    ``_NATIVE_CONV_VALUES`` input values to its native kernel (not oneDNN), which is 2-6x slower on a
    channels_last input than on a contiguous one; larger maps go to oneDNN, fastest on channels_last."""
    if x.device.type == "cpu" and x.shape[0] == 1 and x.numel() <= _NATIVE_CONV_VALUES:
        return conv(x.contiguous())
    return conv(x.contiguous(memory_format=torch.channels_last))


@dataclass
class PackedLayout:
    """Several small inputs side by side in one PNet input (``PNet.packed_layout``): each image's first
    column, the packed height and width, the first-layer cells outside every image, and per output cell
    whether it is valid, whose (index) and at which column of that image's own output."""

    starts: list[int]
    height: int
    width: int
    outside: np.ndarray  # [height - 2, width - 2] bool
    valid: np.ndarray  # [out_h, out_w] bool
    owner: np.ndarray  # [out_w] image index per output column, -1 between images
    column: np.ndarray  # [out_w] column in the owner's own output


class PNet(nn.Module):
    """Proposal network: fully convolutional, one 12x12 window per output cell (stride 2)."""

    packs = True  # the detector may pack small pyramid levels side by side into one input (packed_layout)

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Box regression [N, 4, h, w] and the two class logits [N, 2, h, w] (softmax not applied)."""
        x = x.contiguous(memory_format=torch.channels_last)
        batch, _, height, width = x.shape
        heads = torch.cat([self.heads(x[:, :, top:bottom]) for top, bottom in self.row_bands(height, width, batch)],
                          dim=1)
        return heads[..., :4].permute(0, 3, 1, 2), heads[..., 4:].permute(0, 3, 1, 2)

    @staticmethod
    def output_size(size: int) -> int:
        """Output rows (columns) of an input of ``size`` rows (columns): ceil((size - 2) / 2) after the first
        3x3 convolution and the ceil-mode 2x2 pooling, then 4 fewer after two more 3x3 convolutions."""
        return (size - 1) // 2 - 4

    @staticmethod
    def row_bands(height: int, width: int, batch: int = 1) -> list[tuple[int, int]]:
        """Input row ranges that cover a [batch, 3, height, width] input's output in cache-sized bands.

        The network is fully convolutional without padding and pools from even rows, so output rows
        [a, b) are the network on input rows [2a, 2b + 10): the bands' outputs concatenated are the whole
        map's values (equal up to float32 rounding, < 1e-5, as oneDNN picks its kernel by shape; tested),
        while each band's intermediate maps stay in the CPU cache (1.3-1.7x faster on a 512-px photo)."""
        out_rows = PNet.output_size(height)
        band = max(16, _BAND_PIXELS // (2 * width * batch))
        return [(2 * top, min(height, 2 * min(out_rows, top + band) + 10)) for top in range(0, out_rows, band)]

    def heads(self, x: torch.Tensor, outside: torch.Tensor | None = None) -> torch.Tensor:
        """[N, h, w, 6]: the 4 box offsets then the 2 class logits of each output cell (NHWC).

        ``outside`` ([H - 2, W - 2] bool, from ``packed_layout``): first-layer cells that belong to none of
        the images packed side by side in ``x``; they become -inf, so no pooling window takes a value from
        outside its own image, and every image's output cells equal its own pass's."""
        x = self.prelu1(_conv(self.conv1, x))
        if outside is not None:
            x = x.masked_fill(outside, float("-inf"))
        x = max_pool2_ceil(x)
        x = self.prelu3(_conv(self.conv3, self.prelu2(_conv(self.conv2, x))))
        # both 1x1 heads as one 6-output convolution; F.conv2d would send it to torch's native kernel
        # (slow for 1x1 in one thread), oneDNN's takes a third of a matmul over the NHWC view
        weight = torch.cat([self.conv4_2.weight, self.conv4_1.weight])
        bias = torch.cat([self.conv4_2.bias, self.conv4_1.bias])
        if x.device.type == "cpu" and torch.backends.mkldnn.is_available() and x.dtype == torch.float32:
            x = x.contiguous(memory_format=torch.channels_last)
            return torch.mkldnn_convolution(x, weight, bias, (0, 0), (1, 1), (1, 1), 1).permute(0, 2, 3, 1)
        return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias)

    @staticmethod
    def packed_layout(sizes: list[tuple[int, int]]) -> PackedLayout:
        """Where images of ``sizes`` (h, w) go when packed left to right into one input (each at an even
        column, so pooling windows stay aligned), the first-layer cells outside all of them, and which
        output cells belong to which image (its index, or -1) at which column of its own output."""
        starts = np.cumsum([0] + [width + width % 2 for _, width in sizes[:-1]])
        height = max(h for h, _ in sizes)
        width = int(starts[-1]) + sizes[-1][1]
        outside = np.ones((height - 2, width - 2), dtype=bool)
        owner = np.full((PNet.output_size(width),), -1, dtype=np.int64)
        valid = np.zeros((PNet.output_size(height), len(owner)), dtype=bool)
        column = np.zeros(len(owner), dtype=np.int64)
        for index, ((h, w), start) in enumerate(zip(sizes, starts)):
            outside[:h - 2, start:start + w - 2] = False
            out_h, out_w, first = PNet.output_size(h), PNet.output_size(w), start // 2
            owner[first:first + out_w] = index
            column[first:first + out_w] = np.arange(out_w)
            valid[:out_h, first:first + out_w] = True
        return PackedLayout([int(start) for start in starts], height, width, outside, valid, owner, column)

    def plain_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``heads`` in plain layers without bands or layout choices: the form an exporter can trace with
        dynamic N, H and W (``tools/mtcnn2onnx.py``)."""
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return torch.cat([self.conv4_2(x), self.conv4_1(x)], dim=1).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Box regression [N, 4, h, w] and face/non-face probabilities [N, 2, h, w]."""
        reg, logits = self.logits(x)
        return reg, torch.softmax(logits, dim=1)


class RNet(nn.Module):
    """Refinement network on 24x24 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Box regression [N, 4] and probabilities [N, 2]."""
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(x))
        # The weights were converted from TensorFlow: the dense layer expects (W, H, C) flattening order.
        x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    """Output network on 48x48 crops: final boxes, probabilities and five landmarks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Box regression [N, 4], landmarks [N, 10] (5 x then 5 y, box-relative) and probabilities [N, 2]."""
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


def load_net(name: str, weights_dir: str = WEIGHTS_DIR) -> nn.Module:
    """One of ``pnet``, ``rnet``, ``onet`` with its weights (``weights_only`` load), in eval mode."""
    net = {"pnet": PNet, "rnet": RNet, "onet": ONet}[name]()
    path = os.path.join(weights_dir, f"{name}.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except FileNotFoundError:
        raise MTCNNError(f"{path}: MTCNN weight file not found (expected {name}.pt in {weights_dir})") from None
    except (RuntimeError, ValueError, OSError, EOFError, pickle.UnpicklingError) as exc:
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise MTCNNError(f"{path}: not a valid {name} state_dict ({first})") from None
    return net.eval()
