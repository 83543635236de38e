"""What an evaluation or an inference runs on, said before its answers.

Every CLI that embeds faces (tools/inference.py, ``python -m eval.verification``, ``eval.ijb``,
``eval.folders``) loads its model here and prints the same ``model:`` line: the weights file and where it
came from (a registered name resolved to its cached file, a backbone state_dict such as model.pt, a training
checkpoint, an .onnx file), the network (named on the command line or read from the file), the embedding
size and the input size and pixel normalisation. The same warnings follow: the demo's ``tiny`` network, and
weights that look untrained (:func:`untrained_reasons`).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# Six probe inputs with nothing in common (noise, a colour gradient, black, white, a checkerboard, a half-white
# frame): a model whose embeddings of every pair of them have at least this cosine similarity gives (almost)
# the same answer for every input. Measured lowest pair: a freshly initialised inception_resnet_v1 0.9976
# (flagged); tiny after 8 training steps 0.78, fresh tiny 0.66, fresh mbf 0.64 (not flagged: fresh networks
# other than inception_resnet_v1 are caught by their BatchNorm statistics, utils.weights.inspect).
COLLAPSED_COSINE = 0.99
PROBES = ("noise", "a colour gradient", "black", "white", "a checkerboard", "a half-white frame")
TINY_WARNING = ("network 'tiny' is ArcScale's small CPU demo network, trained on generated faces: its answers "
                "on real photos mean little")


class ModelFileError(ValueError):
    """A model file that is not there; the message is one line."""


@dataclass
class LoadedModel:
    """A model ready to embed, and what it is: ``line`` (the ``model:`` summary) and ``warnings``."""

    model: Any
    path: str  # the file read (a registered name's cached file)
    network: str | None  # None for .onnx
    line: str
    warnings: list[str] = field(default_factory=list)

    def announce(self, label: str = "") -> None:
        """What is evaluated, before any number: the ``model:`` line on stdout, each warning on stderr
        (``warning: [label: ]...``; ``label`` tells models apart when several are evaluated)."""
        print(self.line, flush=True)
        for warning in self.warnings:
            print(f"warning: {label + ': ' if label else ''}{warning}", file=sys.stderr, flush=True)


def cosine(first: np.ndarray, second: np.ndarray) -> float:
    """Cosine similarity of two embeddings."""
    return float(np.dot(first, second) / (np.linalg.norm(first) * np.linalg.norm(second)))


def probe_images(image_size: tuple[int, int]) -> list[torch.Tensor]:
    """The ``PROBES``: uint8 RGB [1, 3, H, W] inputs with nothing in common."""
    height, width = image_size
    noise = torch.randint(0, 256, (3, height, width), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    rows = torch.linspace(0, 255, height)[:, None].expand(height, width)
    cols = torch.linspace(0, 255, width)[None, :].expand(height, width)
    gradient = torch.stack([rows, cols, 255 - rows]).round().to(torch.uint8)
    black = torch.zeros(3, height, width, dtype=torch.uint8)
    squares = (torch.arange(height)[:, None] * 8 // height + torch.arange(width)[None, :] * 8 // width) % 2
    half = black.clone()
    half[:, :, : width // 2] = 255
    images = [noise, gradient, black, black + 255, (squares * 255).to(torch.uint8).expand(3, height, width), half]
    return [image[None].contiguous() for image in images]


def untrained_reasons(model: Any, state: dict | None, image_size: tuple[int, int], device: torch.device) -> list[str]:
    """Why the weights look untrained (empty when they do not): every BatchNorm still at its initial
    statistics, or every pair of the unrelated ``PROBES`` embedded (almost) identically (``COLLAPSED_COSINE``)."""
    from eval.embed import embed_images
    from utils.weights.inspect import batchnorm_at_init

    reasons = []
    at_init, total = batchnorm_at_init(state) if state is not None else (0, 0)
    if total and at_init == total:
        reasons.append(f"all {total} BatchNorm layers still hold their initial statistics (mean 0, variance 1): "
                       f"the weights never saw training data")
    # One image per batch: each probe is embedded exactly as a single image is at inference.
    features = [embed_images(model, image, device, batch_size=1, flip=False)[0][0].double().numpy()
                for image in probe_images(image_size)]
    if not all(np.linalg.norm(feature) for feature in features):
        reasons.append("the embedding of a probe input is all zeros")
        return reasons
    lowest = min(cosine(a, b) for i, a in enumerate(features) for b in features[i + 1:])
    if lowest >= COLLAPSED_COSINE:
        reasons.append(f"{len(PROBES)} unrelated inputs ({', '.join(PROBES)}) get embeddings whose pairwise cosine "
                       f"similarities are all >= {lowest:.4f} (rule: >= {COLLAPSED_COSINE}): the embedding hardly "
                       f"depends on the input")
    return reasons


def load_model(value: str, network: str | None, device: torch.device, embedding_size: int | None = None,
               option: str = "--model") -> LoadedModel:
    """The model ``value`` names, in eval mode on ``device``, with its ``model:`` line and its warnings.

    ``value`` is model.pt, a training checkpoint, an .onnx file or a released weights name (``facenet:vggface2``;
    utils.weights.registry, fetched into the cache when needed). ``network`` and ``embedding_size`` default to
    what the file says (a training checkpoint's config, else the registered network whose keys and shapes the
    state_dict has; utils.weights.load)."""
    from backbones.common import input_spec
    from utils.weights.registry import is_registry_name

    path, origin = value, ""
    if is_registry_name(value):
        from utils.weights.resolve import resolve_weights
        path = resolve_weights(value, option)
        origin = f"registered name '{value}', its cached file; "
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: model file not found")
    if path.endswith(".onnx"):
        from eval.embed import OnnxEmbedder

        model = OnnxEmbedder(path, device)
        size = model.input_spec.image_size
        loaded = LoadedModel(model, path, None, f"model: {path} ({origin}ONNX), input {size[0]}x{size[1]}")
        state = None
    else:
        from utils.weights.inspect import file_kind
        from utils.weights.load import load_backbone_file

        kind = file_kind(path)
        backbone, network_used, embedding = load_backbone_file(path, network or None, embedding_size,
                                                               map_location="cpu")
        state = backbone.state_dict()  # read for its BatchNorm statistics (untrained_reasons), before any move
        spec = input_spec(backbone)
        named = "--network" if network else "read from the file"
        line = (f"model: {path} ({origin}{kind}): network '{network_used}' ({named}), embedding size {embedding}, "
                f"input {spec.image_size[0]}x{spec.image_size[1]} RGB, pixels (x - {spec.mean:g}) / {spec.std:g}")
        loaded = LoadedModel(backbone.to(device).eval(), path, network_used, line)
    reasons = untrained_reasons(loaded.model, state, input_spec(loaded.model).image_size, device)
    if reasons:
        loaded.warnings.append(f"the weights look untrained: {'; '.join(reasons)}")
    if loaded.network == "tiny":
        loaded.warnings.append(TINY_WARNING)
    return loaded
