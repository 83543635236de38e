"""Synthetic identity sets: face-like patterns that a small CNN can learn, for the demo and tests.

Each identity is a smooth random "face" (skin-coloured ellipse, hair band, eyes, brows, nose,
mouth, a skin texture and a few marks, all placed and coloured from the identity's seed); each
sample is that face under a random pose (shift/rotation/scale), on a random background, with
brightness/contrast/colour changes, blur and noise. Pose and background change the raw pixels
far more than identity does, so raw-pixel matching is weak while a CNN learns the identity cues.

Output is a real InsightFace training folder (train.rec/train.idx/property, header layout) plus
two lfw.bin-style verification files, written atomically; the same seed gives identical bytes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from utils.data import recordio

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when the images change, so cached sets are rebuilt
_TRAIN, _UNSEEN = 0, 1            # identity streams
_SAMPLE_TRAIN, _SAMPLE_HELDOUT, _SAMPLE_PAIRS = 0, 1, 2  # sample streams
JPEG_QUALITY = 90


class SyntheticDataError(ValueError):
    """Bad generator parameters or output folder; the message is one line."""


def _identity_params(seed: int, stream: int, identity: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 7, stream, identity])
    # float32 parameters keep the whole rendering in float32 (numpy promotes float64 scalars).
    skin = rng.uniform(60, 230, 3)
    hair = rng.uniform(10, 200, 3)
    eye = rng.uniform(0, 160, 3)
    params = {
        "face_center": np.array([56 + rng.uniform(-3, 3), 60 + rng.uniform(-3, 3)]),
        "face_axes": np.array([rng.uniform(30, 42), rng.uniform(40, 52)]),
        "skin": skin,
        "hair": hair,
        "hair_line": rng.uniform(22, 42),
        "hair_tilt": rng.uniform(-0.25, 0.25),
        "eye_y": rng.uniform(42, 54),
        "eye_dx": rng.uniform(11, 21),
        "eye_size": rng.uniform([3.0, 2.0], [7.0, 5.0]),
        "eye_color": eye,
        "brow_gap": rng.uniform(5, 10),
        "brow_color": rng.uniform(0, 120, 3),
        "brow_len": rng.uniform(5, 11),
        "nose": np.array([rng.uniform(-4, 4), rng.uniform(62, 72)]),
        "nose_size": rng.uniform([2.5, 4.0], [6.0, 10.0]),
        "nose_color": skin * rng.uniform(0.6, 1.1),
        "mouth_y": rng.uniform(78, 90),
        "mouth_size": rng.uniform([7.0, 2.0], [17.0, 5.0]),
        "mouth_color": rng.uniform(40, 230, 3),
        "texture": np.array([rng.uniform(0, np.pi), rng.uniform(0.12, 0.45), rng.uniform(6, 22)]),
        "marks": rng.uniform([-25, -30, 2, 0, 0, 0], [25, 30, 5, 255, 255, 255], size=(3, 6)),
    }
    return {name: np.asarray(value, np.float32) for name, value in params.items()}


def _gaussian(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
    # Separable: exp(a + b) = exp(a) * exp(b) on a row and a column, then one outer product.
    row = np.exp(-0.5 * ((xx[0] - float(cx)) / float(sx)) ** 2)
    column = np.exp(-0.5 * ((yy[:, 0] - float(cy)) / float(sy)) ** 2)
    return np.outer(column, row)


def render_identity(params: dict[str, np.ndarray], size: int = 112) -> tuple[np.ndarray, np.ndarray]:
    """Canonical face of one identity at 112x112 scale: (colour HxWx3 float32, alpha HxW float32)."""
    scale = size / 112.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / scale
    cx, cy = params["face_center"]
    ax, ay = params["face_axes"]
    radius = np.sqrt(((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2)
    alpha = np.clip((1.0 - radius) * 8.0, 0.0, 1.0)
    color = np.empty((size, size, 3), np.float32)
    color[:] = params["skin"]
    # Skin texture: a grating whose angle/frequency is an identity cue that survives small shifts.
    angle, frequency, amplitude = params["texture"]
    grating = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * frequency * 2 * np.pi)
    color += (amplitude * grating)[..., None]

    def paint(weight: np.ndarray, rgb: np.ndarray) -> None:
        weight = weight[..., None]
        color[:] += weight * (np.asarray(rgb, np.float32) - color)

    hair_edge = params["hair_line"] + params["hair_tilt"] * (xx - cx)
    hair_weight = np.clip((hair_edge - yy) / 3.0, 0, 1)
    paint(hair_weight, params["hair"])
    alpha = np.maximum(alpha, hair_weight * np.clip((1.15 - radius) * 8.0, 0, 1))
    eye_y, eye_dx = params["eye_y"], params["eye_dx"]
    for side in (-1, 1):
        eye_x = cx + side * eye_dx
        paint(np.clip(1.6 * _gaussian(xx, yy, eye_x, eye_y, *params["eye_size"]), 0, 1), params["eye_color"])
        brow = _gaussian(xx, yy, eye_x, eye_y - params["brow_gap"] - params["eye_size"][1], params["brow_len"], 1.6)
        paint(np.clip(1.4 * brow, 0, 1), params["brow_color"])
    nose_dx, nose_y = params["nose"]
    paint(np.clip(1.2 * _gaussian(xx, yy, cx + nose_dx, nose_y, *params["nose_size"]), 0, 1), params["nose_color"])
    paint(np.clip(1.8 * _gaussian(xx, yy, cx, params["mouth_y"], *params["mouth_size"]), 0, 1), params["mouth_color"])
    for mx, my, radius_mark, *rgb in params["marks"]:
        paint(np.clip(1.5 * _gaussian(xx, yy, cx + mx, cy + my, radius_mark, radius_mark), 0, 1), np.array(rgb))
    return color, alpha


_noise_banks: dict[int, np.ndarray] = {}


def _noise_bank(size: int) -> np.ndarray:
    """Fixed unit Gaussian noise (2x the image size); samples take random crops of it.

    Cropping is ~20x cheaper than drawing fresh normals per image and stays deterministic.
    """
    if size not in _noise_banks:
        _noise_banks[size] = np.random.default_rng(12345).standard_normal((2 * size, 2 * size, 3), dtype=np.float32)
    return _noise_banks[size]


def render_sample(face: tuple[np.ndarray, np.ndarray], rng: np.random.Generator, size: int = 112) -> np.ndarray:
    """One jittered view of a canonical face: BGR uint8 HxWx3 (what cv2.imencode expects)."""
    import cv2

    color, alpha = face
    angle = rng.uniform(-10, 10)
    zoom = rng.uniform(0.9, 1.1)
    shift = rng.uniform(-6, 6, 2) * size / 112
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), angle, zoom)
    matrix[:, 2] += shift
    warped_color = cv2.warpAffine(color, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    warped_alpha = cv2.warpAffine(alpha, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)
    # Background: a smooth colour gradient independent of identity (grey level plus a colour tint).
    corners = (rng.uniform(30, 225) + rng.uniform(-45, 45, (2, 2, 3))).astype(np.float32)
    background = cv2.resize(corners, (size, size), interpolation=cv2.INTER_LINEAR)
    image = cv2.blendLinear(warped_color, background, warped_alpha, 1 - warped_alpha)
    # Photometric jitter folded into one per-channel gain and offset: contrast, brightness, colour cast.
    contrast = rng.uniform(0.75, 1.25)
    gain = (contrast * rng.uniform(0.85, 1.15, 3)).astype(np.float32)
    offset = ((128 - 128 * contrast + rng.uniform(-25, 25)) * gain / contrast).astype(np.float32)
    image = cv2.multiply(image, tuple(float(g) for g in gain) + (0.0,))
    image = cv2.add(image, tuple(float(o) for o in offset) + (0.0,))
    if rng.random() < 0.5:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.5, 1.3))
    row, col = rng.integers(0, size, 2)
    noise = _noise_bank(size)[row:row + size, col:col + size]
    image = cv2.scaleAdd(np.ascontiguousarray(noise), float(rng.uniform(2, 8)), image)
    # Clamp negatives, then a saturating float -> uint8 conversion; RGB -> BGR for cv2.imencode.
    return cv2.cvtColor(cv2.convertScaleAbs(cv2.max(image, 0.0)), cv2.COLOR_RGB2BGR)


def _encode(image_bgr: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:  # pragma: no cover - OpenCV always encodes a uint8 BGR array
        raise SyntheticDataError("OpenCV failed to encode a synthetic image as JPEG")
    return buf.tobytes()


def _identity_jpegs(seed: int, stream: int, identity: int, sample_stream: int, samples: list[int],
                    size: int) -> list[bytes]:
    face = render_identity(_identity_params(seed, stream, identity), size)
    return [_encode(render_sample(face, np.random.default_rng([seed, 11, stream, identity, sample_stream, s]), size))
            for s in samples]


def identity_photos(seed: int, identity: int, count: int, size: int = 112, unseen: bool = False) -> list[bytes]:
    """``count`` JPEG photos (aligned-crop style, ``size`` px) of one generated identity; ``unseen`` draws from
    the identity stream the training set never uses (people a model was not trained on)."""
    return _identity_jpegs(seed, _UNSEEN if unseen else _TRAIN, identity, _SAMPLE_HELDOUT, list(range(count)),
                           _image_size(size))


def _pairs(seed: int, stream: int, identities: int, num_pairs: int, size: int, pool: ThreadPoolExecutor,
           name: str) -> tuple[list[bytes], list[bool]]:
    """lfw.bin-style pairs: pair i = images 2i, 2i+1; even pairs genuine, odd pairs impostor."""
    if identities < 2:
        raise SyntheticDataError(f"{name}: {identities} identities, need at least 2 for impostor pairs")
    rng = np.random.default_rng([seed, 13, stream])
    wanted: dict[int, list[int]] = {}
    plan = []
    for pair in range(num_pairs):
        if pair % 2 == 0:
            first = second = int(rng.integers(identities))
        else:
            first, second = (int(v) for v in rng.choice(identities, 2, replace=False))
        for identity in (first, second):
            wanted.setdefault(identity, []).append(2 * pair + len(plan) % 2)
            plan.append(identity)
    jobs = {identity: pool.submit(_identity_jpegs, seed, stream, identity, _SAMPLE_PAIRS, slots, size)
            for identity, slots in sorted(wanted.items())}
    images: list[bytes] = [b""] * (2 * num_pairs)
    for identity, job in jobs.items():
        for slot, jpeg in zip(wanted[identity], job.result()):
            images[slot] = jpeg
    return images, [pair % 2 == 0 for pair in range(num_pairs)]


def _image_size(image_size: Any) -> int:
    size = image_size if isinstance(image_size, int) else tuple(image_size)
    if isinstance(size, tuple):
        if len(size) != 2 or size[0] != size[1]:
            raise SyntheticDataError(f"image_size={image_size!r}: the generator makes square images, expected an "
                                     f"int or (n, n)")
        size = size[0]
    if int(size) < 32:
        raise SyntheticDataError(f"image_size={image_size!r}: expected at least 32 pixels")
    return int(size)


def make_identity_set(out_dir: str, num_identities: int, images_per_identity: int, num_val_identities: int,
                      num_val_pairs: int, seed: int = 0, image_size: Any = 112) -> str:
    """Write train.rec/train.idx/property plus synthetic_heldout.bin and synthetic_unseen.bin to ``out_dir``.

    The folder is built under a temporary name and renamed into place, so a reader never sees a
    half-written set. ``out_dir`` must not exist yet. Returns ``out_dir``.
    """
    size = _image_size(image_size)
    if num_identities < 1 or images_per_identity < 1:
        raise SyntheticDataError(f"num_identities={num_identities} images_per_identity={images_per_identity}: "
                                 f"expected both >= 1")
    if num_val_pairs < 0 or num_val_identities < 0:
        raise SyntheticDataError(f"num_val_pairs={num_val_pairs} num_val_identities={num_val_identities}: "
                                 f"expected both >= 0")
    if num_val_pairs and num_val_identities < 2:
        raise SyntheticDataError(f"num_val_identities={num_val_identities}: need at least 2 unseen identities "
                                 f"for {num_val_pairs} verification pairs")
    if os.path.exists(out_dir):
        raise SyntheticDataError(f"{out_dir}: already exists; remove it (or pass --force) to regenerate")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".tmp_" + os.path.basename(out_dir) + "_", dir=parent)
    try:
        _write_set(tmp_dir, num_identities, images_per_identity, num_val_identities, num_val_pairs, seed, size)
        try:
            os.rename(tmp_dir, out_dir)
        except OSError:
            if not os.path.isdir(out_dir):
                raise
            # Another process finished the same set first; theirs is identical (same seed).
            shutil.rmtree(tmp_dir, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def _write_set(folder: str, num_identities: int, images_per_identity: int, num_val_identities: int,
               num_val_pairs: int, seed: int, size: int) -> None:
    from utils.data.datasets import write_property  # imported here: it loads torch, which generating does not need

    samples = list(range(images_per_identity))
    # OpenCV and large numpy ops release the GIL, so threads give a real speed-up here.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        jobs = [pool.submit(_identity_jpegs, seed, _TRAIN, identity, _SAMPLE_TRAIN, samples, size)
                for identity in range(num_identities)]
        writer = recordio.MXIndexedRecordIO(os.path.join(folder, "train.idx"), os.path.join(folder, "train.rec"), "w")
        key = 1
        ranges = []
        for label, job in enumerate(jobs):
            first = key
            for jpeg in job.result():
                writer.write_idx(key, recordio.pack(recordio.IRHeader(0, float(label), key, 0), jpeg))
                key += 1
            ranges.append((first, key))
        first_identity_key = key
        for first, end in ranges:  # identity records, then header0 last (InsightFace RecBuilder order)
            writer.write_idx(key, recordio.pack(recordio.IRHeader(0, [first, end], key, 0), b""))
            key += 1
        writer.write_idx(0, recordio.pack(recordio.IRHeader(0, [first_identity_key, key], 0, 1), b""))
        writer.close()
        write_property(os.path.join(folder, "property"), num_identities, size)
        if num_val_pairs:
            heldout = _pairs(seed, _TRAIN, num_identities, num_val_pairs, size, pool, "synthetic_heldout")
            unseen = _pairs(seed, _UNSEEN, num_val_identities, num_val_pairs, size, pool, "synthetic_unseen")
            for name, content in (("synthetic_heldout.bin", heldout), ("synthetic_unseen.bin", unseen)):
                with open(os.path.join(folder, name), "wb") as handle:
                    pickle.dump(content, handle, protocol=pickle.HIGHEST_PROTOCOL)
    params = {"num_identities": num_identities, "images_per_identity": images_per_identity,
              "num_val_identities": num_val_identities, "num_val_pairs": num_val_pairs, "seed": seed,
              "image_size": size, "generator_version": GENERATOR_VERSION}
    with open(os.path.join(folder, "synthetic.json"), "w") as handle:
        json.dump(params, handle, indent=1, sort_keys=True)


def identity_set_params(cfg: Any) -> dict[str, Any]:
    """The generator's parameters from ``cfg.synthetic`` (they name the cached set)."""
    synthetic = cfg.synthetic
    return {"num_identities": int(synthetic.num_identities), "images_per_identity": int(synthetic.images_per_identity),
            "num_val_identities": int(synthetic.num_val_identities), "num_val_pairs": int(synthetic.num_val_pairs),
            "seed": int(cfg.seed), "image_size": _image_size(cfg.image_size)}


def ensure_identity_set(cfg: Any) -> str:
    """Folder of the synthetic identity set that ``cfg.synthetic`` describes, generated once and cached."""
    params = identity_set_params(cfg)
    if params["num_identities"] <= 0:
        raise SyntheticDataError("config key 'synthetic.num_identities' is 0; set it > 0 to generate an identity set")
    digest = hashlib.sha1(json.dumps({**params, "generator_version": GENERATOR_VERSION},
                                     sort_keys=True).encode()).hexdigest()[:10]
    cache_dir = cfg.synthetic.get("cache_dir") or "data_cache"
    folder = os.path.join(cache_dir, f"synthetic_{digest}")
    if os.path.isfile(os.path.join(folder, "train.idx")):
        return folder
    logger.info("generating synthetic identity set %s (%d identities x %d images)", folder,
                params["num_identities"], params["images_per_identity"])
    return make_identity_set(folder, **params)


def identity_set_labels(folder: str) -> np.ndarray | None:
    """Class of every training image of a generated identity set (identity i owns images
    i*K .. i*K+K-1, the order _write_set writes them), from its synthetic.json; None when ``folder``
    is not a generated set."""
    path = os.path.join(folder, "synthetic.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as handle:
            params = json.load(handle)
        num_identities, per_identity = int(params["num_identities"]), int(params["images_per_identity"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SyntheticDataError(f"{path}: unreadable generator parameters ({type(exc).__name__}); "
                                 f"regenerate the set") from exc
    return np.repeat(np.arange(num_identities, dtype=np.int64), per_identity)
