"""Pack an image folder or a list file into train.rec / train.idx / property.

    python tools/pack_rec.py IMAGES_DIR OUT_DIR            # root/<identity>/<image>.jpg
    python tools/pack_rec.py list.txt OUT_DIR               # lines: path<TAB>label
    python tools/pack_rec.py IMAGES_DIR OUT_DIR --plain     # im2rec layout (keys 0..N-1, no header)

The default is the InsightFace layout arcface_torch reads (images at keys 1..N sorted by class,
one identity record per class, header0 at key 0). JPEGs already at --image-size are stored
unchanged; anything else is decoded, resized and re-encoded (JPEG quality --quality).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Iterable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from utils import recordio  # noqa: E402  (numpy only; dataset.py, which imports torch, loads lazily)


class PackError(ValueError):
    """Bad input for pack_rec; the message is one line."""


def read_list_file(path: str) -> tuple[list[str], list[int]]:
    """``path<TAB>label`` lines (relative paths are relative to the list file's folder)."""
    base = os.path.dirname(os.path.abspath(path))
    paths, labels = [], []
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 2:
                raise PackError(f"{path}: line {number}: expected 'path<TAB>label', got {line.strip()[:60]!r}")
            try:
                label = int(float(fields[1]))
            except ValueError:
                raise PackError(f"{path}: line {number}: label {fields[1]!r} is not an integer") from None
            if label < 0:
                raise PackError(f"{path}: line {number}: label {label} is negative, expected >= 0")
            paths.append(fields[0] if os.path.isabs(fields[0]) else os.path.join(base, fields[0]))
            labels.append(label)
    if not paths:
        raise PackError(f"{path}: the list file holds no 'path<TAB>label' lines")
    return paths, labels


def encode_file(job: tuple[str, int, int, int]) -> bytes:
    """Image file -> JPEG bytes at the target size (unchanged when it already is one)."""
    import cv2

    path, height, width, quality = job
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise PackError(f"{path}: cannot read the image file ({exc.strerror or exc})") from None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise PackError(f"{path}: cannot decode the image, expected a JPEG/PNG/BMP file")
    is_jpeg = data[:2].tobytes() == b"\xff\xd8"
    if is_jpeg and image.shape[:2] == (height, width):
        return data.tobytes()
    if image.shape[:2] != (height, width):
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover
        raise PackError(f"{path}: OpenCV could not re-encode the image")
    return buf.tobytes()


def _progress(done: int, total: int, start: float) -> None:
    rate = done / max(time.time() - start, 1e-6)
    sys.stderr.write(f"\rpacked {done}/{total} images ({rate:.0f} img/s)")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def pack(paths: list[str], labels: list[int], out_dir: str, plain: bool = False, image_size: tuple[int, int] = (112, 112),
         quality: int = 95, workers: int = 1, progress: bool = False) -> tuple[int, int]:
    """Write the set; returns (num_images, num_classes)."""
    from dataset import write_property

    order = np.argsort(np.asarray(labels), kind="stable")  # images of one class are contiguous
    paths = [paths[i] for i in order]
    labels = [int(labels[i]) for i in order]
    num_classes = labels[-1] + 1
    present = np.unique(labels)
    if len(present) != num_classes:
        missing = sorted(set(range(num_classes)) - set(present.tolist()))[0]
        raise PackError(f"labels must be 0..{num_classes - 1} without gaps; class {missing} has no image")
    height, width = image_size
    jobs = [(path, height, width, quality) for path in paths]
    writer = recordio.MXIndexedRecordIO(os.path.join(out_dir, "train.idx"), os.path.join(out_dir, "train.rec"), "w")
    start = time.time()

    def encoded() -> Iterable[bytes]:
        if workers <= 1:
            yield from map(encode_file, jobs)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                yield from pool.map(encode_file, jobs, chunksize=64)

    first_key = 0 if plain else 1
    ranges: list[list[int]] = []
    for number, (label, jpeg) in enumerate(zip(labels, encoded())):
        key = first_key + number
        writer.write_idx(key, recordio.pack(recordio.IRHeader(0, float(label), key, 0), jpeg))
        if not ranges or len(ranges) == label:
            ranges.append([key, key + 1])
        else:
            ranges[-1][1] = key + 1
        if progress and (number % 1000 == 999 or number == len(jobs) - 1):
            _progress(number + 1, len(jobs), start)
    if not plain:
        key = first_key + len(jobs)
        first_identity = key
        for begin, end in ranges:
            writer.write_idx(key, recordio.pack(recordio.IRHeader(0, [begin, end], key, 0), b""))
            key += 1
        writer.write_idx(0, recordio.pack(recordio.IRHeader(0, [first_identity, key], 0, 1), b""))
    writer.close()
    write_property(os.path.join(out_dir, "property"), num_classes, image_size)
    return len(jobs), num_classes


def prepare_output(out_dir: str, force: bool) -> None:
    existing = [n for n in ("train.rec", "train.idx", "property") if os.path.exists(os.path.join(out_dir, n))]
    if existing and not force:
        raise PackError(f"{out_dir}: already holds {', '.join(existing)}; pass --force to overwrite")
    os.makedirs(out_dir, exist_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="image folder root/<identity>/<image> or a list file 'path<TAB>label'")
    parser.add_argument("out_dir", help="output folder for train.rec, train.idx, property")
    parser.add_argument("--plain", action="store_true", help="im2rec layout: keys 0..N-1, no header records")
    parser.add_argument("--image-size", type=int, nargs=2, default=(112, 112), metavar=("H", "W"))
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded images")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel encoding processes")
    parser.add_argument("--force", action="store_true", help="overwrite an existing set in out_dir")
    args = parser.parse_args(argv)
    from dataset import DatasetError, scan_image_folder

    try:
        if os.path.isdir(args.source):
            paths, labels, _ = scan_image_folder(args.source)
        elif os.path.isfile(args.source):
            paths, labels = read_list_file(args.source)
        else:
            raise PackError(f"{args.source}: not found, expected an image folder or a list file")
        prepare_output(args.out_dir, args.force)
        num_images, num_classes = pack(paths, labels, args.out_dir, args.plain, tuple(args.image_size),
                                       args.quality, args.workers, progress=True)
    except (PackError, DatasetError, recordio.RecordIOError) as exc:
        print(f"pack_rec: error: {exc}", file=sys.stderr)
        return 2
    print(f"num_images={num_images} num_classes={num_classes} layout={'plain' if args.plain else 'header'} "
          f"out={args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
