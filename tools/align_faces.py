"""Align a folder of face photos onto the ArcFace 112x112 template using 5-point landmarks.

    python tools/align_faces.py --input-dir raw/ --landmarks landmarks.txt --output-dir aligned/

``landmarks.txt`` has one line per image: ``relative/path.jpg x1 y1 x2 y2 x3 y3 x4 y4 x5 y5``
(left eye, right eye, nose, left mouth corner, right mouth corner, in pixels). The output keeps
the relative paths (``<identity>/<image>`` folders stay folders), ready for ``tools/pack_rec.py``.
Blank lines and lines starting with ``#`` are ignored.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.faces.align import AlignmentError, as_landmarks, norm_crop  # noqa: E402
from utils.data.text_fields import read_fields  # noqa: E402


def read_landmarks_file(path: str) -> list[tuple[int, str, object]]:
    """(line number, relative image path, [5, 2] landmarks) per non-comment line."""
    entries = []
    for line_number, fields in read_fields(path, "landmarks", AlignmentError, comment="#"):
        if len(fields) != 11:
            raise AlignmentError(f"{path} line {line_number}: expected an image path and 10 numbers "
                                 f"(5 x,y landmarks), got {len(fields) - 1} values")
        try:
            numbers = [float(value) for value in fields[1:]]
        except ValueError:
            raise AlignmentError(f"{path} line {line_number}: landmark values must be numbers: "
                                 f"{' '.join(fields[1:])}") from None
        entries.append((line_number, fields[0], as_landmarks(numbers, f"{path} line {line_number}")))
    if not entries:
        raise AlignmentError(f"{path}: no landmark lines")
    return entries


def align_folder(input_dir: str, landmarks_path: str, output_dir: str, image_size: int = 112,
                 quality: int = 95) -> int:
    """Write aligned crops; returns the number of images written. Stops at the first bad line."""
    import cv2

    entries = read_landmarks_file(landmarks_path)
    written = 0
    for line_number, relative, points in entries:
        source = os.path.join(input_dir, relative)
        if not os.path.isfile(source):
            raise AlignmentError(f"{landmarks_path} line {line_number}: image not found: {source}")
        image = cv2.imread(source, cv2.IMREAD_COLOR)
        if image is None:
            raise AlignmentError(f"{landmarks_path} line {line_number}: not a readable image: {source}")
        aligned = norm_crop(image, points, image_size)
        target = os.path.join(output_dir, os.path.splitext(relative)[0] + ".jpg")
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        if not cv2.imwrite(target, aligned, [cv2.IMWRITE_JPEG_QUALITY, quality]):
            raise AlignmentError(f"{target}: cannot write the aligned image")
        written += 1
    return written


def main(argv: list[str] | None = None) -> int:
    """Align the faces listed with 5 landmarks; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-dir", required=True, help="folder the landmark paths are relative to")
    parser.add_argument("--landmarks", required=True, help="text file: path x1 y1 ... x5 y5 per line")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of the aligned crops")
    args = parser.parse_args(argv)
    try:
        count = align_folder(args.input_dir, args.landmarks, args.output_dir, args.image_size, args.quality)
    except AlignmentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"aligned {count} images into {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
