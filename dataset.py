"""Training data: InsightFace RecordIO sets, image folders, random tensors, and the distributed loader.

Every dataset yields ``(uint8 CHW RGB tensor, int label)`` with the random horizontal flip
already applied; images stay uint8 until ``normalize_batch`` runs on the training device, so
workers move a quarter of the bytes float32 would need.
"""
from __future__ import annotations

import logging
import os
import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from utils import recordio
from utils.recordio import BadRecordError, RecordIOError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
# Counter slots: 0 = main process, 1 + worker_id for DataLoader workers (no two writers per slot).
_COUNTER_SLOTS = 257
_MAX_SUBSTITUTIONS = 32
SYNTHETIC_DEFAULT_CLASSES = 1000
SYNTHETIC_DEFAULT_IMAGES = 100_000


class DatasetError(ValueError):
    """Unusable training data or a config that disagrees with it; the message is one line."""


def _as_hw(image_size: Any) -> tuple[int, int]:
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


class _FaceDataset(Dataset):
    """Shared skip-and-count handling of corrupt samples plus the random flip."""

    def __init__(self, image_size: Any, flip: bool, skip_bad_records: bool) -> None:
        self.image_size = _as_hw(image_size)
        self.flip = flip
        self.skip_bad_records = skip_bad_records
        # Shared memory, so counts made inside DataLoader workers are visible to the trainer.
        self.bad_record_counter = torch.zeros(_COUNTER_SLOTS, dtype=torch.int64).share_memory_()
        # Flips are a pure function of (seed, epoch, index), so a resumed run flips exactly the
        # same samples as an uninterrupted one; the sampler writes the epoch here (shared memory).
        self.flip_seed = 0
        self.flip_epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def load(self, index: int) -> tuple[np.ndarray, int]:
        """RGB uint8 HWC image (already image_size) and class of sample ``index``."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def _should_flip(self, index: int) -> bool:
        # splitmix64 finaliser over (seed, epoch, index): cheap, well mixed, no RNG state to carry.
        value = (self.flip_seed * 0x9E3779B97F4A7C15 + int(self.flip_epoch[0]) * 0xBF58476D1CE4E5B9
                 + index * 0x94D049BB133111EB + 1) & 0xFFFFFFFFFFFFFFFF
        value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return bool((value ^ (value >> 31)) & 1)

    def _count_bad(self) -> None:
        info = get_worker_info()
        slot = 0 if info is None else 1 + info.id % (_COUNTER_SLOTS - 1)
        self.bad_record_counter[slot] += 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        candidate = int(index)
        for attempt in range(_MAX_SUBSTITUTIONS + 1):
            try:
                image, label = self.load(candidate)
                break
            except BadRecordError as exc:
                if not self.skip_bad_records:
                    raise
                self._count_bad()
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


class RecordDataset(_FaceDataset):
    """``root/train.rec`` + ``root/train.idx`` in either InsightFace layout.

    header layout: key 0 is a header (flag > 0, no image bytes, labels [first_identity_key, end));
    images are keys 1..label[0]-1. plain layout: every key in the .idx is an image.
    """

    def __init__(self, root: str, image_size: Any = (112, 112), flip: bool = True,
                 skip_bad_records: bool = True) -> None:
        super().__init__(image_size, flip, skip_bad_records)
        self.root = root
        self.rec_path = os.path.join(root, "train.rec")
        self.idx_path = os.path.join(root, "train.idx")
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
                recordio._warn_float32("identity key", end_identity)
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

    def _plain_num_classes(self) -> int:
        prop = os.path.join(self.root, "property")
        if os.path.isfile(prop):
            return read_property(prop)[0]
        logger.info("%s has no property file: scanning %d record headers for the class count",
                    self.root, len(self.image_keys))
        return int(self.labels().max()) + 1

    def __len__(self) -> int:
        return len(self.image_keys)

    def read_record(self, index: int) -> tuple[recordio.IRHeader, bytes, int]:
        key = int(self.image_keys[index])
        where = f"{self.rec_path}: key {key}"
        try:
            header, img = recordio.unpack(self.reader.read_idx(key), where)
        except OSError as exc:
            raise BadRecordError(f"{where}: cannot read: {exc.strerror}") from exc
        return header, img, key

    def labels(self) -> np.ndarray:
        """Class of every image (reads every record header; used by tools, not training)."""
        return np.array([recordio.class_of(self.read_record(i)[0]) for i in range(len(self))], dtype=np.int64)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        header, img, key = self.read_record(index)
        where = f"{self.rec_path}: key {key}"
        label = recordio.class_of(header)
        if not 0 <= label < self.num_classes:
            raise BadRecordError(f"{where}: label {label} out of range, expected 0 <= label < "
                                 f"num_classes={self.num_classes}")
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
    height, width = _as_hw(image_size)
    with open(path, "w") as handle:
        handle.write(f"{num_classes},{height},{width}\n")


def scan_image_folder(root: str) -> tuple[list[str], list[int], list[str]]:
    """``root/<identity>/<image>``: (paths, labels, identity names); classes by sorted folder name."""
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: not a folder, expected root/<identity>/<image>.jpg")
    identities = sorted(e.name for e in os.scandir(root) if e.is_dir())
    paths, labels, names = [], [], []
    for identity in identities:
        folder = os.path.join(root, identity)
        files = sorted(e.name for e in os.scandir(folder) if e.name.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            continue  # an empty identity folder gets no class id
        label = len(names)
        names.append(identity)
        paths.extend(os.path.join(folder, f) for f in files)
        labels.extend([label] * len(files))
    if not paths:
        raise DatasetError(f"{root}: no images found, expected root/<identity>/<image> files ending in "
                           f"{'/'.join(IMAGE_EXTENSIONS)}")
    return paths, labels, names


def read_image_file(path: str, image_size: tuple[int, int]) -> np.ndarray:
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise BadRecordError(f"{path}: cannot read the image file ({exc.strerror or exc})") from exc
    return _decode(data.tobytes(), path, image_size)


class ImageFolderDataset(_FaceDataset):
    """``root/<identity>/<images>`` (jpg/jpeg/png/bmp); class ids follow sorted folder names."""

    def __init__(self, root: str, image_size: Any = (112, 112), flip: bool = True,
                 skip_bad_records: bool = True) -> None:
        super().__init__(image_size, flip, skip_bad_records)
        self.root = root
        self.paths, labels, self.identities = scan_image_folder(root)
        self.labels_array = np.asarray(labels, dtype=np.int64)
        self.num_classes = len(self.identities)
        self.num_image = len(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        return read_image_file(self.paths[index], self.image_size), int(self.labels_array[index])


class SyntheticDataset(_FaceDataset):
    """Random images (arcface_torch's ``rec="synthetic"``): measures speed without any data I/O."""

    def __init__(self, num_image: int = SYNTHETIC_DEFAULT_IMAGES, num_classes: int = SYNTHETIC_DEFAULT_CLASSES,
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


class ResumableDistributedSampler(Sampler[int]):
    """Seeded per-epoch shuffle split across ranks, resumable mid-epoch on any world size.

    Rank r yields ``rest[r::world_size]`` of ``rest = perm[consumed:]``, cut so every rank yields
    the same count. ``consumed`` counts global samples, so a checkpoint taken with one world size
    continues exactly with another.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int, shuffle: bool = True) -> None:
        if num_samples < 1:
            raise DatasetError(f"sampler: num_samples={num_samples}, expected at least 1 sample")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DatasetError(f"sampler: rank={rank} world_size={world_size}, expected 0 <= rank < world_size")
        self.num_samples, self.rank, self.world_size = int(num_samples), int(rank), int(world_size)
        self.seed, self.shuffle = int(seed), shuffle
        self.epoch, self.consumed = 0, 0
        self._resume_epoch: int | None = None
        self.shared_epoch: torch.Tensor | None = None  # get_dataloader links the dataset's flip epoch

    def set_epoch(self, epoch: int) -> None:
        if self._resume_epoch is None or self._resume_epoch != epoch:
            self.consumed = 0
        self._resume_epoch = None
        self.epoch = int(epoch)
        if self.shared_epoch is not None:
            self.shared_epoch.fill_(self.epoch)

    def advance(self, num_global_samples: int) -> None:
        self.consumed = min(self.consumed + int(num_global_samples), self.num_samples)

    def _indices(self) -> torch.Tensor:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        rest = order[self.consumed:]
        per_rank = len(rest) // self.world_size
        return rest[self.rank::self.world_size][:per_rank]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices().tolist())

    def __len__(self) -> int:
        return (self.num_samples - self.consumed) // self.world_size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "seed": self.seed, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        missing = {"epoch", "seed", "consumed"} - set(state)
        if missing:
            raise DatasetError(f"sampler state: missing keys {sorted(missing)}, expected epoch, seed, consumed")
        if not 0 <= int(state["consumed"]) <= self.num_samples:
            raise DatasetError(f"sampler state: consumed={state['consumed']} does not fit a dataset of "
                               f"{self.num_samples} samples (was the data changed?)")
        if int(state["seed"]) != self.seed:
            logger.warning("sampler: checkpoint seed %s differs from config seed %s; keeping the checkpoint's "
                           "so the epoch continues in the same order", state["seed"], self.seed)
        self.epoch, self.seed, self.consumed = int(state["epoch"]), int(state["seed"]), int(state["consumed"])
        self._resume_epoch = self.epoch


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 in [-1, 1] as (x / 255 - 0.5) / 0.5, on the tensor's device."""
    return images.float().div_(255).sub_(0.5).div_(0.5)


def build_dataset(cfg: Any) -> _FaceDataset:
    """The dataset ``cfg.rec`` names: "synthetic", a RecordIO folder or an image folder."""
    source = cfg.rec
    image_size = _as_hw(cfg.image_size)
    skip = bool(cfg.get("skip_bad_records", True))
    if source == "synthetic":
        return SyntheticDataset(cfg.num_image or SYNTHETIC_DEFAULT_IMAGES, cfg.num_classes or SYNTHETIC_DEFAULT_CLASSES,
                                image_size, seed=cfg.seed)
    if not isinstance(source, str) or not source:
        raise DatasetError(f"config key 'rec': {source!r}, expected \"synthetic\", a folder with "
                           f"train.rec/train.idx, or an image folder")
    if not os.path.isdir(source):
        raise DatasetError(f"config key 'rec': {source} is not a folder, expected \"synthetic\", a folder with "
                           f"train.rec/train.idx, or an image folder")
    has_rec = os.path.exists(os.path.join(source, "train.rec"))
    has_idx = os.path.exists(os.path.join(source, "train.idx"))
    if has_rec or has_idx:
        try:
            return RecordDataset(source, image_size, flip=True, skip_bad_records=skip)
        except RecordIOError as exc:
            raise DatasetError(str(exc)) from exc
    return ImageFolderDataset(source, image_size, flip=True, skip_bad_records=skip)


def _reconcile(cfg: Any, dataset: _FaceDataset) -> None:
    for key in ("num_classes", "num_image"):
        from_data = int(getattr(dataset, key))
        configured = cfg.get(key)
        if configured is None:
            cfg[key] = from_data
        elif int(configured) != from_data:
            raise DatasetError(f"config key '{key}' is {configured} but the data in {cfg.rec} has {from_data}; "
                               f"set it to {from_data} or to None")


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random follow it.
    import cv2

    cv2.setNumThreads(1)  # one decode thread per worker: workers are the parallelism
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def get_dataloader(cfg: Any, rank: int, world_size: int, pin_memory: bool = False) -> DataLoader:
    """DataLoader over ``cfg.rec`` yielding (uint8 [B, 3, H, W] RGB, int64 [B]) with exact batch sizes."""
    if getattr(cfg, "dali", False):
        raise DatasetError("config key 'dali': True is not supported by ArcScale's loader; set dali=False "
                           "(the native loader reads the same .rec files; see docs/data.md)")
    dataset = build_dataset(cfg)
    _reconcile(cfg, dataset)
    sampler = ResumableDistributedSampler(len(dataset), rank, world_size, cfg.seed)
    dataset.flip_seed = int(cfg.seed)
    sampler.shared_epoch = dataset.flip_epoch
    generator = torch.Generator().manual_seed(int(cfg.seed) * 1009 + int(rank))
    num_workers = int(cfg.num_workers)
    return DataLoader(
        dataset,
        batch_size=int(cfg.batch_size),
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        worker_init_fn=_seed_worker,
        generator=generator,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        # Fresh worker processes: forking a trainer whose OpenCV/OpenMP thread pools have already
        # run (synthetic-set generation, verification decoding) can deadlock the child.
        multiprocessing_context="spawn" if num_workers > 0 else None,
    )


def bad_record_count(loader: DataLoader) -> int:
    """Corrupt samples skipped so far by this loader, summed over all its workers."""
    counter = getattr(loader.dataset, "bad_record_counter", None)
    return int(counter.sum()) if counter is not None else 0
