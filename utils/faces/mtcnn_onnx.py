"""MTCNN's three networks under onnxruntime, as runners the detector in ``mtcnn.py`` plugs in.

``tools/mtcnn2onnx.py`` writes ``pnet.onnx``, ``rnet.onnx`` and ``onet.onnx`` into one folder; this module
loads them (onnxruntime is optional and imported only here) and runs them with the same inputs and outputs
as the torch networks, so ``MTCNN.from_onnx(folder)`` shares all pre- and post-processing with ``MTCNN()``:

- ``pnet.onnx``: input ``data`` float32 [N, 3, H, W] (``(pixel - 127.5) / 128``, RGB), N, H and W dynamic
  (H, W >= 12); output ``heads`` [N, h, w, 6] = per output cell the 4 box offsets then the 2 class logits
  (softmax not applied), h = (H - 1) // 2 - 4 (the same for w).
- ``rnet.onnx``: ``data`` [N, 3, 24, 24] -> ``reg`` [N, 4], ``prob`` [N, 2] (softmax applied).
- ``onet.onnx``: ``data`` [N, 3, 48, 48] -> ``reg`` [N, 4], ``landmarks`` [N, 10] (5 x then 5 y, relative to
  the box), ``prob`` [N, 2].
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from utils.faces.mtcnn_nets import MTCNNError

INPUT_NAME = "data"
OUTPUTS = {"pnet": ("heads",), "rnet": ("reg", "prob"), "onet": ("reg", "landmarks", "prob")}
INSTALL_HINT = "MTCNN under onnxruntime needs the optional extra onnxruntime (pip install onnxruntime)"


class OnnxNet:
    """RNet or ONet under onnxruntime: called like the torch network, returns its outputs as CPU tensors."""

    def __init__(self, session) -> None:
        self.session = session

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The network's outputs for the float32 NCHW batch ``x``."""
        feed = {INPUT_NAME: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)}
        return tuple(torch.from_numpy(out) for out in self.session.run(None, feed))


class OnnxPNet(OnnxNet):
    """PNet under onnxruntime with the torch PNet's ``heads``/``row_bands`` interface. It takes one image
    size per call, so the detector runs every pyramid level on its own (``packs`` False: the torch PNet's
    side-by-side packing of small levels needs a mask between its first layers)."""

    packs = False

    @staticmethod
    def row_bands(height: int, width: int, batch: int = 1) -> list[tuple[int, int]]:
        """The whole input in one band: onnxruntime plans its own memory, row bands only add calls."""
        return [(0, height)]

    def heads(self, x: torch.Tensor, outside: torch.Tensor | None = None) -> torch.Tensor:
        """[N, h, w, 6]: the 4 box offsets then the 2 class logits of each output cell."""
        if outside is not None:
            raise MTCNNError("the ONNX PNet does not take packed inputs (packs is False)")
        return self(x)[0]


def _session(path: str, name: str, providers: Sequence[str], threads: int):
    import onnxruntime

    if not os.path.isfile(path):
        raise MTCNNError(f"{path}: ONNX file not found (expected {name}.onnx, written by tools/mtcnn2onnx.py)")
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    try:
        session = onnxruntime.InferenceSession(path, options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own exception types with multi-line messages
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise MTCNNError(f"{path}: onnxruntime cannot load it ({first})") from None
    inputs = [item.name for item in session.get_inputs()]
    outputs = tuple(item.name for item in session.get_outputs())
    if inputs != [INPUT_NAME] or outputs != OUTPUTS[name]:
        raise MTCNNError(f"{path}: inputs {inputs} and outputs {list(outputs)} are not MTCNN's {name} (expected "
                         f"['{INPUT_NAME}'] and {list(OUTPUTS[name])}; export with tools/mtcnn2onnx.py)")
    return session


def load_onnx_nets(onnx_dir: str, providers: Sequence[str] = ("CPUExecutionProvider",),
                   threads: int = 0) -> tuple[OnnxPNet, OnnxNet, OnnxNet]:
    """The three runners from ``onnx_dir`` (pnet.onnx, rnet.onnx, onet.onnx); ``threads`` onnxruntime intra-op
    threads (0: its default). MTCNNError with an install hint when onnxruntime is missing."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise MTCNNError(INSTALL_HINT) from None
    sessions = [_session(os.path.join(onnx_dir, f"{name}.onnx"), name, providers, threads)
                for name in ("pnet", "rnet", "onet")]
    return OnnxPNet(sessions[0]), OnnxNet(sessions[1]), OnnxNet(sessions[2])
