"""Describe a RecordIO training set, optionally checking every record.

    python tools/rec_info.py DIR            # num_images=<N> num_classes=<K> layout=<header|plain> + histogram
    python tools/rec_info.py DIR --verify   # check every index entry and image; exit 1 listing bad records
    python tools/rec_info.py DIR --verify --json   # the same as one JSON object (for scripts)
    python tools/rec_info.py DIR --verify --workers 16   # in parallel (a full MS1M pack: minutes)
    python tools/rec_info.py DIR1 DIR2 'wf/train_*.rec' [--identity-map map.csv] [--weights 1 2 1] [--verify]
        # several sources (a list, a sharded pack, a glob): the table training starts with (source, kind,
        # images, classes, label range, sampling share), the union's counts; --verify checks every RecordIO part

--verify checks every .idx entry (offset inside train.rec, RecordIO magic there, every part's
length inside the file), every image (decodes, and neither libjpeg's "Corrupt JPEG data" warnings
nor wiped JPEG data: see utils/data/image_check.py), every label (in range, and inside its identity
record's key range), and header0 (its key ranges against the .idx and the property file).
Exit status: 0 all good, 1 bad records (each printed as file, key, offset, reason), 2 unusable input.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from utils.data import recordio  # noqa: E402  (utils/data/datasets.py imports torch, so it loads lazily)

HISTOGRAM_EDGES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def identity_sizes(dataset: Any) -> np.ndarray:
    """Images per class: from the identity records (header layout) or a scan of all labels."""
    if dataset.layout == "header":
        first, end = dataset.header0
        sizes = []
        for key in range(first, end):
            header, _ = recordio.unpack(dataset.reader.read_idx(key), f"{dataset.rec_path}: key {key}")
            label = np.atleast_1d(header.label)
            sizes.append(int(label[1]) - int(label[0]) if len(label) >= 2 else 0)
        return np.asarray(sizes, dtype=np.int64)
    return np.bincount(dataset.labels(), minlength=dataset.num_classes)


def histogram_lines(sizes: np.ndarray) -> list[str]:
    """Text histogram of images per identity."""
    lines = ["images/identity  identities"]
    edges = list(HISTOGRAM_EDGES) + [np.inf]
    if (sizes == 0).any():
        lines.append(f"{'0':>15}  {int((sizes == 0).sum())}")
    for low, high in zip(edges[:-1], edges[1:]):
        count = int(((sizes >= low) & (sizes < high)).sum())
        if count:
            label = str(low) if high == low + 1 else (f"{low}+" if high == np.inf else f"{low}-{int(high) - 1}")
            lines.append(f"{label:>15}  {count}")
    if len(sizes):
        lines.append(f"min={int(sizes.min())} median={float(np.median(sizes)):g} max={int(sizes.max())}")
    return lines


def _reason(exc: Exception) -> str:
    # Messages start with "<file>: key K at offset O: "; the report prints key and offset itself.
    text = str(exc)
    for marker in (" at offset ", ": key "):
        if marker in text:
            head, _, rest = text.partition(marker)
            text = rest.split(": ", 1)[1] if ": " in rest else rest
            break
    return text


def _read(reader: recordio.MXIndexedRecordIO, key: int) -> tuple[recordio.IRHeader, bytes]:
    offset = int(reader.idx[key])
    if offset >= reader.file_size:
        raise recordio.BadRecordError(f"offset {offset} is past the end of {reader.uri} ({reader.file_size} bytes)")
    return recordio.unpack(reader.read_idx(key), "record")


_class_by_key: np.ndarray | None = None


def _init_chunk_worker(class_by_key: np.ndarray | None) -> None:
    global _class_by_key
    _class_by_key = class_by_key


def _check_chunk(idx_path: str, rec_path: str, keys: list[int], num_classes: int | None) -> tuple[list, int]:
    """Read, label-check and strictly decode ``keys``: ([(key, reason)], largest label seen)."""
    reader = recordio.MXIndexedRecordIO(idx_path, rec_path, "r")
    class_by_key, bad, max_label = _class_by_key, [], -1
    for key in keys:
        try:
            header, img = _read(reader, key)
        except recordio.BadRecordError as exc:
            bad.append((key, _reason(exc)))
            continue
        label = recordio.class_of(header)
        if label < 0 or (num_classes is not None and label >= num_classes):
            bad.append((key, f"label {label} out of range, expected 0 <= label < num_classes={num_classes}"))
            continue
        if class_by_key is not None and 0 < key < len(class_by_key) and class_by_key[key] not in (-1, label):
            bad.append((key, f"label {label} disagrees with its identity record (class {int(class_by_key[key])})"))
            continue
        max_label = max(max_label, label)
        try:
            recordio.decode_image(img, "image", strict=True)
        except recordio.BadRecordError as exc:
            bad.append((key, str(exc).split(": ", 1)[1]))
    reader.close()
    return bad, max_label


def verify_pack(folder: str, workers: int = 1, name: str = "train") -> dict:
    """Check every record of ``folder`` (the pair ``name``.rec/.idx: a shard's name, e.g. train_3); returns
    counts, layout, ``file`` (its .rec) and ``bad``: [{key, offset, file, reason}]."""
    from utils.data.datasets import read_property
    from utils.data.errors import DatasetError

    idx_path, rec_path = os.path.join(folder, f"{name}.idx"), os.path.join(folder, f"{name}.rec")
    reader = recordio.MXIndexedRecordIO(idx_path, rec_path, "r")
    offset_of = reader.idx
    bad: list[dict] = []
    done: set[int] = set()  # keys already checked (header0 and identity records are read first)

    def report(key: int, reason: str) -> None:
        bad.append({"key": int(key), "offset": offset_of.get(int(key)), "file": rec_path, "reason": reason})

    def read_meta(key: int) -> recordio.IRHeader | None:
        done.add(key)
        try:
            return _read(reader, key)[0]
        except recordio.BadRecordError as exc:
            report(key, _reason(exc))
            return None

    header0 = read_meta(0) if 0 in offset_of else None
    layout = "header" if header0 is not None and header0.flag > 0 and len(_read(reader, 0)[1]) == 0 else "plain"
    prop = os.path.join(folder, "property" if name == "train" else f"{name}.property")
    prop_classes = None
    if os.path.isfile(prop):
        try:
            prop_classes = read_property(prop)[0]
        except DatasetError as exc:
            report(-1, str(exc))
    class_by_key = None  # header layout: the class each image key's identity record assigns
    workers = max(1, int(workers))
    if layout == "header":
        first, end = int(header0.label[0]), int(header0.label[1])
        if not 1 < first < end:
            report(0, f"header0 labels [{first}, {end}) are not a valid identity key range (expected 1 < first < end)")
            return {"folder": folder, "file": rec_path, "layout": layout, "num_entries": len(reader),
                    "num_images": 0, "num_classes": 0, "bad": bad}
        num_classes, image_keys = end - first, np.arange(1, first)
        class_by_key = np.full(first, -1, dtype=np.int32)
        for key in sorted(k for k in offset_of if not 0 <= k < end):
            done.add(key)
            outside = f"key is outside the keys 0..{end - 1} that header0 describes (an entry of another pack?)"
            if offset_of[key] >= reader.file_size:
                outside = (f"offset {offset_of[key]} is past the end of {rec_path} ({reader.file_size} bytes); "
                           f"the {outside}")
            report(key, outside)
        for key in image_keys[~np.isin(image_keys, reader.key_array)].tolist():
            report(key, f"image key missing from {idx_path} (header0 says images are keys 1..{first - 1})")
        for key in range(first, end):
            header = read_meta(key) if key in offset_of else None
            if header is None:
                if key not in offset_of:
                    report(key, f"identity record missing from {idx_path}")
                continue
            label = np.atleast_1d(header.label)
            low, high = (int(label[0]), int(label[1])) if header.flag >= 2 else (0, -1)
            if not 1 <= low <= high <= first:
                report(key, f"identity record labels {label.tolist()} are not an image key range inside 1..{first}")
                continue
            class_by_key[low:high] = key - first
        if prop_classes is not None and prop_classes != num_classes:
            report(0, f"{prop} says {prop_classes} classes, header0 describes {num_classes}")
    else:
        image_keys = np.sort(reader.key_array)
        num_classes = prop_classes
        if header0 is not None:
            done.discard(0)  # key 0 is an ordinary image here: check it with the others
    order = np.argsort(reader.offset_array, kind="stable")  # file order: sequential reads
    todo = [int(key) for key in reader.key_array[order] if int(key) not in done]
    # Contiguous runs of the file per worker keep the reads sequential.
    chunks = [todo[len(todo) * i // workers:len(todo) * (i + 1) // workers] for i in range(workers)]
    if workers > 1:
        import multiprocessing

        # Spawned workers import numpy and utils.data.recordio only (no torch).
        with multiprocessing.get_context("spawn").Pool(workers, _init_chunk_worker, (class_by_key,)) as pool:
            results = pool.starmap(_check_chunk, [(idx_path, rec_path, chunk, num_classes) for chunk in chunks])
    else:
        _init_chunk_worker(class_by_key)
        results = [_check_chunk(idx_path, rec_path, todo, num_classes)]
    max_label = -1
    for chunk_bad, chunk_max in results:
        for key, reason in chunk_bad:
            report(key, reason)
        max_label = max(max_label, chunk_max)
    if num_classes is None:  # plain layout without a property file: the labels define the classes
        num_classes = max_label + 1
    bad.sort(key=lambda entry: (entry["offset"] is None, entry["offset"] or 0, entry["key"]))
    return {"folder": folder, "file": rec_path, "layout": layout, "num_entries": len(reader),
            "num_images": len(image_keys), "num_classes": int(num_classes), "bad": bad}


def entry_line(entry: dict) -> str:
    """One bad record as a line that names its file (grep-able on its own): ``FILE: key K offset O: reason``.
    A problem of no record (key -1: the property file) is its reason alone, which names that file."""
    if entry["key"] < 0:
        return entry["reason"]
    offset = "-" if entry["offset"] is None else entry["offset"]
    return f"{entry['file']}: key {entry['key']} offset {offset}: {entry['reason']}"


def verify(dataset: Any) -> list[tuple[int, str]]:
    """(key, reason) of every bad record of a RecordDataset's folder (see ``verify_pack``)."""
    return [(entry["key"], entry["reason"]) for entry in verify_pack(dataset.root)["bad"]]


def summarise_sources(entries: list[str], identity_map: str | None, weights: list[float] | None, verify: bool,
                      as_json: bool, workers: int) -> int:
    """Several sources: the start-up table of a training run over them, then (``verify``) every RecordIO part
    checked; the exit status as for one pack."""
    from utils.data.datasets import RecordDataset
    from utils.data.sources import build_sources, source_table

    dataset = build_sources(entries, (112, 112), True, identity_map, weights)
    shares = dataset.source_weights or [s.num_images / dataset.num_image for s in dataset.sources]
    summary: dict = {"num_images": dataset.num_image, "num_classes": dataset.num_classes, "sources": [
        {**source.fingerprint(), "labels": [int(source.labels_map.min()), int(source.labels_map.max())],
         "share": share} for source, share in zip(dataset.sources, shares)]}
    if not as_json:
        print("\n".join(source_table(dataset)))
    bad: list[dict] = []
    if verify:
        for part in dataset.parts:
            if isinstance(part, RecordDataset):
                name = os.path.splitext(os.path.basename(part.rec_path))[0]
                result = verify_pack(part.root, workers, name)
                bad += result["bad"]
                if not as_json:
                    print(f"verify: {part.rec_path}: {len(result['bad'])} bad of {result['num_entries']} entries")
        summary.update(bad=bad, ok=not bad)
    if as_json:
        print(json.dumps(summary))
    else:
        for entry in bad:
            print(f"  {entry_line(entry)}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="+", help="folder with train.rec and train.idx; several: a list of sources")
    parser.add_argument("--verify", action="store_true", help="check every record; exit 1 listing bad ones")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--workers", type=int, default=1, help="processes for --verify (default 1)")
    parser.add_argument("--identity-map", default=None, help="several sources: rec_identity_map CSV")
    parser.add_argument("--weights", type=float, nargs="+", default=None, help="several sources: rec_weights")
    args = parser.parse_args(argv)
    from utils.data.datasets import RecordDataset
    from utils.data.errors import DatasetError
    from utils.data.sources import expand_source

    try:
        first = args.folder[0]
        several = (len(args.folder) > 1 or args.identity_map or args.weights or glob.has_magic(first)
                   or (os.path.isfile(first) and first.endswith(".rec"))
                   or (os.path.isdir(first) and expand_source(first)[0] == "shards"))
        if several:
            return summarise_sources(args.folder, args.identity_map, args.weights, args.verify, args.json,
                                     args.workers)
    except (DatasetError, recordio.RecordIOError) as exc:
        print(f"rec_info: error: {exc}", file=sys.stderr)
        return 2
    args.folder = args.folder[0]

    summary: dict = {"folder": args.folder}
    try:
        try:
            dataset = RecordDataset(args.folder, flip=False, skip_bad_records=False)
            summary.update(num_images=dataset.num_image, num_classes=dataset.num_classes, layout=dataset.layout)
            sizes = identity_sizes(dataset)
            summary["images_per_identity"] = {"min": int(sizes.min()), "median": float(np.median(sizes)),
                                              "max": int(sizes.max())} if len(sizes) else {}
            if not args.json:
                print(f"num_images={dataset.num_image} num_classes={dataset.num_classes} layout={dataset.layout}")
                for line in histogram_lines(sizes):
                    print(line)
        except (DatasetError, recordio.BadRecordError) as exc:
            if not args.verify:  # the record-by-record pass below says exactly what is wrong
                raise
            summary["error"] = str(exc)
            print(f"rec_info: error: {exc}", file=sys.stderr)
        if not args.verify:
            if args.json:
                print(json.dumps(summary))
            return 0
        if args.workers < 1:
            raise DatasetError(f"--workers {args.workers}: expected at least 1")
        result = verify_pack(args.folder, args.workers)
    except (DatasetError, recordio.RecordIOError) as exc:
        if args.json:
            print(json.dumps({"folder": args.folder, "error": str(exc)}))
        print(f"rec_info: error: {exc}", file=sys.stderr)
        return 2
    bad = result["bad"]
    if args.json:
        print(json.dumps({**summary, **result, "ok": not bad}))
    elif bad:
        print(f"verify: {len(bad)} bad records in {result['file']}, keys: {' '.join(str(e['key']) for e in bad)}")
        for entry in bad:
            print(f"  {entry_line(entry)}")
    else:
        print(f"verify: all {result['num_images']} images in {result['file']} decode cleanly; all "
              f"{result['num_entries']} index entries, labels and header0 are consistent")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
