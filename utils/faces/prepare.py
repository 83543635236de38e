"""A detected face made into a model's input, by the convention its input size implies.

A square input whose side is a multiple of 112 or 128 (insightface's ArcFace-style networks) gets the
face aligned onto the ArcFace template with its five landmarks (``align.norm_crop``); any other square
side (160 for facenet-pytorch's InceptionResnetV1) gets facenet-pytorch's box crop plus ``margin`` output
pixels (``MTCNN.crop``). tools/inference.py --detect, tools/detect_faces.py and eval/folders.py use this,
so a face is prepared the same way wherever it is embedded.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from utils.faces.align import AlignmentError, norm_crop


def convention(image_size: Sequence[int], margin: int = 0) -> str:
    """The name of how faces are prepared for a model taking ``image_size`` (H, W): ``arcface-112``,
    ``facenet-160-margin32``, ...; a non-square input raises AlignmentError."""
    height, width = int(image_size[0]), int(image_size[1])
    if height != width:
        raise AlignmentError(f"the model takes {height}x{width} images; only square inputs can be cut from a "
                             f"detected face")
    if height % 112 == 0 or height % 128 == 0:
        return f"arcface-{height}"
    return f"facenet-{height}-margin{int(margin)}"


def model_face(rgb: np.ndarray, box: Sequence[float], landmarks: np.ndarray, image_size: Sequence[int],
               detector, margin: int = 0) -> np.ndarray:
    """uint8 RGB [S, S, 3] face of one detection (``box``, ``landmarks`` [5, 2]) in ``rgb``, prepared by
    :func:`convention` (``detector``: the MTCNN that found it, whose ``crop`` cuts facenet's box crops)."""
    name = convention(image_size, margin)
    side = int(image_size[0])
    if name.startswith("arcface"):
        return norm_crop(rgb, landmarks, side)
    return detector.crop(rgb, box, side, margin)


def decode_photo(data: bytes) -> np.ndarray | None:
    """uint8 RGB [H, W, 3] of an encoded photo (whatever OpenCV decodes), or None when it cannot be decoded."""
    import cv2

    if not data:
        return None
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        return None
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
