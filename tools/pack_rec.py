"""Pack an image folder or a list file into train.rec / train.idx / property.

    python tools/pack_rec.py IMAGES_DIR OUT_DIR            # root/<identity>/<image>.jpg
    python tools/pack_rec.py list.txt OUT_DIR               # lines: path<TAB>label
    python tools/pack_rec.py train.lst OUT_DIR --image-root IMAGES   # mxnet im2rec: index<TAB>label<TAB>path
    python tools/pack_rec.py IMAGES_DIR OUT_DIR --plain     # im2rec layout (keys 0..N-1, no header)
    python tools/pack_rec.py IMAGES_DIR OUT_DIR --shards 8  # OUT_DIR/train_0..7.rec/.idx/.property, in parallel

The default is the InsightFace layout arcface_torch reads (images at keys 1..N sorted by class,
one identity record per class, header0 at key 0). JPEGs already at --image-size are stored
unchanged; anything else is decoded, resized and re-encoded (JPEG quality --quality).

Every image is checked; unreadable ones are listed in OUT_DIR/bad_images.txt (path<TAB>reason).
``--on-error stop`` (default) then writes no set; ``--on-error skip`` packs the others. The set is
written under temporary names and renamed at the end, so an interrupted run leaves no train.rec.
An identity folder without images stops the run: class ids follow sorted folder names, and
skipping one would silently shift every later id.
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

from utils.data import recordio  # noqa: E402  (numpy only; the datasets, which import torch, load lazily)

OUTPUT_NAMES = ("train.rec", "train.idx", "property")
BAD_LIST = "bad_images.txt"
SHOWN = 3  # problems named in an error message; the rest are counted


class PackError(ValueError):
    """Bad input for pack_rec; the message is one line."""


def _parse_label(text: str, where: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise PackError(f"{where}: label {text!r} is not a number") from None
    if not value.is_integer():  # im2rec writes 3.000000; 3.5 is no class id
        raise PackError(f"{where}: label {text!r} is not a whole number, expected a class id")
    if value < 0:
        raise PackError(f"{where}: label {int(value)} is negative, expected >= 0")
    return int(value)


def read_list_file(path: str, image_root: str | None = None) -> tuple[list[str], list[int]]:
    """``path<TAB>label`` lines, or mxnet im2rec .lst lines ``index<TAB>label<TAB>path`` (first label used).

    Relative paths are relative to ``image_root`` (default: the list file's folder)."""
    base = image_root or os.path.dirname(os.path.abspath(path))
    paths, labels = [], []
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split("\t")
            where = f"{path}: line {number}"
            if len(fields) == 2:
                image, label = fields[0], _parse_label(fields[1], where)
            elif len(fields) >= 3:
                if not fields[0].strip().isdigit():
                    raise PackError(f"{where}: im2rec .lst index {fields[0][:20]!r} is not an integer, expected "
                                    f"'index<TAB>label<TAB>path'")
                image, label = fields[-1], _parse_label(fields[1], where)
            else:
                raise PackError(f"{where}: expected 'path<TAB>label' or 'index<TAB>label<TAB>path', "
                                f"got {line.strip()[:60]!r}")
            paths.append(image if os.path.isabs(image) else os.path.join(base, image))
            labels.append(label)
    if not paths:
        raise PackError(f"{path}: the list file holds no 'path<TAB>label' or 'index<TAB>label<TAB>path' lines")
    return paths, labels


def scan_folder(root: str) -> tuple[list[str], list[int], list[str]]:
    """``root/<identity>/<image>``: (paths, labels, identity names), read exactly as training reads the folder
    (``utils.data.datasets.scan_image_folder``), so a pack gives every image the class id training on the folder would."""
    from utils.data.datasets import scan_image_folder
    from utils.data.errors import DatasetError

    try:
        return scan_image_folder(root)
    except DatasetError as exc:
        raise PackError(str(exc)) from None


def encode_file(job: tuple[str, int, int, int]) -> bytes:
    """Image file -> JPEG bytes at the target size (unchanged when it already is one)."""
    import cv2

    path, height, width, quality = job
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise PackError(f"{path}: cannot read the image file ({exc.strerror or exc})") from None
    if data.size == 0:
        raise PackError(f"{path}: cannot decode the image: the file is empty")
    try:
        image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    except cv2.error:  # some truncated files make OpenCV assert instead of returning None
        image = None
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


def try_encode(job: tuple[str, int, int, int]) -> tuple[bytes | None, str | None]:
    """(JPEG bytes, None) or (None, why the image is unusable): a bad image must not end the pool."""
    try:
        return encode_file(job), None
    except PackError as exc:
        return None, str(exc).split(": ", 1)[-1]


def _progress(done: int, total: int, bad: int, start: float) -> None:
    # "checked", not "packed": nothing is a set until every image was read and the files are renamed.
    rate = done / max(time.time() - start, 1e-6)
    sys.stderr.write(f"\rchecked {done}/{total} images: {bad} unusable ({rate:.0f} img/s)")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _temporary(out_dir: str, name: str) -> str:
    # Fixed names: a killed run's leftovers are overwritten by the next run, never read as a set.
    return os.path.join(out_dir, f".{name}.partial")


def _write_text_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)


def pack_files(name: str = "train") -> dict[str, str]:
    """The file names of the pack ``name``: train.rec/.idx/property, or a shard's train_3.rec/.idx/.property."""
    return {"rec": f"{name}.rec", "idx": f"{name}.idx", "property": "property" if name == "train" else
            f"{name}.property", "bad": BAD_LIST if name == "train" else f"{name}.{BAD_LIST}"}


def pack(paths: list[str], labels: list[int], out_dir: str, plain: bool = False,
         image_size: tuple[int, int] = (112, 112), quality: int = 95, workers: int = 1, progress: bool = False,
         on_error: str = "stop", name: str = "train") -> tuple[int, int, list[tuple[str, str]]]:
    """Write the set ``name`` (temporary names, renamed at the end); returns (num_images, num_classes, bad
    images)."""
    from utils.data.datasets import write_property

    if on_error not in ("stop", "skip"):
        raise PackError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
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
    files = pack_files(name)
    temporary = {kind: _temporary(out_dir, files[kind]) for kind in ("rec", "idx", "property")}
    bad_list = os.path.join(out_dir, files["bad"])
    bad: list[tuple[str, str]] = []
    start = time.time()

    def encoded() -> Iterable[tuple[bytes | None, str | None]]:
        if workers <= 1:
            yield from map(try_encode, jobs)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                yield from pool.map(try_encode, jobs, chunksize=64)

    try:
        writer = recordio.MXIndexedRecordIO(temporary["idx"], temporary["rec"], "w")
        first_key = 0 if plain else 1
        ranges: dict[int, list[int]] = {}
        key = first_key
        for number, (label, (jpeg, problem)) in enumerate(zip(labels, encoded())):
            if jpeg is None:
                bad.append((paths[number], problem or "unusable"))
            else:
                writer.write_idx(key, recordio.pack(recordio.IRHeader(0, float(label), key, 0), jpeg))
                ranges.setdefault(label, [key, key])[1] = key + 1
                key += 1
            if progress and (number % 1000 == 999 or number == len(jobs) - 1):
                _progress(number + 1, len(jobs), len(bad), start)
        num_images = key - first_key
        if bad:
            _write_text_atomic(bad_list, "".join(f"{p}\t{why}\n" for p, why in bad))
            named = "; ".join(f"{p} ({why})" for p, why in bad[:SHOWN])
            more = f", ... {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
            if on_error == "stop":
                raise PackError(f"{len(bad)} of {len(jobs)} images unusable: {named}{more}; all listed in "
                                f"{bad_list}; no set written (no {files['rec']}, {files['idx']}, {files['property']}; "
                                f"--on-error skip packs the rest)")
            emptied = sorted(set(range(num_classes)) - set(ranges))
            if emptied:
                raise PackError(f"class {emptied[0]} has no usable image left ({len(emptied)} such classes), so the "
                                f"class ids would not be 0..{num_classes - 1}; bad images listed in "
                                f"{bad_list}; no set written")
        elif os.path.exists(bad_list):
            os.remove(bad_list)  # a previous run's list would now be wrong
        if not plain:
            first_identity = key
            for label in range(num_classes):
                begin, end = ranges[label]
                writer.write_idx(key, recordio.pack(recordio.IRHeader(0, [begin, end], key, 0), b""))
                key += 1
            writer.write_idx(0, recordio.pack(recordio.IRHeader(0, [first_identity, key], 0, 1), b""))
        writer.close()
        write_property(temporary["property"], num_classes, image_size)
        # train.rec goes first and comes back last: a crash in between leaves no train.rec (a clear "not
        # found"), never a new index next to an old record file.
        if os.path.exists(os.path.join(out_dir, files["rec"])):
            os.remove(os.path.join(out_dir, files["rec"]))
        for kind in ("idx", "property", "rec"):
            os.replace(temporary[kind], os.path.join(out_dir, files[kind]))
    finally:
        for path in temporary.values():
            if os.path.exists(path):
                os.remove(path)
    return num_images, num_classes, bad


def shard_plan(labels: list[int], shards: int, split_identities: bool = False) -> list[np.ndarray]:
    """Image indices of each of ``shards`` shards, about equal in images. Identities are never split: shard i
    holds the classes [c_i, c_(i+1)) whole (cut where the image count is nearest i/shards of the total);
    ``split_identities`` cuts the class-sorted images into equal runs instead."""
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    if shards > len(labels):
        raise PackError(f"--shards {shards}: more shards than the {len(labels)} images")
    if split_identities:
        return np.array_split(order, shards)
    counts = np.bincount(labels)
    if shards > len(counts):
        raise PackError(f"--shards {shards}: more shards than the {len(counts)} identities (identities are never "
                        f"split; --split-identities splits them)")
    ends = np.cumsum(counts)
    cuts = [0]
    for i in range(1, shards):
        target = len(labels) * i / shards
        at = int(np.searchsorted(ends, target))  # the first class whose end reaches the target
        cut = at + 1 if at < len(ends) and abs(ends[at] - target) < abs((ends[at - 1] if at else 0) - target) else at
        cuts.append(min(max(cut, cuts[-1] + 1), len(counts) - (shards - i)))
    cuts.append(len(counts))
    starts = np.concatenate([[0], ends])
    return [order[starts[a]:starts[b]] for a, b in zip(cuts[:-1], cuts[1:])]


def _pack_shard(job: tuple) -> tuple[int, int, list[tuple[str, str]]]:
    return pack(*job)


def pack_shards(paths: list[str], labels: list[int], out_dir: str, shards: int, split_identities: bool = False,
                plain: bool = False, image_size: tuple[int, int] = (112, 112), quality: int = 95, workers: int = 1,
                on_error: str = "stop") -> list[tuple[int, int, list[tuple[str, str]]]]:
    """``out_dir/train_<i>.rec/.idx/.property`` for i < ``shards``, written in parallel (a process per shard, at
    most ``workers``), each an InsightFace pack with its own labels 0..C_i-1; read as a list (a folder of
    shards), shard i's labels are offset by the classes before it, which gives back the original class ids.
    Whole identities per shard: ``out_dir/property`` holds the total. ``split_identities``: an identity may
    span two shards; ``out_dir/identity_map.csv`` (for ``rec_identity_map``) merges it again."""
    from utils.data.datasets import write_property

    plan = shard_plan(labels, shards, split_identities)
    labels_array = np.asarray(labels, dtype=np.int64)
    jobs, rows, offset = [], [], 0
    for number, indices in enumerate(plan):
        classes, local = np.unique(labels_array[indices], return_inverse=True)
        jobs.append(([paths[i] for i in indices], local.tolist(), out_dir, plain, image_size, quality, 1, False,
                     on_error, f"train_{number}"))
        rows += [(offset + position, int(original)) for position, original in enumerate(classes)]
        offset += len(classes)
    results, failures = [None] * shards, []
    with ProcessPoolExecutor(max_workers=max(1, min(shards, workers))) as pool:
        futures = [pool.submit(_pack_shard, job) for job in jobs]
        for number, future in enumerate(futures):
            try:
                results[number] = future.result()
            except PackError as exc:
                failures.append(f"shard train_{number}: {exc}")
    if failures:  # no half list of shards: remove the ones written
        for number in range(shards):
            for kind in ("rec", "idx", "property"):
                path = os.path.join(out_dir, pack_files(f"train_{number}")[kind])
                if os.path.exists(path):
                    os.remove(path)
        raise PackError(f"{failures[0]}{f' (and {len(failures) - 1} more shards)' if len(failures) > 1 else ''}; "
                        f"no shard kept")
    if split_identities:
        spans = np.bincount([original for _, original in rows])
        merged = [(label, original) for label, original in rows if spans[original] > 1]
        _write_text_atomic(os.path.join(out_dir, "identity_map.csv"), "source,label,global_id\n" + "".join(
            f"{os.path.realpath(out_dir)},{label},{original}\n" for label, original in merged))
    else:
        write_property(os.path.join(out_dir, "property"), sum(r[1] for r in results), image_size)
    return results


def prepare_output(out_dir: str, force: bool) -> None:
    """Validate (and create) the output folder; refuse to overwrite a set without ``force``."""
    from utils.config.paths import ensure_output_dir

    ensure_output_dir(out_dir, "OUT_DIR")
    existing = [n for n in OUTPUT_NAMES if os.path.exists(os.path.join(out_dir, n))]
    existing += sorted(n for n in os.listdir(out_dir) if n.startswith("train_") and n.endswith((".rec", ".idx")))
    if existing and not force:
        raise PackError(f"{out_dir}: already holds {', '.join(existing)}; pass --force to overwrite")


def main(argv: list[str] | None = None) -> int:
    """Command line: source folder or list file, output folder."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="image folder root/<identity>/<image>, a list file 'path<TAB>label' or "
                                       "an im2rec .lst 'index<TAB>label<TAB>path'")
    parser.add_argument("out_dir", help="output folder for train.rec, train.idx, property")
    parser.add_argument("--image-root", default=None, help="folder a list file's relative paths start from "
                                                           "(default: the list file's folder)")
    parser.add_argument("--plain", action="store_true", help="im2rec layout: keys 0..N-1, no header records")
    parser.add_argument("--image-size", type=int, nargs=2, default=(112, 112), metavar=("H", "W"))
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded images")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel encoding processes")
    parser.add_argument("--on-error", choices=("stop", "skip"), default="stop",
                        help="unusable images: stop without writing a set (default) or pack without them; "
                             f"either way they are listed in OUT_DIR/{BAD_LIST}")
    parser.add_argument("--force", action="store_true", help="overwrite an existing set in out_dir")
    parser.add_argument("--shards", type=int, default=0, help="write N shards train_0..train_<N-1> in parallel, "
                                                              "identities whole (read them as rec=OUT_DIR)")
    parser.add_argument("--split-identities", action="store_true", help="--shards: equal image counts, an "
                        "identity may span two shards (OUT_DIR/identity_map.csv merges it: rec_identity_map)")
    args = parser.parse_args(argv)
    from utils.data.errors import DatasetError

    try:
        if os.path.isdir(args.source):
            paths, labels, _ = scan_folder(args.source)
        elif os.path.isfile(args.source):
            paths, labels = read_list_file(args.source, args.image_root)
        else:
            raise PackError(f"{args.source}: not found, expected an image folder or a list file")
        prepare_output(args.out_dir, args.force)
        if args.shards:
            results = pack_shards(paths, labels, args.out_dir, args.shards, args.split_identities, args.plain,
                                  tuple(args.image_size), args.quality, args.workers, args.on_error)
            for number, (images, classes, _) in enumerate(results):
                print(f"wrote {os.path.join(args.out_dir, f'train_{number}.rec')}: num_images={images} "
                      f"num_classes={classes}")
            return 0
        num_images, num_classes, bad = pack(paths, labels, args.out_dir, args.plain, tuple(args.image_size),
                                            args.quality, args.workers, progress=True, on_error=args.on_error)
    except (PackError, DatasetError, recordio.RecordIOError, ValueError) as exc:
        print(f"pack_rec: error: {exc}", file=sys.stderr)
        return 2
    skipped = f"; {len(bad)} unusable images skipped, listed in {os.path.join(args.out_dir, BAD_LIST)}" if bad else ""
    print(f"wrote {os.path.join(args.out_dir, 'train.rec')}, train.idx, property: num_images={num_images} "
          f"num_classes={num_classes} layout={'plain' if args.plain else 'header'}{skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
