"""5-point face alignment onto the ArcFace 112x112 template (similarity transform, Umeyama).

The template is the one insightface's recognition models were trained with; an aligned crop
fed to a backbone must be produced exactly this way for published accuracies to hold.
"""
from __future__ import annotations

import numpy as np

ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)


class AlignmentError(ValueError):
    """Landmarks or sizes that cannot describe an alignment; the message is one line."""


def template_for(image_size: int = 112) -> np.ndarray:
    """The template scaled to ``image_size`` (multiples of 112; multiples of 128 add insightface's x offset)."""
    if image_size % 112 == 0:
        return ARCFACE_TEMPLATE * (image_size / 112.0)
    if image_size % 128 == 0:
        ratio = image_size / 128.0
        return ARCFACE_TEMPLATE * ratio + np.array([8.0 * ratio, 0.0])
    raise AlignmentError(f"image_size {image_size} is not a multiple of 112 or 128")


def as_landmarks(landmarks, source: str = "landmarks") -> np.ndarray:
    """Validate and reshape 5 (x, y) points given as [5, 2] or 10 numbers."""
    points = np.asarray(landmarks, dtype=np.float64)
    if points.size != 10:
        raise AlignmentError(f"{source}: expected 5 landmarks (10 numbers), got {points.size} numbers")
    points = points.reshape(5, 2)
    if not np.all(np.isfinite(points)):
        raise AlignmentError(f"{source}: landmarks must be finite numbers")
    return points


def umeyama(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, translation) mapping source -> target.

    Returns the 2x3 matrix for ``cv2.warpAffine``. Reflections are excluded (Umeyama 1991).
    """
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    source_mean, target_mean = source.mean(0), target.mean(0)
    source_centered, target_centered = source - source_mean, target - target_mean
    covariance = target_centered.T @ source_centered / len(source)
    sign = np.ones(2)
    if np.linalg.det(covariance) < 0:
        sign[-1] = -1.0
    u, singular, vt = np.linalg.svd(covariance)
    source_variance = source_centered.var(0).sum()
    if source_variance <= 0 or np.linalg.matrix_rank(covariance) == 0:
        raise AlignmentError("landmarks are degenerate (all points coincide)")
    rotation = u @ np.diag(sign) @ vt
    scale = float(singular @ sign) / source_variance
    translation = target_mean - scale * rotation @ source_mean
    return np.hstack([scale * rotation, translation[:, None]])


def estimate_norm(landmarks, image_size: int = 112) -> np.ndarray:
    """2x3 affine matrix taking the 5 landmarks onto the ArcFace template of ``image_size``."""
    return umeyama(as_landmarks(landmarks), template_for(image_size))


def norm_crop(image: np.ndarray, landmarks, image_size: int = 112) -> np.ndarray:
    """Aligned ``image_size`` x ``image_size`` crop of ``image`` (any channel order; it is kept)."""
    import cv2

    matrix = estimate_norm(landmarks, image_size)
    return cv2.warpAffine(image, matrix, (image_size, image_size), borderValue=0.0)
