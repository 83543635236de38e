"""The training data loader: picks the dataset and sampler a config names and wires up the workers.

``get_dataloader`` builds the DataLoader the trainer iterates; ``describe_data`` checks the data
against the config, ``check_bad_records`` stops a run on broadly corrupt data, and
``normalize_batch`` turns uint8 batches into model input on the training device. The pieces live
in their own modules (datasets in ``utils.data.datasets``, samplers in ``utils.data.samplers``, worker setup in
``utils.data.workers``, ``DatasetError`` in ``utils.data.errors``); their names are re-exported
here so ``from dataset import ...`` keeps working.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from utils.data.datasets import (IMAGE_EXTENSIONS, RANDOM_DEFAULT_CLASSES, RANDOM_DEFAULT_IMAGES, RANDOM_SOURCES,
                           FaceDataset, ImageFolderDataset, RandomTensorDataset, RecordDataset, as_hw,
                           read_image_file, read_property, scan_image_folder, write_property)
from utils.data.samplers import SAMPLERS, PKSampler, ResumableDistributedSampler, build_sampler, dataset_labels
from utils.data.errors import DatasetError
from utils.data.recordio import RecordIOError
from utils.data.sources import MultiSourceDataset, build_sources, source_table
from utils.data.workers import init_worker, worker_log_queue

# This module's own names, then those re-exported so ``from dataset import ...`` keeps working.
__all__ = ["BAD_RECORDS_FLOOR", "DataInfo", "bad_record_count", "bad_record_limit", "build_dataset",
           "check_bad_records", "describe_data", "get_dataloader", "is_multi_source", "normalize_batch",
           "MultiSourceDataset",
           "DatasetError", "FaceDataset", "IMAGE_EXTENSIONS", "ImageFolderDataset", "RANDOM_DEFAULT_CLASSES",
           "RANDOM_DEFAULT_IMAGES", "RANDOM_SOURCES", "RandomTensorDataset", "RecordDataset", "as_hw",
           "read_image_file", "read_property", "scan_image_folder", "write_property",
           "PKSampler", "ResumableDistributedSampler", "SAMPLERS", "build_sampler", "dataset_labels"]


logger = logging.getLogger(__name__)

BAD_RECORDS_FLOOR = 10  # a fractional max_bad_records never tolerates fewer corrupt records than this


def normalize_batch(images: torch.Tensor, spec: Any = None) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 model input: ``backbones.normalize`` with ``spec`` (the model's
    ``input_spec``); without one, insightface's (x - 127.5) / 127.5 at the images' own size."""
    from backbones.common import ARCFACE_INPUT, normalize

    if spec is None:
        spec = dataclasses.replace(ARCFACE_INPUT, image_size=tuple(images.shape[-2:]))
    return normalize(images, spec)


def is_multi_source(cfg: Any, source: Any) -> bool:
    """Whether ``source`` is read as several sources: a list (beyond one plain folder), a glob, a sharded
    pack, or one source with an identity map or weights."""
    if cfg.get("rec_identity_map") or cfg.get("rec_weights") is not None:
        return True
    if isinstance(source, (list, tuple)):
        return len(source) != 1 or is_multi_source(cfg, source[0])
    return isinstance(source, str) and source not in RANDOM_SOURCES and (
        glob.has_magic(source) or (os.path.isdir(source) and not os.path.exists(os.path.join(source, "train.rec"))
                                   and not os.path.exists(os.path.join(source, "train.idx"))
                                   and any(name.endswith((".rec", ".idx")) for name in os.listdir(source))))


def build_dataset(cfg: Any, source: Any = None) -> FaceDataset:
    """The dataset ``source`` (default ``cfg.rec``) names: "random"/"synthetic", a RecordIO folder, an image
    folder, or several sources read as one (a list, a sharded pack, a glob: ``utils.data.sources``)."""
    source = cfg.rec if source is None else source
    image_size = as_hw(cfg.image_size)
    skip = bool(cfg.get("skip_bad_records", True))
    if is_multi_source(cfg, source):
        entries = list(source) if isinstance(source, (list, tuple)) else [source]
        weights = cfg.get("rec_weights")
        return build_sources(entries, image_size, skip, cfg.get("rec_identity_map"),
                             None if weights is None else [float(w) for w in weights])
    if isinstance(source, (list, tuple)):
        source = source[0]
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
    path: str = ""       # the source as an absolute path ("random" for random tensors)
    index_sha256: str = ""  # the dataset's index hash (FaceDataset.index_sha256)
    sources: tuple = ()  # several sources: each one's fingerprint (Source.fingerprint) plus its sampling share

    @property
    def fingerprint(self) -> dict:
        """What checkpoints record about the data, so resume can tell when it changed (cheap: no image read)."""
        found = {"source": self.path, "kind": self.kind, "num_images": self.num_images,
                 "num_classes": self.num_classes, "index_sha256": self.index_sha256}
        if self.sources:
            found["sources"] = [dict(entry) for entry in self.sources]
        return found


def describe_data(cfg: Any, dataset: FaceDataset, source: str) -> DataInfo:
    """Counts from the data, checked against the config's ``num_classes`` / ``num_image`` when set."""
    if isinstance(source, (list, tuple)) and len(source) == 1:
        source = source[0]
    for key in ("num_classes", "num_image"):
        from_data = int(getattr(dataset, key))
        configured = cfg.get(key)
        if configured is not None and int(configured) != from_data:
            raise DatasetError(f"config key '{key}' is {configured} but the data in {source} has {from_data}; "
                               f"set it to {from_data} or to None")
    if isinstance(dataset, MultiSourceDataset):
        for line in source_table(dataset):
            logger.info("data: %s", line)
        shares = dataset.source_weights or [s.num_images / dataset.num_image for s in dataset.sources]
        entries = tuple({**s.fingerprint(), "share": round(float(share), 6)}
                        for s, share in zip(dataset.sources, shares))
        shown = f"{len(entries)} sources ({', '.join(s.name for s in dataset.sources)})"
        if dataset.map_sha256:
            entries += ({"identity_map": dataset.map_sha256},)
        return DataInfo(shown, "sources", int(dataset.num_classes), int(dataset.num_image), None,
                        "; ".join(e["path"] for e in entries if "path" in e), dataset.index_sha256(), entries)
    kind = {RecordDataset: "recordio", ImageFolderDataset: "image_folder"}.get(type(dataset), "random")
    # Logged as the data trained on: say "random tensors", not arcface_torch's ambiguous "synthetic".
    shown = "random tensors" if kind == "random" else str(source)
    path = "random" if kind == "random" else os.path.realpath(source)
    return DataInfo(shown, kind, int(dataset.num_classes), int(dataset.num_image),
                    getattr(dataset, "layout", None), path, dataset.index_sha256())


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
        # the sampler yields whole batches only, but for an epoch resumed off the batch grid, whose short last
        # step (utils/run/plan.py epoch_shape) must reach the trainer
        drop_last=False,
        worker_init_fn=functools.partial(init_worker, worker_log_queue(), logging.getLogger().getEffectiveLevel())
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
        from utils.run.stop import end_workers_at_exit

        end_workers_at_exit()
    return loader


def bad_record_count(loader: DataLoader) -> int:
    """Corrupt samples skipped so far by this loader, summed over all its workers."""
    counter = getattr(loader.dataset, "bad_record_counter", None)
    return int(counter.sum()) if counter is not None else 0


def bad_record_limit(max_bad_records: float, num_images: int) -> int:
    """How many distinct corrupt samples ``max_bad_records`` tolerates in ``num_images``: a value below 1 is
    a fraction of the data, but never fewer than BAD_RECORDS_FLOOR records (0.1% of 192 images would
    stop on the first bad one); a whole number from 1 on is a count; 0 tolerates none."""
    if max_bad_records >= 1 or max_bad_records == 0:
        return int(max_bad_records)
    return max(int(max_bad_records * num_images), BAD_RECORDS_FLOOR)


def check_bad_records(loader: DataLoader, max_bad_records: float, key: str = "max_bad_records") -> int:
    """Distinct corrupt samples skipped so far; DatasetError once they exceed the limit ``max_bad_records``
    gives (see :func:`bad_record_limit`).

    The trainer calls it every log interval (and logs/checkpoints the count), so a badly broken copy
    of a dataset stops with one line instead of training on substitutes.
    """
    dataset = loader.dataset
    flags = getattr(dataset, "bad_record_flags", None)
    if flags is None:
        return 0
    count, total = int(flags.sum()), len(dataset)
    limit = bad_record_limit(max_bad_records, total)
    if count > limit:
        source = getattr(dataset, "root", None) or type(dataset).__name__
        rule = (f"max({max_bad_records * 100:g}% of {total}, {BAD_RECORDS_FLOOR})" if 0 < max_bad_records < 1
                else "a count of records" if max_bad_records else "none tolerated")
        raise DatasetError(f"{count} corrupt samples skipped in {source} ({count / total:.4%} of {total}), above the "
                           f"limit of {limit} (config key '{key}'={max_bad_records:g}: {rule}); list them with "
                           f"`python tools/rec_info.py DIR --verify` (RecordIO) or fix the files named in the log")
    return count
