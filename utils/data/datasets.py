"""The training Dataset classes: InsightFace RecordIO sets, image folders and random tensors.

Every dataset yields ``(uint8 CHW RGB tensor, int label)`` with the random horizontal flip
already applied; images stay uint8 until ``dataset.normalize_batch`` runs on the training device,
so workers move a quarter of the bytes float32 would need. A corrupt sample is skipped, counted
(in shared memory, so DataLoader workers' counts reach the trainer) and replaced by another. The
on-disk helpers they rely on live here too: the ``property`` file and the image-folder scan.
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from utils.data import recordio
from utils.data.errors import DatasetError
from utils.data.recordio import BadRecordError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
# Counter slots: 0 = main process, 1 + worker_id for DataLoader workers (no two writers per slot).
_COUNTER_SLOTS = 257
_MAX_SUBSTITUTIONS = 32
RANDOM_DEFAULT_CLASSES = 1000
RANDOM_DEFAULT_IMAGES = 100_000
# `rec` values that mean random tensors: "random", and arcface_torch's spelling "synthetic" (not to be
# confused with the generated identity set of `cfg.synthetic`, which train.py resolves to a folder first).
RANDOM_SOURCES = ("random", "synthetic")


def as_hw(image_size: Any) -> tuple[int, int]:
    """``image_size`` (an int or a (height, width) pair) as (height, width)."""
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = (int(v) for v in image_size)
    return height, width


def _decode(img_bytes: bytes, where: str, image_size: tuple[int, int]) -> np.ndarray:
    import cv2

    image = recordio.decode_image(img_bytes, where)
    if image.shape[:2] != image_size:
        image = cv2.resize(image, (image_size[1], image_size[0]), interpolation=cv2.INTER_LINEAR)
    return image


class FaceDataset(Dataset):
    """Shared skip-and-count handling of corrupt samples plus the random flip."""

    def __init__(self, image_size: Any, flip: bool, skip_bad_records: bool) -> None:
        self.image_size = as_hw(image_size)
        self.flip = flip
        self.skip_bad_records = skip_bad_records
        # Shared memory, so counts made inside DataLoader workers are visible to the trainer.
        self.bad_record_counter = torch.zeros(_COUNTER_SLOTS, dtype=torch.int64).share_memory_()
        # One flag per sample (shared memory too): check_bad_records counts distinct corrupt samples,
        # so a bad record met again in every epoch is still one record. Subclasses size it.
        self.bad_record_flags: torch.Tensor | None = None
        # Flips are a pure function of (seed, epoch, index), so a resumed run flips exactly the
        # same samples as an uninterrupted one; the sampler writes the epoch here (shared memory).
        self.flip_seed = 0
        self.flip_epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def load(self, index: int) -> tuple[np.ndarray, int]:
        """RGB uint8 HWC image (already image_size) and class of sample ``index``."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def index_sha256(self) -> str:
        """Hash of what identifies this data without reading an image (its index / file list and labels):
        a checkpoint records it, so resuming on replaced data is noticed."""
        raise NotImplementedError

    def _should_flip(self, index: int) -> bool:
        # splitmix64 finaliser over (seed, epoch, index): cheap, well mixed, no RNG state to carry.
        value = (self.flip_seed * 0x9E3779B97F4A7C15 + int(self.flip_epoch[0]) * 0xBF58476D1CE4E5B9
                 + index * 0x94D049BB133111EB + 1) & 0xFFFFFFFFFFFFFFFF
        value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return bool((value ^ (value >> 31)) & 1)

    def _allocate_bad_record_flags(self) -> None:
        self.bad_record_flags = torch.zeros(len(self), dtype=torch.uint8).share_memory_()

    def _count_bad(self, index: int) -> None:
        info = get_worker_info()
        slot = 0 if info is None else 1 + info.id % (_COUNTER_SLOTS - 1)
        self.bad_record_counter[slot] += 1
        if self.bad_record_flags is not None:
            self.bad_record_flags[index] = 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        candidate = int(index)
        for attempt in range(_MAX_SUBSTITUTIONS + 1):
            try:
                image, label = self.load(candidate)
                break
            except BadRecordError as exc:
                if not self.skip_bad_records:
                    raise
                self._count_bad(candidate)
                logger.warning("skipping bad sample (skip_bad_records=True): %s", exc)
                # Substitute another sample so the batch keeps its size; a large odd stride
                # keeps the substitute away from a corrupt neighbourhood.
                candidate = (candidate + 7919 * (attempt + 1)) % len(self)
        else:
            raise DatasetError(f"{_MAX_SUBSTITUTIONS + 1} bad samples in a row starting at index {index}; "
                               f"the data looks broadly corrupt")
        import cv2

        if self.flip and self._should_flip(int(index)):
            image = cv2.flip(image, 1)
        # HWC -> CHW with cv2.split into the planes of one array: several times faster than a
        # numpy transpose copy, which matters next to a ~0.3 ms JPEG decode.
        chw = np.empty((3,) + image.shape[:2], np.uint8)
        cv2.split(np.ascontiguousarray(image), [chw[0], chw[1], chw[2]])
        return torch.from_numpy(chw), label


class RecordDataset(FaceDataset):
    """``root/train.rec`` + ``root/train.idx`` in either InsightFace layout (``name`` picks another pair:
    a shard ``root/train_3.rec`` + ``.idx``, whose property file is ``root/train_3.property``).

    header layout: key 0 is a header (flag > 0, no image bytes, labels [first_identity_key, end));
    images are keys 1..label[0]-1. plain layout: every key in the .idx is an image. ``strict_labels``:
    a label outside 0..num_classes-1 is a DatasetError (the run stops) instead of a skipped bad record;
    several sources use it, since a wrong label there lands on another source's identity.
    """

    def __init__(self, root: str, image_size: Any = (112, 112), flip: bool = True,
                 skip_bad_records: bool = True, name: str = "train", strict_labels: bool = False) -> None:
        super().__init__(image_size, flip, skip_bad_records)
        self.root = root
        self.strict_labels = strict_labels
        self.rec_path = os.path.join(root, f"{name}.rec")
        self.idx_path = os.path.join(root, f"{name}.idx")
        self.property_path = os.path.join(root, "property" if name == "train" else f"{name}.property")
        self.reader = recordio.MXIndexedRecordIO(self.idx_path, self.rec_path, "r")
        self.header0: tuple[int, int] | None = None
        if 0 in self.reader:
            header, img = recordio.unpack(self.reader.read_idx(0), f"{self.rec_path}: key 0")
            if header.flag > 0 and len(img) == 0:
                self.header0 = (int(header.label[0]), int(header.label[1]))
        if self.header0 is not None:
            self.layout = "header"
            first_identity, end_identity = self.header0
            if end_identity >= recordio.FLOAT32_EXACT_LIMIT:
                recordio.warn_float32("identity key", end_identity)
            if first_identity < 2 or end_identity <= first_identity:
                raise DatasetError(f"{self.rec_path}: header0 labels [{first_identity}, {end_identity}) are not a "
                                   f"valid identity key range (expected 1 < first < end)")
            self.image_keys = np.arange(1, first_identity, dtype=np.int64)
            missing = self.image_keys[~np.isin(self.image_keys, self.reader.key_array)]
            if len(missing):
                raise DatasetError(f"{self.idx_path}: header0 says images are keys 1..{first_identity - 1}, "
                                   f"but key {int(missing[0])} is not in the index ({len(missing)} missing)")
            self.num_classes = end_identity - first_identity
        else:
            self.layout = "plain"
            self.image_keys = self.reader.key_array.copy()
            self.num_classes = self._plain_num_classes()
        self.num_image = len(self.image_keys)
        self._check_pairing()
        self._allocate_bad_record_flags()

    def _check_pairing(self) -> None:
        """Refuse a .idx/.rec/property set that cannot belong together (cheap: no image is read)."""
        reader, keys, offsets = self.reader, self.reader.key_array, self.reader.offset_array
        hint = "the .idx and .rec come from different packs, or one of them is truncated"
        past = offsets >= reader.file_size
        if past.any():
            first = int(np.argmax(past))
            raise DatasetError(f"{self.idx_path}: {int(past.sum())} of {len(keys)} entries point past the end of "
                               f"{self.rec_path} ({reader.file_size} bytes), e.g. key {int(keys[first])} at offset "
                               f"{int(offsets[first])}: {hint}")
        if self.layout == "header":
            end = self.header0[1]
            outside = (keys < 0) | (keys >= end)
            if outside.any():
                raise DatasetError(f"{self.idx_path}: {len(keys)} entries, {int(outside.sum())} of them outside the "
                                   f"keys 0..{end - 1} that header0 of {self.rec_path} describes (e.g. key "
                                   f"{int(keys[np.argmax(outside)])}): {hint}")
            prop = self.property_path
            if os.path.isfile(prop) and read_property(prop)[0] != self.num_classes:
                raise DatasetError(f"{prop}: says {read_property(prop)[0]} classes, but header0 of {self.rec_path} "
                                   f"describes {self.num_classes}: the files come from different packs")
        # A record starts with the RecordIO magic: sample up to 64 offsets spread over the file.
        sample = offsets[np.unique(np.linspace(0, len(offsets) - 1, min(64, len(offsets))).astype(np.int64))]
        fd = reader._fd_for_process()
        wrong = sum(os.pread(fd, 4, int(offset)) != recordio.MAGIC_BYTES for offset in sample)
        if wrong * 2 > len(sample):  # a few bad records are skipped later; most of them means a wrong pair
            raise DatasetError(f"{self.idx_path}: {wrong} of {len(sample)} sampled offsets do not point at a record "
                               f"in {self.rec_path} (no RecordIO magic there): {hint}")

    def _plain_num_classes(self) -> int:
        prop = self.property_path
        if os.path.isfile(prop):
            return read_property(prop)[0]
        logger.info("%s has no property file: scanning %d record headers for the class count",
                    self.root, len(self.image_keys))
        return int(self.labels().max()) + 1

    def __len__(self) -> int:
        return len(self.image_keys)

    def read_record(self, index: int) -> tuple[recordio.IRHeader, bytes, int]:
        """(header, image bytes, key) of sample ``index``; a read error is a BadRecordError naming the key."""
        key = int(self.image_keys[index])
        where = f"{self.rec_path}: key {key}"
        try:
            header, img = recordio.unpack(self.reader.read_idx(key), where)
        except OSError as exc:
            raise BadRecordError(f"{where}: cannot read: {exc.strerror}") from exc
        return header, img, key

    def index_sha256(self) -> str:
        """SHA-256 of the .idx (every key and offset) and the .rec size: replaced records move the offsets."""
        digest = hashlib.sha256(np.ascontiguousarray(self.reader.key_array, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(self.reader.offset_array, dtype=np.int64).tobytes())
        digest.update(f"{self.reader.file_size}".encode())
        return digest.hexdigest()

    def labels(self) -> np.ndarray:
        """Class of every image (reads every record header; used by tools, not training)."""
        return np.array([recordio.class_of(self.read_record(i)[0]) for i in range(len(self))], dtype=np.int64)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        """Decoded image (HWC RGB uint8 at ``image_size``) and class of sample ``index``."""
        header, img, key = self.read_record(index)
        where = f"{self.rec_path}: key {key}"
        label = recordio.class_of(header)
        if not 0 <= label < self.num_classes:
            error = DatasetError if self.strict_labels else BadRecordError
            raise error(f"{where}: label {label} out of range, expected 0 <= label < num_classes={self.num_classes} "
                        f"(its property file or header0 declares {self.num_classes} classes)")
        return _decode(img, where, self.image_size), label


def read_property(path: str) -> tuple[int, int, int]:
    """``property`` file ``num_classes,height,width`` (InsightFace)."""
    try:
        with open(path) as handle:
            text = handle.read().strip()
        num_classes, height, width = (int(v) for v in text.split(","))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: expected one line 'num_classes,height,width', "
                           f"could not parse it ({type(exc).__name__})") from exc
    return num_classes, height, width


def write_property(path: str, num_classes: int, image_size: Any) -> None:
    """Write InsightFace's ``property`` file (``num_classes,height,width``), atomically."""
    height, width = as_hw(image_size)
    temporary = f"{path}.tmp.{os.getpid()}"
    with open(temporary, "w") as handle:
        handle.write(f"{num_classes},{height},{width}\n")
    os.replace(temporary, path)


def scan_image_folder(root: str) -> tuple[list[str], list[int], list[str]]:
    """``root/<identity>/<image>``: (paths, labels, identity names); classes by sorted folder name.

    Class ids are the positions of the identity folders in sorted order, so they must not shift: an
    identity folder without any image file is an error (remove it or add images) rather than being
    skipped. Hidden folders (``.name``, e.g. ``.ipynb_checkpoints``) are not identities.
    """
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: not a folder, expected root/<identity>/<image>.jpg")
    entries = list(os.scandir(root))
    identities = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not identities:
        loose = sum(e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in entries)
        found = f"found {loose} images directly in it" if loose else "found none"
        raise DatasetError(f"{root}: no identity folders ({found}), expected root/<identity>/<image> files ending "
                           f"in {'/'.join(IMAGE_EXTENSIONS)}")
    paths, labels, empty = [], [], []
    for label, identity in enumerate(identities):
        folder = os.path.join(root, identity)
        files = sorted(e.name for e in os.scandir(folder) if e.name.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            empty.append(folder)
        paths.extend(os.path.join(folder, f) for f in files)
        labels.extend([label] * len(files))
    if not paths:
        raise DatasetError(f"{root}: no images found in its {len(identities)} identity folders, expected "
                           f"root/<identity>/<image> files ending in {'/'.join(IMAGE_EXTENSIONS)}")
    if empty:
        raise DatasetError(f"{empty[0]}: identity folder holds no image file ({'/'.join(IMAGE_EXTENSIONS)}); "
                           f"{len(empty)} of {len(identities)} identity folders are empty: class ids follow the "
                           f"sorted folder names, so remove the empty folders or add images")
    return paths, labels, identities


def read_image_file(path: str, image_size: tuple[int, int]) -> np.ndarray:
    """Decode an image file to HWC RGB uint8 at ``image_size``; a bad file is a BadRecordError naming it."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise BadRecordError(f"{path}: cannot read the image file ({exc.strerror or exc})") from exc
    return _decode(data.tobytes(), path, image_size)


class ImageFolderDataset(FaceDataset):
    """``root/<identity>/<images>`` (jpg/jpeg/png/bmp); class ids follow sorted folder names."""

    def __init__(self, root: str, image_size: Any = (112, 112), flip: bool = True,
                 skip_bad_records: bool = True) -> None:
        super().__init__(image_size, flip, skip_bad_records)
        self.root = root
        self.paths, labels, self.identities = scan_image_folder(root)
        self.labels_array = np.asarray(labels, dtype=np.int64)
        self.num_classes = len(self.identities)
        self.num_image = len(self.paths)
        self._allocate_bad_record_flags()

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        """Decoded image and class of sample ``index``."""
        return read_image_file(self.paths[index], self.image_size), int(self.labels_array[index])

    def index_sha256(self) -> str:
        """SHA-256 of every image's path under ``root`` and its label (the folder may move; no image is read)."""
        prefix = len(os.path.join(self.root, ""))  # scan_image_folder joins every path onto root
        names = "\0".join(path[prefix:] for path in self.paths)
        digest = hashlib.sha256(names.encode("utf-8", "surrogateescape"))
        digest.update(self.labels_array.tobytes())
        return digest.hexdigest()

    def labels(self) -> np.ndarray:
        """Class of every image (from the folder names; no image is read)."""
        return self.labels_array.copy()


class RandomTensorDataset(FaceDataset):
    """Random tensors (``rec="random"``, arcface_torch's ``rec="synthetic"``): speed tests without data I/O."""

    def __init__(self, num_image: int = RANDOM_DEFAULT_IMAGES, num_classes: int = RANDOM_DEFAULT_CLASSES,
                 image_size: Any = (112, 112), seed: int = 0) -> None:
        super().__init__(image_size, flip=False, skip_bad_records=False)
        self.num_image, self.num_classes = int(num_image), int(num_classes)
        generator = torch.Generator().manual_seed(seed)
        height, width = self.image_size
        self.image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)

    def __len__(self) -> int:
        return self.num_image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.image, int(index) % self.num_classes

    def index_sha256(self) -> str:
        """SHA-256 of the counts: random tensors are described by them alone."""
        return hashlib.sha256(f"random {self.num_image} {self.num_classes}".encode()).hexdigest()

    def labels(self) -> np.ndarray:
        """Class of every sample: index modulo num_classes, as ``__getitem__`` gives."""
        return np.arange(self.num_image, dtype=np.int64) % self.num_classes
