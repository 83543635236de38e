"""Build a verification .bin (the lfw.bin format) from your own pairs, to evaluate on your own data.

    python tools/make_bin.py pairs.txt IMAGE_ROOT mine.bin      # LFW pairs.txt
    python tools/make_bin.py pairs.csv IMAGE_ROOT mine.bin      # path1,path2,same
    python tools/make_bin.py pairs.txt IMAGE_ROOT mine.bin --landmarks landmarks.txt   # align first
    python -m eval.verification --model model.pt --data-dir . --targets mine

pairs.txt is LFW's format: an optional header line of integers ("10 300": folds, pairs per fold), then
``name n1 n2`` (a same pair: IMAGE_ROOT/name/name_<n1 as 4 digits>.jpg and ..._<n2>.jpg) or
``name1 n1 name2 n2`` (a different pair). A .csv has ``path1,path2,same`` rows (same: 1/0, true/false,
yes/no; paths relative to IMAGE_ROOT; a first row that is not a pair is a header).

Images are stored as JPEG bytes at --image-size (files already at that size are stored unchanged).
Without --landmarks they are resized on the short side and centre-cropped, so pass crops that are
already aligned; with --landmarks (``relative/path x1 y1 ... x5 y5`` per image, the format of
tools/align_faces.py) each image is aligned onto the ArcFace template first. The output is
``pickle.dump((bins, issame_list))``, written atomically; eval.verification reads it.
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import pickle
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".bmp")
SAME_WORDS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
SHOWN = 3  # problems listed in an error message; the rest are counted


class MakeBinError(ValueError):
    """Bad pairs, images or options for make_bin; the message is one line."""


def lfw_image_path(root: str, name: str, number: str, where: str) -> str:
    """IMAGE_ROOT/name/name_0001.jpg for LFW's ``name 1`` (the first extension that exists)."""
    try:
        index = int(number)
    except ValueError:
        raise MakeBinError(f"{where}: image number {number!r} is not an integer") from None
    stem = os.path.join(root, name, f"{name}_{index:04d}")
    for extension in IMAGE_EXTENSIONS:
        if os.path.isfile(stem + extension):
            return stem + extension
    return stem + IMAGE_EXTENSIONS[0]  # reported as missing later, with every other missing file


def read_lfw_pairs(path: str, root: str) -> list[tuple[str, str, bool]]:
    """(path1, path2, same) per line of an LFW-style pairs.txt."""
    pairs = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            fields = line.split()
            where = f"{path} line {number}"
            if not fields or fields[0].startswith("#"):
                continue
            if number == 1 and all(field.isdigit() for field in fields):
                continue  # "10 300": folds and pairs per fold
            if len(fields) == 3:
                name, first, second = fields
                pairs.append((lfw_image_path(root, name, first, where), lfw_image_path(root, name, second, where),
                              True))
            elif len(fields) == 4:
                pairs.append((lfw_image_path(root, fields[0], fields[1], where),
                              lfw_image_path(root, fields[2], fields[3], where), False))
            else:
                raise MakeBinError(f"{where}: expected 'name n1 n2' (same) or 'name1 n1 name2 n2' (different), "
                                   f"got {len(fields)} fields: {line.strip()[:80]!r}")
    return pairs


def read_csv_pairs(path: str, root: str) -> list[tuple[str, str, bool]]:
    """(path1, path2, same) per ``path1,path2,same`` row of a CSV file."""
    pairs = []
    with open(path, encoding="utf-8", newline="") as handle:
        for number, row in enumerate(csv.reader(handle), 1):
            row = [field.strip() for field in row]
            if not any(row) or row[0].startswith("#"):
                continue
            where = f"{path} line {number}"
            if len(row) != 3:
                raise MakeBinError(f"{where}: expected 'path1,path2,same', got {len(row)} fields")
            same = SAME_WORDS.get(row[2].lower())
            if same is None:
                if number == 1:
                    continue  # a header row such as "path1,path2,same"
                raise MakeBinError(f"{where}: same={row[2]!r}, expected 1/0, true/false or yes/no")
            pairs.append((os.path.join(root, row[0]), os.path.join(root, row[1]), same))
    return pairs


def read_pairs(path: str, root: str) -> list[tuple[str, str, bool]]:
    """Pairs from a .csv or an LFW pairs.txt; at least one pair."""
    if not os.path.isfile(path):
        raise MakeBinError(f"{path}: pairs file not found")
    if not os.path.isdir(root):
        raise MakeBinError(f"{root}: image root is not a folder")
    pairs = read_csv_pairs(path, root) if path.lower().endswith(".csv") else read_lfw_pairs(path, root)
    if not pairs:
        raise MakeBinError(f"{path}: holds no pairs")
    return pairs


def read_landmarks(path: str, root: str) -> dict[str, np.ndarray]:
    """Absolute image path -> [5, 2] landmarks (tools/align_faces.py's file format)."""
    from tools.align_faces import read_landmarks_file

    return {os.path.normpath(os.path.join(root, relative)): points
            for _, relative, points in read_landmarks_file(path)}


def encode_image(path: str, image_size: int, quality: int, landmarks: np.ndarray | None) -> bytes:
    """JPEG bytes of the image at ``image_size`` x ``image_size`` (aligned when landmarks are given)."""
    import cv2

    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise MakeBinError(f"{path}: not a decodable image")
    if landmarks is not None:
        from utils.faces.align import norm_crop
        image = norm_crop(image, landmarks, image_size)
    elif image.shape[:2] == (image_size, image_size) and data[:2].tobytes() == b"\xff\xd8":
        return data.tobytes()  # already a crop of the right size: keep the file's own bytes
    elif image.shape[:2] != (image_size, image_size):
        scale = image_size / min(image.shape[:2])
        image = cv2.resize(image, (max(image_size, round(image.shape[1] * scale)),
                                   max(image_size, round(image.shape[0] * scale))), interpolation=cv2.INTER_AREA)
        top, left = (image.shape[0] - image_size) // 2, (image.shape[1] - image_size) // 2
        image = image[top:top + image_size, left:left + image_size]
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 BGR image
        raise MakeBinError(f"{path}: OpenCV could not encode the image")
    return buffer.tobytes()


def build_bin(pairs: list[tuple[str, str, bool]], image_size: int = 112, quality: int = 95,
              landmarks: dict[str, np.ndarray] | None = None) -> tuple[list[bytes], list[bool]]:
    """(bins, issame_list) of the pairs; every missing/undecodable image is reported in one error."""
    encoded: dict[str, bytes] = {}
    problems: list[str] = []
    seen: set[str] = set()
    for first, second, _ in pairs:
        for path in (first, second):
            if path in seen:
                continue
            seen.add(path)
            key = os.path.normpath(path)
            if not os.path.isfile(path):
                problems.append(f"{path} (not found)")
            elif landmarks is not None and key not in landmarks:
                problems.append(f"{path} (no landmarks)")
            else:
                try:
                    encoded[path] = encode_image(path, image_size, quality,
                                                 None if landmarks is None else landmarks[key])
                except MakeBinError as exc:
                    problems.append(str(exc))
    if problems:
        more = f", ... {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise MakeBinError(f"{len(problems)} image(s) unusable: {'; '.join(problems[:SHOWN])}{more}")
    bins = [encoded[path] for first, second, _ in pairs for path in (first, second)]
    return bins, [same for _, _, same in pairs]


def write_bin(bins: list[bytes], issame: list[bool], output: str) -> None:
    """pickle.dump((bins, issame_list)) to ``output`` via a temporary file and os.replace."""
    temporary = f"{output}.tmp.{os.getpid()}"
    try:
        with open(temporary, "wb") as handle:
            pickle.dump((bins, issame), handle, protocol=4)
        os.replace(temporary, output)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def main(argv: list[str] | None = None) -> int:
    """Command line: pairs file, image root, output .bin."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pairs", help="LFW pairs.txt or a path1,path2,same .csv")
    parser.add_argument("image_root", help="folder the pairs' image paths are relative to")
    parser.add_argument("output", help="output .bin (the lfw.bin format)")
    parser.add_argument("--landmarks", default=None, help="align with 5-point landmarks: 'path x1 y1 ... x5 y5'")
    parser.add_argument("--image-size", type=int, default=112, help="square crop size (default 112)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from utils.faces.align import AlignmentError
    from utils.config.paths import ensure_output_file

    try:
        if not 16 <= args.image_size <= 1024:
            raise MakeBinError(f"--image-size must be in [16, 1024], got {args.image_size}")
        if not 1 <= args.quality <= 100:
            raise MakeBinError(f"--quality must be in [1, 100], got {args.quality}")
        output = ensure_output_file(args.output, "output .bin")  # before any image work
        pairs = read_pairs(args.pairs, args.image_root)
        landmarks = read_landmarks(args.landmarks, args.image_root) if args.landmarks else None
        bins, issame = build_bin(pairs, args.image_size, args.quality, landmarks)
        write_bin(bins, issame, output)
    except (MakeBinError, AlignmentError, ValueError, OSError) as exc:
        print(f"make_bin: error: {exc}", file=sys.stderr)
        return 2
    same = sum(issame)
    print(f"wrote {output}: {len(issame)} pairs ({same} same, {len(issame) - same} different), "
          f"{len(set(map(bytes, bins)))} distinct images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
