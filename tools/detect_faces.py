"""Detect one face per photo and crop or align it: a raw VGGFace2-style folder becomes a training folder.

    python tools/detect_faces.py RAW_DIR OUT_DIR --mode facenet                  # 160x160 box crops
    python tools/detect_faces.py RAW_DIR OUT_DIR --mode facenet --margin 32      # box + 32 px of the crop
    python tools/detect_faces.py RAW_DIR OUT_DIR --mode arcface --workers 8      # 112x112, 5-point aligned
    python tools/detect_faces.py RAW_DIR OUT_DIR --mode arcface --pack           # + OUT_DIR/train.rec/.idx

RAW_DIR holds ``<identity>/<photo>`` (or ``train/<identity>/<photo>`` and ``test/...`` splits, or only photos: a
flat folder, one identity per photo; ``--flat`` also accepts loose photos beside identity folders); OUT_DIR gets
the same layout with one face per photo, detected by MTCNN (utils/faces/mtcnn.py, facenet-pytorch's detector).
``facenet`` cuts the box plus ``--margin`` pixels of the output and resizes it to ``--image-size`` (160), as
facenet-pytorch's MTCNN does; ``arcface`` warps the five landmarks onto the ArcFace template
(utils/faces/align.py, 112). Several faces in a photo: the largest is kept (and counted). Every file is tried
(``.webp`` and whatever else OpenCV decodes; a face from a format OpenCV cannot write gets ``.png`` appended):
photos without a face and files that do not decode are counted and listed in OUT_DIR/failed.txt.
OUT_DIR/detections.tsv holds every photo's box, probability and landmarks. Photos are detected in batches
(``MTCNN.detect_batch``, ``--batch`` per worker). An interrupted run (Ctrl-C: one line, exit 130) resumes where
it stopped (finished photos are kept, from OUT_DIR/.detect_faces.journal); images are written under a
temporary name and renamed.
``--pack`` then writes OUT_DIR/train.rec, train.idx and property (the ``train`` split when there are splits;
labels follow sorted identity names, identities without any face are left out).
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

logger = logging.getLogger("detect_faces")

WRITABLE = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")  # faces keep these extensions
SPLITS = ("train", "test", "val", "validation")
DETECTIONS, FAILED, JOURNAL, SETTINGS = "detections.tsv", "failed.txt", ".detect_faces.journal", ".detect_faces.settings"
# landmarks: left eye, right eye, nose, left and right mouth corner (the ArcFace template's order)
COLUMNS = ["path", "status", "faces", "x1", "y1", "x2", "y2", "prob"] + [f"lm{i}_{axis}" for i in range(1, 6)
                                                                       for axis in "xy"]
DEFAULT_SIZE = {"facenet": 160, "arcface": 112}


class DetectFacesError(ValueError):
    """Bad folders or options for detect_faces; the message is one line."""


def scan(raw_dir: str, flat: bool = False) -> list[str]:
    """Relative paths of every non-hidden file, sorted: ``<identity>/<photo>``, ``<split>/<identity>/<photo>``,
    or ``<photo>`` (a flat folder, or ``flat``). Files are not filtered by extension: one that does not decode is
    listed as unreadable, never skipped."""
    photos, loose = [], []
    for folder, subfolders, files in os.walk(raw_dir):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        relative = os.path.relpath(folder, raw_dir)
        depth = 0 if relative == "." else relative.count(os.sep) + 1
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.normpath(os.path.join(relative, name))
            split_layout = depth == 2 and relative.split(os.sep)[0] in SPLITS
            if depth == 0:
                loose.append(path)
            elif depth != 1 and not split_layout:
                raise DetectFacesError(f"{os.path.join(raw_dir, path)}: photo outside an identity folder (expected "
                                       f"RAW_DIR/<identity>/<photo> or RAW_DIR/<split>/<identity>/<photo>)")
            else:
                photos.append(path)
    if loose and photos and not flat:
        raise DetectFacesError(f"{os.path.join(raw_dir, loose[0])}: photo outside an identity folder (expected "
                               f"RAW_DIR/<identity>/<photo> or RAW_DIR/<split>/<identity>/<photo>; --flat takes "
                               f"loose photos as one identity each)")
    if not photos and not loose:
        raise DetectFacesError(f"{raw_dir}: no photos found, expected RAW_DIR/<identity>/<photo> files (or photos "
                               f"directly in RAW_DIR)")
    return sorted(loose + photos)


def output_relative(relative: str) -> str:
    """Where a photo's face goes under OUT_DIR: the same path, ``.png`` appended where OpenCV cannot write the
    photo's own format."""
    return relative if os.path.splitext(relative)[1].lower() in WRITABLE else relative + ".png"


def identity_of(relative: str) -> str:
    """A face's identity: its folder, or the photo itself when it lies directly in the folder (flat)."""
    return os.path.dirname(relative) or relative


# ------------------------------------------------------------------------------------------- one photo

_WORKER: dict = {}


def _init_worker(settings: dict) -> None:
    """Per-process detector; one thread each (the processes are the parallelism)."""
    import cv2
    import torch

    from utils.faces.mtcnn import MTCNN

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    if multiprocessing.parent_process() is not None:
        # Ctrl-C reaches the whole process group: the parent alone handles it (one line, the pool terminated),
        # so no worker prints a traceback of its own.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER["settings"] = settings
    if settings.get("onnx_dir"):  # the networks under onnxruntime, one thread as torch's
        _WORKER["detector"] = MTCNN.from_onnx(settings["onnx_dir"], threads=1, min_face_size=settings["min_face_size"])
    else:
        _WORKER["detector"] = MTCNN(min_face_size=settings["min_face_size"])


def _write_atomic_image(path: str, image_bgr: np.ndarray, quality: int) -> None:
    import cv2

    extension = os.path.splitext(path)[1].lower()
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if extension in (".jpg", ".jpeg") else []
    ok, data = cv2.imencode(extension, image_bgr, params)
    if not ok:  # pragma: no cover - output_relative gives only extensions OpenCV encodes
        raise OSError(f"OpenCV cannot encode {extension}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.partial{os.getpid()}"
    with open(temporary, "wb") as handle:
        handle.write(data.tobytes())
    os.replace(temporary, path)


def process_photos(relatives: list[str]) -> list[list[str]]:
    """Detect (``detect_batch``, photos of any sizes together), crop/align and write a few photos; returns their
    detections.tsv rows (never raises on bad data: a file that does not decode is ``unreadable``)."""
    import cv2

    from utils.faces.align import norm_crop
    from utils.faces.prepare import decode_photo

    settings, detector = _WORKER["settings"], _WORKER["detector"]
    empty = [""] * (len(COLUMNS) - 3)
    images = []
    for relative in relatives:
        try:
            with open(os.path.join(settings["raw_dir"], relative), "rb") as handle:
                images.append(decode_photo(handle.read()))
        except OSError:
            images.append(None)
    readable = [i for i, image in enumerate(images) if image is not None]
    found = dict(zip(readable, detector.detect_batch([images[i] for i in readable])))
    rows = []
    for index, (relative, rgb) in enumerate(zip(relatives, images)):
        if rgb is None:
            rows.append([relative, "unreadable", "0"] + empty)
            continue
        boxes, probs, landmarks = found[index]
        if len(boxes) == 0:
            rows.append([relative, "no_face", "0"] + empty)
            continue
        size = settings["image_size"]
        if settings["mode"] == "facenet":
            face = detector.crop(rgb, boxes[0], size, settings["margin"])
        else:
            face = norm_crop(rgb, landmarks[0], size)
        target = os.path.join(settings["out_dir"], output_relative(relative))
        try:
            _write_atomic_image(target, cv2.cvtColor(face, cv2.COLOR_RGB2BGR), settings["quality"])
        except OSError as exc:  # a full disk or a read-only folder ends the run with one line, not a traceback
            raise DetectFacesError(f"{target}: cannot write the face ({exc.strerror or exc})") from None
        numbers = list(boxes[0]) + [probs[0]] + list(landmarks[0].reshape(-1))
        rows.append([relative, "ok", str(len(boxes))] + [f"{float(value):.3f}" if i != 4 else f"{float(value):.6f}"
                                                         for i, value in enumerate(numbers)])
    return rows


# ------------------------------------------------------------------------------------------- the folder


def _read_journal(path: str) -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    if os.path.isfile(path):
        with open(path) as handle:
            for line in handle:
                fields = line.rstrip("\n").split("\t")
                if len(fields) == len(COLUMNS):  # a line cut short by a crash is simply redone
                    rows[fields[0]] = fields
    return rows


def _write_text_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)


def _check_settings(out_dir: str, settings: dict) -> None:
    """A resumed run must use the settings the finished photos were made with."""
    text = " ".join(f"{key}={settings[key]}" for key in ("mode", "image_size", "margin", "min_face_size"))
    path = os.path.join(out_dir, SETTINGS)
    if os.path.isfile(path):
        with open(path) as handle:
            previous = handle.read().strip()
        if previous != text:
            raise DetectFacesError(f"{out_dir}: already holds faces made with {previous}; this run asks for {text} "
                                   f"(use another OUT_DIR, or the same options to resume)")
    else:
        _write_text_atomic(path, text + "\n")


def _progress(done: int, total: int, start: float, last: list[float]) -> None:
    now = time.time()
    if done != total and now - last[0] < 1.0:
        return
    last[0] = now
    rate = done / max(now - start, 1e-6)
    eta = int((total - done) / rate) if rate > 0 else 0
    sys.stderr.write(f"\rdetect_faces: {done}/{total} photos ({rate:.1f}/s, ETA {eta // 60}m{eta % 60:02d}s)")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


class Interrupted(Exception):
    """Ctrl-C during detection: the photos finished before it are in the journal (the next run resumes)."""

    def __init__(self, done: int, total: int) -> None:
        super().__init__(f"interrupted after {done} of {total} photos; the same command resumes from there")


def _start_pool(workers: int, settings: dict):
    """The worker processes. OpenCV's thread pool does not survive a fork: a child forked while the parent's
    pool has threads hangs in its first cv2 call (seen after a resumed run in the same process), so the parent
    forks with one OpenCV thread and gets its setting back afterwards."""
    import cv2

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        return multiprocessing.get_context(method).Pool(workers, _init_worker, (settings,))
    finally:
        cv2.setNumThreads(threads)


def detect_folder(raw_dir: str, out_dir: str, mode: str = "arcface", image_size: int | None = None, margin: int = 0,
                  workers: int = 1, min_face_size: float = 20, quality: int = 95, progress: bool = False,
                  flat: bool = False, batch: int = 8, onnx_dir: str | None = None) -> dict:
    """Process every photo of ``raw_dir`` not yet finished in ``out_dir``; returns the summary counts.
    ``onnx_dir``: run MTCNN's networks under onnxruntime (files from tools/mtcnn2onnx.py)."""
    from utils.config.paths import ensure_output_dir
    from utils.faces.mtcnn_onnx import load_onnx_nets

    settings = _validate(raw_dir, out_dir, mode, image_size, margin, workers, min_face_size, quality)
    if batch < 1:
        raise DetectFacesError(f"--batch {batch}: expected at least 1 photo per detection batch")
    if onnx_dir:
        load_onnx_nets(onnx_dir, threads=1)  # missing onnxruntime or files: one line before any worker starts
        settings["onnx_dir"] = onnx_dir
    photos = scan(settings["raw_dir"], flat)
    out_dir = ensure_output_dir(out_dir, "OUT_DIR")
    _check_settings(out_dir, settings)
    journal_path = os.path.join(out_dir, JOURNAL)
    rows = _read_journal(journal_path)
    done = {path for path, row in rows.items()
            if row[1] != "ok" or os.path.isfile(os.path.join(out_dir, output_relative(path)))}
    todo = [path for path in photos if path not in done]
    logger.info("%d photos, %d already done, %d to process with %d worker(s)", len(photos), len(photos) - len(todo),
                len(todo), workers)
    chunks = [todo[start:start + batch] for start in range(0, len(todo), batch)]
    start, last, count = time.time(), [0.0], 0
    pool = None
    with open(journal_path, "a") as journal:
        try:
            if workers == 1 or len(chunks) <= 1:
                _init_worker(settings)
                results = map(process_photos, chunks)
            else:  # fork where there is one, as torch's DataLoader workers do (one thread each, set in _init_worker)
                pool = _start_pool(workers, settings)
                results = pool.imap_unordered(process_photos, chunks)
            for chunk_rows in results:
                for row in chunk_rows:
                    journal.write("\t".join(row) + "\n")
                    rows[row[0]] = row
                journal.flush()  # what is in the journal is finished, whatever happens next
                count += len(chunk_rows)
                if progress:
                    _progress(count, len(todo), start, last)
        except KeyboardInterrupt:
            raise Interrupted(len(photos) - len(todo) + count, len(photos)) from None
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    current = [rows[path] for path in photos]  # photos removed from RAW_DIR since are not reported
    _write_text_atomic(os.path.join(out_dir, DETECTIONS),
                       "\t".join(COLUMNS) + "\n" + "".join("\t".join(row) + "\n" for row in current))
    failed = [row for row in current if row[1] != "ok"]
    _write_text_atomic(os.path.join(out_dir, FAILED), "".join(f"{row[0]}\t{row[1]}\n" for row in failed))
    return {"photos": len(photos), "processed": len(todo), "resumed": len(photos) - len(todo),
            "faces": sum(row[1] == "ok" for row in current),
            "several_faces": sum(row[1] == "ok" and int(row[2]) > 1 for row in current),
            "no_face": sum(row[1] == "no_face" for row in current),
            "unreadable": sum(row[1] == "unreadable" for row in current),
            "out_dir": out_dir, "rows": current}


def _validate(raw_dir: str, out_dir: str, mode: str, image_size: int | None, margin: int, workers: int,
              min_face_size: float, quality: int) -> dict:
    from utils.faces.align import AlignmentError, template_for

    if mode not in DEFAULT_SIZE:
        raise DetectFacesError(f"--mode {mode!r}: expected 'facenet' or 'arcface'")
    size = DEFAULT_SIZE[mode] if image_size is None else int(image_size)
    if not os.path.isdir(raw_dir):
        raise DetectFacesError(f"RAW_DIR {raw_dir}: no such folder")
    raw, out = os.path.realpath(raw_dir), os.path.realpath(out_dir)
    if out == raw or out.startswith(raw + os.sep):
        raise DetectFacesError(f"OUT_DIR {out_dir} is inside RAW_DIR {raw_dir}: its faces would be read as photos")
    if size < 1:
        raise DetectFacesError(f"--image-size {size}: expected a positive number of pixels")
    if mode == "arcface":
        if margin:
            raise DetectFacesError(f"--margin {margin}: only for --mode facenet (arcface aligns to the template)")
        try:
            template_for(size)
        except AlignmentError as exc:
            raise DetectFacesError(f"--image-size {size}: {exc} (the ArcFace template)") from None
    if not 0 <= margin < size:
        raise DetectFacesError(f"--margin {margin}: expected 0 <= margin < --image-size {size}")
    if workers < 1:
        raise DetectFacesError(f"--workers {workers}: expected at least 1")
    if not 1 <= quality <= 100:
        raise DetectFacesError(f"--quality {quality}: expected a JPEG quality in 1..100")
    if not min_face_size >= 1:
        raise DetectFacesError(f"--min-face-size {min_face_size}: expected at least 1 pixel")
    return {"raw_dir": raw, "out_dir": os.path.abspath(out_dir), "mode": mode, "image_size": size, "margin": margin,
            "min_face_size": min_face_size, "quality": quality}


def pack_faces(summary: dict, image_size: int, quality: int = 95, workers: int = 1) -> tuple[int, int]:
    """OUT_DIR/train.rec + .idx + property from the faces found (the ``train`` split when split)."""
    from tools.pack_rec import pack

    out_dir = summary["out_dir"]
    faces = [row[0] for row in summary["rows"] if row[1] == "ok"]
    if any(path.split(os.sep)[0] in SPLITS and path.count(os.sep) == 2 for path in faces):
        faces = [path for path in faces if path.split(os.sep)[0] == "train"]
    identities = sorted({identity_of(path) for path in faces})
    if not identities:
        raise DetectFacesError(f"{out_dir}: no face to pack")
    label_of = {identity: label for label, identity in enumerate(identities)}
    paths = [os.path.join(out_dir, output_relative(path)) for path in faces]
    labels = [label_of[identity_of(path)] for path in faces]
    num_images, num_classes, _ = pack(paths, labels, out_dir, image_size=(image_size, image_size), quality=quality,
                                      workers=workers)
    return num_images, num_classes


def main(argv: list[str] | None = None) -> int:
    """Command line; returns the exit status (2 with a one-line error on bad folders or options)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw_dir", help="photos: RAW_DIR/<identity>/<photo> (or RAW_DIR/<split>/<identity>/...)")
    parser.add_argument("out_dir", help="output folder (same layout, one face per photo)")
    parser.add_argument("--mode", choices=sorted(DEFAULT_SIZE), required=True,
                        help="facenet: box crop + margin (facenet-pytorch); arcface: 5-point alignment")
    parser.add_argument("--image-size", type=int, default=None, help="output side (default 160 facenet, 112 arcface)")
    parser.add_argument("--margin", type=int, default=0, help="facenet: margin in pixels of the output crop")
    parser.add_argument("--workers", type=int, default=1, help="detection processes (one thread each)")
    parser.add_argument("--min-face-size", type=float, default=20, help="smallest face MTCNN looks for, pixels")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of the written faces")
    parser.add_argument("--pack", action="store_true", help="also write OUT_DIR/train.rec, train.idx, property")
    parser.add_argument("--flat", action="store_true",
                        help="photos directly in RAW_DIR are one identity each, also beside identity folders")
    parser.add_argument("--batch", type=int, default=8, help="photos detected together per worker (detect_batch)")
    parser.add_argument("--onnx", default=None, metavar="DIR",
                        help="run MTCNN's networks under onnxruntime from DIR (written by tools/mtcnn2onnx.py)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from tools.pack_rec import PackError
    from utils.faces.mtcnn import MTCNNError
    from utils.config.paths import OutputPathError

    try:
        summary = detect_folder(args.raw_dir, args.out_dir, args.mode, args.image_size, args.margin, args.workers,
                                args.min_face_size, args.quality, progress=True, flat=args.flat, batch=args.batch,
                                onnx_dir=args.onnx)
        failed = os.path.join(summary["out_dir"], FAILED)
        print(f"detect_faces: {summary['photos']} photos ({summary['resumed']} finished before): "
              f"{summary['faces']} faces written (photos with several faces: {summary['several_faces']}, the largest "
              f"kept), {summary['no_face']} without a face, {summary['unreadable']} unreadable (listed in {failed})")
        if args.pack:
            size = args.image_size or DEFAULT_SIZE[args.mode]
            num_images, num_classes = pack_faces(summary, size, args.quality, args.workers)
            print(f"detect_faces: packed {num_images} faces of {num_classes} identities into "
                  f"{os.path.join(summary['out_dir'], 'train.rec')}")
    except (DetectFacesError, MTCNNError, OutputPathError, PackError) as exc:
        print(f"detect_faces: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"\ndetect_faces: {exc}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
