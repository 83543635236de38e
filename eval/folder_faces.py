"""Photos of an identity folder made into embeddings: scanning, detection and alignment by the model's
convention (utils/faces/prepare.py), or ready crops, and the embedding cache.

The cache holds one file per (model file content, face preparation): ``<sha256 of the model>_<convention>.npz``
with, per photo content hash, the embedding of the face and of its mirror image, and the photos that gave no
face. A photo is embedded again only when its bytes, the model file or the preparation change.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from eval.embed import embed_images

CHUNK = 64  # photos read, detected and embedded together


class FolderError(ValueError):
    """A folder, model or option that cannot be evaluated; the message is one line."""


@dataclass
class Photo:
    """One file under ROOT: its path relative to ROOT, identity (first folder) and content hash."""

    relative: str
    identity: str
    sha256: str


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def scan(root: str, what: str = "ROOT") -> tuple[list[Photo], list[str]]:
    """(photos in ROOT/<identity>/..., files directly in ROOT); every non-hidden file counts as a photo, so one
    that is not an image is reported as unreadable later rather than skipped here."""
    if not os.path.isdir(root):
        raise FolderError(f"{what} {root}: no such folder")
    photos, loose = [], []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        relative_folder = os.path.relpath(folder, root)
        for name in sorted(files):
            if name.startswith("."):
                continue
            if relative_folder == ".":
                loose.append(name)
                continue
            relative = os.path.normpath(os.path.join(relative_folder, name))
            photos.append(Photo(relative, relative.split(os.sep)[0], file_sha256(os.path.join(root, relative))))
    if not photos:
        raise FolderError(f"{what} {root}: no photos found, expected {what}/<identity>/<photo>")
    return photos, loose


@dataclass
class Embeddings:
    """A model's embeddings of a photo list: rows of ``plain``/``flipped`` for the photos in ``rows``;
    ``failed`` maps the others to why (``unreadable``, ``no_face``)."""

    rows: dict[str, int] = field(default_factory=dict)
    plain: np.ndarray | None = None
    flipped: np.ndarray | None = None
    failed: dict[str, str] = field(default_factory=dict)
    embedded_now: int = 0
    from_cache: int = 0


class EmbeddingCache:
    """The cache file of one (model file, convention); ``get``/``put`` by photo content hash."""

    def __init__(self, cache_dir: str, model_sha256: str, convention: str) -> None:
        self.path = os.path.join(cache_dir, f"{model_sha256[:20]}_{convention}.npz")
        self.vectors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.failed: dict[str, str] = {}
        if os.path.isfile(self.path):
            try:
                with np.load(self.path, allow_pickle=False) as data:
                    for key, plain, flipped in zip(data["keys"], data["plain"], data["flipped"]):
                        self.vectors[str(key)] = (plain, flipped)
                    self.failed = {str(k): str(v) for k, v in zip(data["failed_keys"], data["failed_status"])}
            except (OSError, ValueError, KeyError):
                self.vectors, self.failed = {}, {}  # a damaged cache is rebuilt, never trusted
        self.changed = False

    def put(self, key: str, plain: np.ndarray | None, flipped: np.ndarray | None, status: str = "ok") -> None:
        """Remember a photo's embeddings, or (``status`` != ok) that it gave no usable face."""
        if status == "ok":
            self.vectors[key] = (plain, flipped)
        else:
            self.failed[key] = status
        self.changed = True

    def save(self) -> None:
        """Write the cache file atomically (only when something was added)."""
        if not self.changed:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        keys = sorted(self.vectors)
        dim = len(next(iter(self.vectors.values()))[0]) if keys else 0
        temporary = self.path + ".tmp.npz"
        np.savez(temporary, keys=np.array(keys, dtype="U64"),
                 plain=np.array([self.vectors[k][0] for k in keys], np.float32).reshape(len(keys), dim),
                 flipped=np.array([self.vectors[k][1] for k in keys], np.float32).reshape(len(keys), dim),
                 failed_keys=np.array(sorted(self.failed), dtype="U64"),
                 failed_status=np.array([self.failed[k] for k in sorted(self.failed)], dtype="U32"))
        os.replace(temporary, self.path)
        self.changed = False


class FacePreparer:
    """Turns photo bytes into model inputs: a ready crop (``crops``) or MTCNN's largest face prepared by
    the convention of ``image_size``; detections are kept per content hash for the next model."""

    def __init__(self, crops: bool, margin: int = 0, min_face_size: float = 20) -> None:
        self.crops, self.margin, self.min_face_size = crops, margin, min_face_size
        self._detector: Any = None
        self._detections: dict[str, tuple] = {}

    def convention(self, image_size: tuple[int, int]) -> str:
        """The cache's name for how faces are prepared for a model of ``image_size``."""
        from utils.faces.align import AlignmentError
        from utils.faces.prepare import convention

        if self.crops:
            return f"crops-{image_size[0]}x{image_size[1]}"
        try:
            return convention(image_size, self.margin)
        except AlignmentError as exc:
            raise FolderError(f"{exc} (use --crops with ready crops)") from None

    def faces(self, datas: list[bytes], keys: list[str], image_size: tuple[int, int]) -> list[np.ndarray | str]:
        """Per photo: uint8 RGB [H, W, 3] face, or the reason there is none (``unreadable``/``no_face``)."""
        from utils.faces.prepare import decode_photo, model_face

        if self.crops:
            return [self._crop(data, image_size) for data in datas]
        images = [decode_photo(data) for data in datas]
        todo = [i for i, image in enumerate(images) if image is not None and keys[i] not in self._detections]
        if todo:
            # the process's cores, one photo per thread (MTCNN's small kernels use cores better side by side),
            # at most 8: a 12-megapixel photo's detection peaks at ~0.3 GB
            workers = max(1, min(8, torch.get_num_threads()))
            for i, found in zip(todo, self.detector().detect_batch([images[i] for i in todo], workers=workers)):
                self._detections[keys[i]] = found
        out: list[np.ndarray | str] = []
        for image, key in zip(images, keys):
            if image is None:
                out.append("unreadable")
                continue
            boxes, _, landmarks = self._detections[key]
            try:
                out.append(model_face(image, boxes[0], landmarks[0], image_size, self.detector(), self.margin)
                           if len(boxes) else "no_face")
            except ValueError:  # a box with no pixels inside the photo (MTCNNError): no usable face
                out.append("no_face")
        return out

    def detector(self) -> Any:
        """MTCNN, made on first use (a run with every face cached never loads it)."""
        if self._detector is None:
            from utils.faces.mtcnn import MTCNN
            self._detector = MTCNN(min_face_size=self.min_face_size)
        return self._detector

    @staticmethod
    def _crop(data: bytes, image_size: tuple[int, int]) -> np.ndarray | str:
        from eval.verification import VerificationError, decode_image

        try:  # decoded exactly as a .bin's images are (short side resized, centre crop)
            return decode_image(data, image_size)
        except VerificationError:
            return "unreadable"


def embed_photos(model: Any, root: str, photos: list[Photo], preparer: FacePreparer, cache: EmbeddingCache,
                 image_size: tuple[int, int], device: torch.device, batch_size: int = 64) -> Embeddings:
    """Embeddings of ``photos`` (cached ones are read, the rest detected, prepared and embedded)."""
    result = Embeddings()
    vectors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    result.from_cache = sum(photo.sha256 in cache.vectors for photo in photos)
    todo = [photo for photo in photos if photo.sha256 not in cache.vectors and photo.sha256 not in cache.failed]
    unique_todo = list({photo.sha256: photo for photo in todo}.values())
    for start in range(0, len(unique_todo), CHUNK):
        chunk = unique_todo[start:start + CHUNK]
        datas = []
        for photo in chunk:
            with open(os.path.join(root, photo.relative), "rb") as handle:
                datas.append(handle.read())
        faces = preparer.faces(datas, [photo.sha256 for photo in chunk], image_size)
        ready = [(photo, face) for photo, face in zip(chunk, faces) if not isinstance(face, str)]
        for photo, face in zip(chunk, faces):
            if isinstance(face, str):
                cache.put(photo.sha256, None, None, face)
        if ready:
            images = torch.from_numpy(np.stack([np.ascontiguousarray(face.transpose(2, 0, 1)) for _, face in ready]))
            plain, flipped = embed_images(model, images, device, batch_size, flip=True)
            for (photo, _), one, mirrored in zip(ready, plain.numpy(), flipped.numpy()):
                cache.put(photo.sha256, one, mirrored)
            result.embedded_now += len(ready)
    cache.save()
    for photo in photos:
        if photo.sha256 in cache.vectors:
            vectors[photo.relative] = cache.vectors[photo.sha256]
        else:
            result.failed[photo.relative] = cache.failed[photo.sha256]
    usable = [photo.relative for photo in photos if photo.relative in vectors]
    result.rows = {relative: row for row, relative in enumerate(usable)}
    if usable:
        result.plain = np.stack([vectors[relative][0] for relative in usable]).astype(np.float32)
        result.flipped = np.stack([vectors[relative][1] for relative in usable]).astype(np.float32)
    return result
