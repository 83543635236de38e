"""Several training sources read as one dataset, without copying: ``rec`` as a list.

Each entry of ``rec`` is a source: a RecordIO folder (train.rec/train.idx), an image folder, a sharded pack
(a folder of ``train_0.rec/.idx`` ... ``train_<N-1>``, or a glob such as ``/data/wf/train_*.rec``) or a glob
of folders. A source's labels are offset by the classes of the sources before it (and a shard's by the
shards before it in its source), unless ``rec_identity_map`` merges identities: then an identity takes the
id of its first appearance in source order, so without a map both numberings agree. Sources that cannot
belong together (a missing shard, a property that disagrees with its records, images of different sizes, a
label outside its source's classes) are a one-line DatasetError.
"""
from __future__ import annotations

import bisect
import csv
import glob
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from utils.data import recordio
from utils.data.datasets import FaceDataset, ImageFolderDataset, RecordDataset, read_property
from utils.data.errors import DatasetError
from utils.data.recordio import BadRecordError, RecordIOError

logger = logging.getLogger(__name__)

SHARD_NAME = re.compile(r"^(?P<stem>.+?)_(?P<number>\d+)$")
LABEL_SAMPLE = 64  # records per part whose labels are read at start-up (the rest are checked as they are read)


def natural_key(text: str) -> list:
    """Sort key that puts train_10 after train_9."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


@dataclass
class Source:
    """One entry of ``rec``: its parts (shards, or one dataset) and what they add up to."""

    name: str                       # as written in `rec`
    kind: str                       # recordio | image_folder | shards
    parts: list[FaceDataset]
    paths: list[str]                # each part's files (absolute), for the fingerprint and messages
    num_classes: int = 0
    num_images: int = 0
    labels_map: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # source label -> global id

    def fingerprint(self) -> dict:
        """Path, counts and the hash of every part's index (what a checkpoint records of this source)."""
        digest = hashlib.sha256()
        for part in self.parts:
            digest.update(part.index_sha256().encode())
        # one part: its own hash, so the source compares equal to the same folder trained on alone
        index = self.parts[0].index_sha256() if len(self.parts) == 1 else digest.hexdigest()
        return {"source": self.name, "path": os.path.realpath(self.name), "kind": self.kind, "parts": len(self.parts),
                "num_images": self.num_images, "num_classes": self.num_classes, "index_sha256": index}


def _shard_parts(folder: str, rec_files: list[str], what: str) -> list[tuple[str, str]]:
    """(folder, name) of numbered shards ``stem_0 .. stem_<N-1>``; a gap or a half pair is a DatasetError."""
    by_stem: dict[str, dict[int, str]] = {}
    for path in rec_files:
        stem = os.path.splitext(os.path.basename(path))[0]
        match = SHARD_NAME.match(stem)
        if not match:
            raise DatasetError(f"config key 'rec': {what}: {path} is not a numbered shard (expected NAME_<i>.rec)")
        by_stem.setdefault(match["stem"], {})[int(match["number"])] = os.path.dirname(path) or folder
    if len(by_stem) != 1:
        raise DatasetError(f"config key 'rec': {what} holds shards of {len(by_stem)} packs ({', '.join(sorted(by_stem))}); "
                           f"list each pack as its own source")
    stem, numbers = next(iter(by_stem.items()))
    count = max(numbers) + 1
    parts = []
    for number in range(count):
        name = f"{stem}_{number}"
        where = numbers.get(number, folder)
        for ext in (".rec", ".idx"):
            if not os.path.isfile(os.path.join(where, name + ext)):
                raise DatasetError(f"config key 'rec': {what}: shard {os.path.join(where, name + ext)} is missing "
                                   f"(shards {stem}_0..{stem}_{count - 1} expected, {len(numbers)} .rec found)")
        parts.append((where, name))
    return parts


def expand_source(entry: Any) -> tuple[str, list[tuple[str, str]]]:
    """(kind, parts) of one ``rec`` entry: parts are (folder, name) of RecordIO pairs or (folder, "") of image
    folders."""
    if not isinstance(entry, str) or not entry:
        raise DatasetError(f"config key 'rec': entry {entry!r}, expected a folder, a sharded pack or a glob")
    if glob.has_magic(entry):
        matches = sorted(glob.glob(entry), key=natural_key)
        if not matches:
            raise DatasetError(f"config key 'rec': {entry} matches no file or folder")
        recs = [m for m in matches if m.endswith(".rec") and os.path.isfile(m)]
        if recs:
            return "shards", _shard_parts(os.path.dirname(entry), recs, entry)
        parts = []
        for folder in matches:
            kind, found = expand_source(folder)
            parts += found
        return ("shards" if len(parts) > 1 else kind), parts
    if entry.endswith(".rec") and os.path.isfile(entry):  # one pack or shard named by its .rec file
        return "recordio", [(os.path.dirname(entry) or ".", os.path.splitext(os.path.basename(entry))[0])]
    if not os.path.isdir(entry):
        raise DatasetError(f"config key 'rec': {entry} is not a folder, expected a folder with train.rec/train.idx, "
                           f"an image folder, a folder of train_<i>.rec/.idx shards, or a glob")
    if os.path.exists(os.path.join(entry, "train.rec")) or os.path.exists(os.path.join(entry, "train.idx")):
        return "recordio", [(entry, "train")]
    shards = [os.path.join(entry, n) for n in os.listdir(entry) if n.endswith((".rec", ".idx"))]
    if shards:
        recs = {os.path.splitext(p)[0] + ".rec" for p in shards}  # an .idx without its .rec is a missing shard too
        return "shards", _shard_parts(entry, sorted(recs, key=natural_key), entry)
    return "image_folder", [(entry, "")]


def _native_size(part: FaceDataset) -> tuple[int, int]:
    """(height, width) the part's images have on disk: its property file, else its first image decoded."""
    if isinstance(part, RecordDataset):
        if os.path.isfile(part.property_path):
            return read_property(part.property_path)[1:]
        _, img, key = part.read_record(0)
        return recordio.decode_image(img, f"{part.rec_path}: key {key}").shape[:2]
    path = part.paths[0]
    with open(path, "rb") as handle:
        return recordio.decode_image(handle.read(), path).shape[:2]


def _check_sampled_labels(part: RecordDataset) -> None:
    """Labels of up to LABEL_SAMPLE records spread over the part: outside its declared classes is an error."""
    for index in np.unique(np.linspace(0, len(part) - 1, min(LABEL_SAMPLE, len(part))).astype(np.int64)):
        try:
            header, _, key = part.read_record(int(index))
        except BadRecordError:
            continue  # skipped later like any bad record
        label = recordio.class_of(header)
        if not 0 <= label < part.num_classes:
            raise DatasetError(f"{part.rec_path}: key {key} has label {label}, outside the {part.num_classes} "
                               f"classes ({os.path.basename(part.property_path)} / header0) it declares")


def open_source(entry: str, image_size: Any, skip: bool) -> Source:
    """The parts of one ``rec`` entry, opened and checked (counts, property files, sampled labels)."""
    kind, found = expand_source(entry)
    parts, paths = [], []
    for folder, name in found:
        try:
            if name:
                part = RecordDataset(folder, image_size, flip=True, skip_bad_records=skip, name=name,
                                     strict_labels=True)
                _check_sampled_labels(part)
                paths.append(part.rec_path)
            else:
                part = ImageFolderDataset(folder, image_size, flip=True, skip_bad_records=skip)
                paths.append(folder)
        except RecordIOError as exc:
            raise DatasetError(str(exc)) from exc
        # the union keeps its own counters, flags and flip epoch: the parts' would only hold shared memory
        part.bad_record_counter = part.bad_record_flags = part.flip_epoch = None
        parts.append(part)
    source = Source(entry, kind, parts, paths, sum(p.num_classes for p in parts), sum(len(p) for p in parts))
    prop = os.path.join(entry, "property")
    if kind == "shards" and os.path.isdir(entry) and os.path.isfile(prop) and read_property(prop)[0] != source.num_classes:
        raise DatasetError(f"{prop}: says {read_property(prop)[0]} classes, but its {len(parts)} shards hold "
                           f"{source.num_classes} (sum of their header0/property counts)")
    return source


def read_identity_map(path: str, sources: list[Source]) -> dict[tuple[int, int], int]:
    """``source,label,global_id`` rows -> {(source index, label): global id}; one-line DatasetError when a row
    names an unknown source or label, or maps one label to two ids. ``source`` is the entry as written in
    `rec` or its 0-based position. Two labels of one source may share an id: a sharded pack split an identity
    over two shards (``pack_rec.py --split-identities``)."""
    names = {s.name: i for i, s in enumerate(sources)}
    names.update({os.path.realpath(s.name): i for i, s in enumerate(sources)})
    mapping: dict[tuple[int, int], int] = {}
    try:
        handle = open(path, newline="")
    except OSError as exc:
        raise DatasetError(f"config key 'rec_identity_map': {path}: cannot read it ({exc.strerror})") from None
    with handle:
        for line, row in enumerate(csv.reader(handle), 1):
            if not row or row[0].startswith("#") or (line == 1 and [c.strip() for c in row] == ["source", "label",
                                                                                              "global_id"]):
                continue
            where = f"config key 'rec_identity_map': {path} line {line}"
            if len(row) != 3:
                raise DatasetError(f"{where}: {len(row)} fields, expected source,label,global_id")
            name, label_text, id_text = (c.strip() for c in row)
            index = names.get(name, names.get(os.path.realpath(name)))
            if index is None and name.isdigit() and int(name) < len(sources):
                index = int(name)
            if index is None:
                raise DatasetError(f"{where}: source {name!r} is not in `rec` (expected one of its entries or its "
                                   f"position 0..{len(sources) - 1})")
            try:
                label, global_id = int(label_text), int(id_text)
            except ValueError:
                raise DatasetError(f"{where}: label {label_text!r} / global_id {id_text!r}, expected integers") from None
            if not 0 <= label < sources[index].num_classes or global_id < 0:
                raise DatasetError(f"{where}: source {sources[index].name} has no label {label} (its labels are "
                                   f"0..{sources[index].num_classes - 1}; global ids >= 0)")
            if mapping.get((index, label), global_id) != global_id:
                raise DatasetError(f"{where}: source {sources[index].name} label {label} is mapped to global id "
                                   f"{mapping[(index, label)]} and to {global_id}")
            mapping[(index, label)] = global_id
    return mapping


def assign_labels(sources: list[Source], mapping: dict[tuple[int, int], int] | None) -> int:
    """Fill every source's ``labels_map``; returns the union's class count. Without a map source i's labels
    are offset by the classes before it; with one, an identity takes the id of its first appearance."""
    if not mapping:
        offset = 0
        for source in sources:
            source.labels_map = np.arange(offset, offset + source.num_classes, dtype=np.int64)
            offset += source.num_classes
        return offset
    ids: dict[Any, int] = {}
    for index, source in enumerate(sources):
        labels_map = np.empty(source.num_classes, dtype=np.int64)
        for label in range(source.num_classes):
            key = ("id", mapping[(index, label)]) if (index, label) in mapping else (index, label)
            labels_map[label] = ids.setdefault(key, len(ids))
        source.labels_map = labels_map
    return len(ids)


class MultiSourceDataset(FaceDataset):
    """Every part of every source, back to back; labels mapped into the union's classes."""

    def __init__(self, sources: list[Source], num_classes: int, image_size: Any, skip_bad_records: bool,
                 weights: list[float] | None = None, map_sha256: str = "") -> None:
        super().__init__(image_size, True, skip_bad_records)
        self.sources, self.num_classes, self.map_sha256 = sources, int(num_classes), map_sha256
        self.parts = [part for source in sources for part in source.parts]
        self.root = f"{len(sources)} sources"
        self.part_source = np.array([i for i, s in enumerate(sources) for _ in s.parts], dtype=np.int64)
        self.lookups = []
        for source in sources:
            offset = 0
            for part in source.parts:
                self.lookups.append(source.labels_map[offset:offset + part.num_classes])
                offset += part.num_classes
        sizes = np.array([len(p) for p in self.parts], dtype=np.int64)
        self.part_starts = np.concatenate([[0], np.cumsum(sizes)])
        self.part_start_list = self.part_starts.tolist()
        self.num_image = int(self.part_starts[-1])
        counts = np.array([s.num_images for s in sources], dtype=np.int64)
        self.source_starts = np.concatenate([[0], np.cumsum(counts)])
        # rec_weights: each source's share of an epoch's samples (None: in proportion to size, a plain shuffle)
        self.source_weights = None if weights is None else [float(w) / sum(weights) for w in weights]
        self._allocate_bad_record_flags()

    def __len__(self) -> int:
        return self.num_image

    def locate(self, index: int) -> tuple[int, int]:
        """(part, index within the part) of sample ``index``."""
        part = bisect.bisect_right(self.part_start_list, index) - 1  # a few hundred ns; np.searchsorted costs µs
        return part, index - self.part_start_list[part]

    def load(self, index: int) -> tuple[np.ndarray, int]:
        """The part's image and its label in the union's classes."""
        part, local = self.locate(int(index))
        image, label = self.parts[part].load(local)
        lookup = self.lookups[part]
        if not 0 <= label < len(lookup):  # image folders cannot; RecordIO parts raise first (strict_labels)
            raise DatasetError(f"{self.sources[self.part_source[part]].name}: label {label} outside its "
                               f"{len(lookup)} classes")
        return image, int(lookup[label])

    def labels(self) -> np.ndarray:
        """Every sample's class in the union (reads each RecordIO part's record headers; for the pk sampler)."""
        from utils.data.synthetic import identity_set_labels

        out = []
        for part, lookup in zip(self.parts, self.lookups):
            labels = identity_set_labels(part.root) if isinstance(part, RecordDataset) and \
                os.path.basename(part.rec_path) == "train.rec" else None
            out.append(lookup[part.labels() if labels is None else labels])
        return np.concatenate(out)

    def index_sha256(self) -> str:
        """SHA-256 over every source's index hash, the identity map's and the weights."""
        digest = hashlib.sha256()
        for source in self.sources:
            digest.update(source.fingerprint()["index_sha256"].encode())
        digest.update(f"{self.map_sha256} {self.source_weights}".encode())
        return digest.hexdigest()


def build_sources(entries: list[str], image_size: Any, skip: bool, identity_map: str | None = None,
                  weights: list[float] | None = None) -> MultiSourceDataset:
    """Open every entry of ``rec`` (a list) as one dataset; see the module docstring for the rules."""
    if not entries:
        raise DatasetError("config key 'rec': an empty list, expected at least one source")
    if weights is not None and len(weights) != len(entries):
        raise DatasetError(f"config key 'rec_weights': {len(weights)} weights for {len(entries)} sources in `rec`, "
                           f"expected one per source")
    if weights is not None and any(not float(w) > 0 for w in weights):
        raise DatasetError(f"config key 'rec_weights': {list(weights)}, expected numbers > 0")
    sources = [open_source(entry, image_size, skip) for entry in entries]
    sizes = {}
    for source in sources:
        for part, path in zip(source.parts, source.paths):
            size = tuple(int(v) for v in _native_size(part))
            if isinstance(part, RecordDataset):  # opened again by the first read in the process that reads it
                part.reader.release_descriptor()
            first = next(iter(sizes.items()), None)
            if first is not None and first[1] != size:
                raise DatasetError(f"config key 'rec': images of {path} are {size[0]}x{size[1]} but those of "
                                   f"{first[0]} are {first[1][0]}x{first[1][1]}: pack the sources at one size")
            sizes.setdefault(path, size)
    mapping, map_sha = None, ""
    if identity_map:
        mapping = read_identity_map(identity_map, sources)
        with open(identity_map, "rb") as handle:
            map_sha = hashlib.sha256(handle.read()).hexdigest()
    num_classes = assign_labels(sources, mapping)
    return MultiSourceDataset(sources, num_classes, image_size, skip, weights, map_sha)


def source_table(dataset: MultiSourceDataset) -> list[str]:
    """The start-up table: source, images, classes, label range, sampling share."""
    total = dataset.num_image
    shares = dataset.source_weights or [s.num_images / total for s in dataset.sources]
    rows = [("source", "kind", "images", "classes", "labels", "share")]
    for source, share in zip(dataset.sources, shares):
        low, high = int(source.labels_map.min()), int(source.labels_map.max())
        kind = f"{source.kind} x{len(source.parts)}" if source.kind == "shards" else source.kind
        rows.append((source.name, kind, str(source.num_images), str(source.num_classes), f"{low}..{high}",
                     f"{share:.2%}"))
    rows.append(("union", "", str(total), str(dataset.num_classes), f"0..{dataset.num_classes - 1}", "100.00%"))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


__all__ = ["MultiSourceDataset", "Source", "assign_labels", "build_sources", "expand_source", "natural_key",
           "open_source", "read_identity_map", "source_table"]
