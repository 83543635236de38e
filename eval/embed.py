"""Batched embedding of uint8 image tensors (image and horizontal flip), sharded across ranks.

Used by the verification CLI, the training callback and the IJB evaluator. A model is any
callable ``float [N, 3, H, W] -> [N, D]``: an ``nn.Module`` or :class:`OnnxEmbedder`. Its input
convention (size, mean, std) is read from the model (``backbones.input_spec``); images of another
size (a 112x112 .bin given to a 160x160 model) are resized, with one log line.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from backbones.common import InputSpec, input_spec, normalize
from utils.devices import distributed as dist_utils

logger = logging.getLogger(__name__)

_RESIZES_LOGGED: set[tuple[tuple[int, int], InputSpec]] = set()  # one log line per (source size, model input)


def _log_resize(size: tuple[int, int], spec: InputSpec) -> None:
    if (size, spec) not in _RESIZES_LOGGED:
        _RESIZES_LOGGED.add((size, spec))
        logger.info("images are %dx%d, the model takes %s: resizing them (bilinear)", size[0], size[1],
                    spec.describe())


class Progress:
    """A one-line progress bar on stderr (only when enabled and attached to a terminal or forced)."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.total, self.label, self.enabled = total, label, enabled
        self.done, self.start = 0, time.perf_counter()

    def update(self, count: int) -> None:
        """Count ``count`` more images done and redraw the bar."""
        self.done += count
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        rate = self.done / max(elapsed, 1e-9)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                         f"{rate:.0f} img/s")
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


@torch.no_grad()
def embed_images(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, device: torch.device,
                 batch_size: int = 256, flip: bool = True, progress: Progress | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Embeddings (float32, on CPU) of ``images`` (uint8 [N, 3, H, W] on CPU) and of their mirror images."""
    outputs, flipped_outputs = [], []
    spec = input_spec(model)
    size = tuple(images.shape[-2:])
    if size != spec.image_size:
        _log_resize(size, spec)
    for start in range(0, images.shape[0], batch_size):
        batch = normalize(images[start:start + batch_size].to(device, non_blocking=True), spec, resize=True)
        outputs.append(model(batch).float().cpu())
        if flip:
            flipped_outputs.append(model(torch.flip(batch, dims=[3])).float().cpu())
        if progress is not None:
            progress.update(batch.shape[0])
    if not outputs:
        raise ValueError("no images to embed")
    flipped = torch.cat(flipped_outputs) if flip else None
    return torch.cat(outputs), flipped


def gather_shards(local: torch.Tensor, total: int, device: torch.device) -> torch.Tensor:
    """Every rank's contiguous shard of ``total`` rows (split by ``shard_bounds``), concatenated on CPU."""
    world_size = dist_utils.get_world_size()
    if world_size == 1:
        return local
    sizes = [end - start for start, end in dist_utils.shard_bounds(total, world_size)]
    # NCCL/HCCL need device tensors; gloo works on CPU tensors.
    comm_device = torch.device("cpu") if dist.get_backend() == "gloo" else device
    return dist_utils.all_gather_rows(local.to(comm_device), sizes).cpu()


class OnnxEmbedder:
    """Callable wrapper of an ONNX model (onnxruntime) with the torch-model calling convention."""

    def __init__(self, path: str, device: torch.device | None = None) -> None:
        try:
            import onnxruntime
        except ImportError as exc:
            raise RuntimeError(f"{path}: evaluating an .onnx model needs the optional extra onnxruntime "
                               "(pip install onnxruntime)") from exc
        providers = ["CPUExecutionProvider"]
        if device is not None and device.type == "cuda" and \
                "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = onnxruntime.InferenceSession(path, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise RuntimeError(f"{path}: onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.path = path
        # tools/torch2onnx.py writes the input convention into the metadata; other files get insightface's.
        self.input_spec = InputSpec.from_metadata(self.session.get_modelmeta().custom_metadata_map, path)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        feed = {self.input_name: batch.detach().cpu().numpy().astype(np.float32)}
        return torch.from_numpy(self.session.run(None, feed)[0])

    def eval(self) -> "OnnxEmbedder":
        """No-op (an ONNX graph is always in inference mode), for the ``nn.Module`` calling convention."""
        return self

    @property
    def training(self) -> bool:
        """Always False: an ONNX graph has no training mode."""
        return False
