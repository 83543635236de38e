"""Training data: InsightFace RecordIO sets, image folders, random tensors, and the distributed loader.

Every dataset yields ``(uint8 CHW RGB tensor, int label)`` with the random horizontal flip
already applied; images stay uint8 until ``normalize_batch`` runs on the training device, so
workers move a quarter of the bytes float32 would need.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import logging.handlers
import os
import random
import threading
from dataclasses import dataclass
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
RANDOM_DEFAULT_CLASSES = 1000
RANDOM_DEFAULT_IMAGES = 100_000
# `rec` values that mean random tensors: "random", and arcface_torch's spelling "synthetic" (not to be
# confused with the generated identity set of `cfg.synthetic`, which train.py resolves to a folder first).
RANDOM_SOURCES = ("random", "synthetic")


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
            prop = os.path.join(self.root, "property")
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
        prop = os.path.join(self.root, "property")
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

    def labels(self) -> np.ndarray:
        """Class of every image (reads every record header; used by tools, not training)."""
        return np.array([recordio.class_of(self.read_record(i)[0]) for i in range(len(self))], dtype=np.int64)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        """Decoded image (HWC RGB uint8 at ``image_size``) and class of sample ``index``."""
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
    """Write InsightFace's ``property`` file (``num_classes,height,width``), atomically."""
    height, width = _as_hw(image_size)
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
        self._allocate_bad_record_flags()

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        """Decoded image and class of sample ``index``."""
        return read_image_file(self.paths[index], self.image_size), int(self.labels_array[index])

    def labels(self) -> np.ndarray:
        """Class of every image (from the folder names; no image is read)."""
        return self.labels_array.copy()


class RandomTensorDataset(_FaceDataset):
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

    def labels(self) -> np.ndarray:
        """Class of every sample: index modulo num_classes, as ``__getitem__`` gives."""
        return np.arange(self.num_image, dtype=np.int64) % self.num_classes


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
        """Start ``epoch`` (reshuffles); keeps the consumed count only when resuming into that epoch."""
        if self._resume_epoch is None or self._resume_epoch != epoch:
            self.consumed = 0
        self._resume_epoch = None
        self.epoch = int(epoch)
        if self.shared_epoch is not None:
            self.shared_epoch.fill_(self.epoch)

    def advance(self, num_global_samples: int) -> None:
        """Count ``num_global_samples`` more samples as consumed (all ranks together)."""
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
        """Epoch, seed and samples consumed: enough to continue on any world size."""
        return {"epoch": self.epoch, "seed": self.seed, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from :meth:`state_dict`'s output; a missing key is a DatasetError."""
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


def normalize_batch(images: torch.Tensor, spec: Any = None) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 model input: ``backbones.normalize`` with ``spec`` (the model's
    ``input_spec``); without one, insightface's (x - 127.5) / 127.5 at the images' own size."""
    from backbones.common import ARCFACE_INPUT, normalize

    if spec is None:
        spec = dataclasses.replace(ARCFACE_INPUT, image_size=tuple(images.shape[-2:]))
    return normalize(images, spec)


def build_dataset(cfg: Any, source: str | None = None) -> _FaceDataset:
    """The dataset ``source`` (default ``cfg.rec``) names: "random"/"synthetic", a RecordIO folder or an image folder."""
    source = cfg.rec if source is None else source
    image_size = _as_hw(cfg.image_size)
    skip = bool(cfg.get("skip_bad_records", True))
    if source in RANDOM_SOURCES:
        return RandomTensorDataset(cfg.num_image or RANDOM_DEFAULT_IMAGES, cfg.num_classes or RANDOM_DEFAULT_CLASSES,
                                   image_size, seed=cfg.seed)
    if not isinstance(source, str) or not source:
        raise DatasetError(f"config key 'rec': {source!r}, expected \"random\", a folder with "
                           f"train.rec/train.idx, or an image folder")
    if not os.path.isdir(source):
        raise DatasetError(f"config key 'rec': {source} is not a folder, expected \"random\", a folder with "
                           f"train.rec/train.idx, or an image folder")
    has_rec = os.path.exists(os.path.join(source, "train.rec"))
    has_idx = os.path.exists(os.path.join(source, "train.idx"))
    if has_rec or has_idx:
        try:
            return RecordDataset(source, image_size, flip=True, skip_bad_records=skip)
        except RecordIOError as exc:
            raise DatasetError(str(exc)) from exc
    return ImageFolderDataset(source, image_size, flip=True, skip_bad_records=skip)


@dataclass(frozen=True)
class DataInfo:
    """What the data setup found (the config is input only: nothing here is written back into it)."""

    source: str          # the folder trained on, or "random tensors"
    kind: str            # recordio | image_folder | random
    num_classes: int
    num_images: int
    layout: str | None   # RecordIO: header | plain


def describe_data(cfg: Any, dataset: _FaceDataset, source: str) -> DataInfo:
    """Counts from the data, checked against the config's ``num_classes`` / ``num_image`` when set."""
    for key in ("num_classes", "num_image"):
        from_data = int(getattr(dataset, key))
        configured = cfg.get(key)
        if configured is not None and int(configured) != from_data:
            raise DatasetError(f"config key '{key}' is {configured} but the data in {source} has {from_data}; "
                               f"set it to {from_data} or to None")
    kind = {RecordDataset: "recordio", ImageFolderDataset: "image_folder"}.get(type(dataset), "random")
    # Logged as the data trained on: say "random tensors", not arcface_torch's ambiguous "synthetic".
    shown = "random tensors" if kind == "random" else str(source)
    return DataInfo(shown, kind, int(dataset.num_classes), int(dataset.num_image),
                    getattr(dataset, "layout", None))


def _seed_worker(worker_id: int) -> None:
    # The main process owns shutdown: a signal to the whole process group must not kill workers.
    from utils.stop import ignore_stop_signals

    ignore_stop_signals()
    # torch seeds each worker from the loader's generator; numpy and random follow it.
    import cv2

    cv2.setNumThreads(1)  # one decode thread per worker: workers are the parallelism
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def get_dataloader(cfg: Any, rank: int, world_size: int, pin_memory: bool = False,
                   source: str | None = None) -> DataLoader:
    """DataLoader over ``source`` (default ``cfg.rec``) yielding (uint8 [B, 3, H, W] RGB, int64 [B]) with
    exact batch sizes; ``loader.data_info`` (a :class:`DataInfo`) says what was found."""
    for key in ("dali", "dali_aug"):  # arcface_torch keys, accepted so its configs load; only False is honoured
        if getattr(cfg, key, False):
            raise DatasetError(f"config key '{key}': True is not supported by ArcScale's loader; set {key}=False "
                               "(the native loader reads the same .rec files; see docs/data.md)")
    source = cfg.rec if source is None else source
    dataset = build_dataset(cfg, source)
    data_info = describe_data(cfg, dataset, source)
    sampler = build_sampler(cfg, dataset, rank, world_size)
    dataset.flip_seed = int(cfg.seed)
    sampler.shared_epoch = dataset.flip_epoch
    generator = torch.Generator().manual_seed(int(cfg.seed) * 1009 + int(rank))
    num_workers = int(cfg.num_workers)
    loader = DataLoader(
        dataset,
        batch_size=int(cfg.batch_size),
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        worker_init_fn=functools.partial(_init_worker, _worker_log_queue(), logging.getLogger().getEffectiveLevel())
        if num_workers > 0 else None,
        generator=generator,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        # Fresh worker processes: forking a trainer whose OpenCV/OpenMP thread pools have already
        # run (synthetic-set generation, verification decoding) can deadlock the child.
        multiprocessing_context="spawn" if num_workers > 0 else None,
    )
    loader.data_info = data_info
    if num_workers > 0:
        from utils.stop import end_workers_at_exit

        end_workers_at_exit()
    return loader


def bad_record_count(loader: DataLoader) -> int:
    """Corrupt samples skipped so far by this loader, summed over all its workers."""
    counter = getattr(loader.dataset, "bad_record_counter", None)
    return int(counter.sum()) if counter is not None else 0


def check_bad_records(loader: DataLoader, max_fraction: float, key: str = "max_bad_records") -> int:
    """Distinct corrupt samples skipped so far; DatasetError once they exceed ``max_fraction`` of the data.

    The trainer calls it every log interval (and logs/checkpoints the count), so a badly broken copy
    of a dataset stops with one line instead of training on substitutes.
    """
    dataset = loader.dataset
    flags = getattr(dataset, "bad_record_flags", None)
    if flags is None:
        return 0
    count, total = int(flags.sum()), len(dataset)
    if count > max_fraction * total:
        source = getattr(dataset, "root", None) or type(dataset).__name__
        raise DatasetError(f"{count} corrupt samples skipped in {source} ({count / total:.4%} of {total}), above "
                           f"config key '{key}'={max_fraction:g} ({max_fraction:.4%}); list them with "
                           f"`python tools/rec_info.py DIR --verify` (RecordIO) or fix the files named in the log")
    return count


# ---------------------------------------------------------------- worker logging
_log_queue: Any = None


def _forward_worker_logs(queue: Any) -> None:
    # Spawned workers have no logging config: their records come here and go through this
    # process's handlers (console and training.log), exactly as if logged by the trainer.
    while True:
        try:
            record = queue.get()
        except (EOFError, OSError, ValueError):  # the queue was closed at shutdown
            return
        target = logging.getLogger(record.name)
        if target.isEnabledFor(record.levelno):
            target.handle(record)


def _worker_log_queue() -> Any:
    """The queue DataLoader workers log into (created, with its forwarding thread, once per process)."""
    global _log_queue
    if _log_queue is None:
        import multiprocessing

        _log_queue = multiprocessing.get_context("spawn").Queue()
        threading.Thread(target=_forward_worker_logs, args=(_log_queue,), name="worker-log-forwarder",
                         daemon=True).start()
    return _log_queue


def _init_worker(log_queue: Any, level: int, worker_id: int) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(logging.handlers.QueueHandler(log_queue))
    root.setLevel(level)
    _seed_worker(worker_id)


# ---------------------------------------------------------------- P x K identity sampler (triplet loss)
def dataset_labels(dataset: Any) -> np.ndarray:
    """int64 class of every sample of ``dataset`` (its ``labels()``; a generated identity set's from its
    synthetic.json without reading the records)."""
    labels = None
    root = getattr(dataset, "root", None)
    if isinstance(dataset, RecordDataset) and root:
        from utils.synthetic import identity_set_labels

        labels = identity_set_labels(root)
    if labels is None:
        if not callable(getattr(dataset, "labels", None)):
            raise DatasetError(f"config key 'sampler'='pk': {type(dataset).__name__} cannot list its labels")
        logger.info("pk sampler: reading the label of every sample of %s", root or type(dataset).__name__)
        labels = dataset.labels()
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(dataset),):
        raise DatasetError(f"{root or type(dataset).__name__}: {labels.shape[0]} labels for {len(dataset)} samples")
    return labels


class PKSampler(ResumableDistributedSampler):
    """Global batches of P identities x K images (P = batch_size * world_size / K), for triplet mining.

    The epoch's sample stream depends only on (labels, K, seed, epoch), never on the batch size or the
    world size: rounds, each a shuffled order of all identities, and identity i's r-th appearance takes
    the next K of its images in an epoch-shuffled cycle (an identity with fewer than K images repeats
    some: drawn with replacement). Round r+1 starts with M = n_identities // 2 identities absent from
    round r's last M, so ANY P <= M consecutive groups hold P distinct identities; hence a checkpoint
    (``consumed`` global samples, always a multiple of K) resumes the same stream on another world
    size or batch size. An epoch is floor(num_images / global_batch) global batches, as for the
    random sampler (about one pass's worth of samples; identities are drawn uniformly, as in
    Hermans et al.'s P x K batches, not in proportion to their image counts).
    Rank r yields samples [r*B, (r+1)*B) of every global batch: whole identities when K divides
    batch_size, otherwise the identity at a rank boundary is split between two ranks (the triplet
    loss gathers the global batch, so the mining is the same either way).
    """

    def __init__(self, labels: Any, images_per_identity: int, batch_size: int, rank: int, world_size: int,
                 seed: int) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        super().__init__(len(labels), rank, world_size, seed)
        k, batch_size = int(images_per_identity), int(batch_size)
        global_batch = batch_size * self.world_size
        if k < 2:
            raise DatasetError(f"config key 'images_per_identity'={images_per_identity!r}: sampler='pk' needs "
                               f"K >= 2 images per identity (positive pairs)")
        if batch_size < 1 or global_batch % k:
            raise DatasetError(f"config keys 'images_per_identity'={k} and 'batch_size'={batch_size}: the global "
                               f"batch {global_batch} (batch_size x {self.world_size} ranks) must be a multiple of K")
        self.identities, self.image_counts = np.unique(labels, return_counts=True)
        n = len(self.identities)
        if n < 2:
            raise DatasetError(f"config key 'sampler'='pk': the data has {n} identity, need at least 2")
        self.k, self.batch_size, self.global_batch = k, batch_size, global_batch
        self.p = global_batch // k
        if self.p > n // 2:
            raise DatasetError(f"config keys 'images_per_identity'={k} and 'batch_size'={batch_size}: P={self.p} "
                               f"identities per global batch needs at least {2 * self.p} identities, the data has {n}")
        self.labels = labels
        self.epoch_samples = (len(labels) // global_batch) * global_batch
        if self.epoch_samples == 0:
            raise DatasetError(f"config key 'batch_size'={batch_size}: the global batch {global_batch} is larger "
                               f"than the {len(labels)} images")
        few = int((self.image_counts < k).sum())
        if few:
            logger.info("pk sampler: %d of %d identities have fewer than K=%d images; their images repeat "
                        "(drawn with replacement)", few, n, k)
        self._cache: tuple[tuple[int, int], np.ndarray] | None = None

    def stream(self) -> np.ndarray:
        """This epoch's global sample order (at least ``epoch_samples`` indices; cached per epoch/seed)."""
        key = (self.seed, self.epoch)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._build_stream())
        return self._cache[1]

    def _build_stream(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch, 0x504B])
        n, k, half = len(self.identities), self.k, len(self.identities) // 2
        # Images grouped by identity (np.unique's order), shuffled within each identity.
        images = np.lexsort((rng.random(len(self.labels)), self.labels))
        starts = np.concatenate([[0], np.cumsum(self.image_counts)[:-1]])
        num_rounds = -(-(-(-len(self.labels) // k)) // n)  # ceil(ceil(N / K) / n)
        rounds, recent = [], np.zeros(n, dtype=bool)
        for r in range(num_rounds):
            order = rng.permutation(n)
            if r:
                # Keep the previous round's last M identities out of this round's first M.
                fresh, stale = order[~recent[order]], order[recent[order]]
                rest = np.concatenate([fresh[half:], stale])
                order = np.concatenate([fresh[:half], rng.permutation(rest)])
                recent[:] = False
            recent[order[n - half:]] = True
            rounds.append(order)
        groups = np.concatenate(rounds)                              # identity slot of each group
        appearance = np.repeat(np.arange(num_rounds), n)             # = round: once per round
        offsets = (appearance[:, None] * k + np.arange(k)[None, :]) % self.image_counts[groups][:, None]
        return images[starts[groups][:, None] + offsets].reshape(-1)

    def _indices(self) -> torch.Tensor:
        rest = self.stream()[self.consumed:self.epoch_samples]
        batches = len(rest) // self.global_batch
        rest = rest[:batches * self.global_batch].reshape(batches, self.global_batch)
        mine = rest[:, self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return torch.from_numpy(np.ascontiguousarray(mine).reshape(-1))

    def __len__(self) -> int:
        return max(0, self.epoch_samples - self.consumed) // self.global_batch * self.batch_size

    def state_dict(self) -> dict[str, int]:
        """epoch/seed/consumed like the random sampler, plus K (a different K changes the stream)."""
        return {**super().state_dict(), "images_per_identity": self.k}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the checkpoint's epoch; ``consumed`` is in global samples, so any world size works."""
        super().load_state_dict(state)
        if state.get("images_per_identity", self.k) != self.k:
            logger.warning("pk sampler: checkpoint has images_per_identity=%s, config %s; the rest of the epoch "
                           "follows a different order", state["images_per_identity"], self.k)


SAMPLERS = ("random", "pk")


def build_sampler(cfg: Any, dataset: Any, rank: int, world_size: int) -> ResumableDistributedSampler:
    """The sampler ``cfg.sampler`` names: "random" (seeded shuffle) or "pk" (P identities x K images)."""
    kind = cfg.get("sampler", "random")
    if kind == "random":
        return ResumableDistributedSampler(len(dataset), rank, world_size, cfg.seed)
    if kind == "pk":
        return PKSampler(dataset_labels(dataset), cfg.get("images_per_identity", 0), int(cfg.batch_size), rank,
                         world_size, int(cfg.seed))
    raise DatasetError(f"config key 'sampler'={kind!r}: expected one of {', '.join(SAMPLERS)}")
