"""Rewrite a RecordIO set shuffled into the plain layout (what DALI's sequential reader needs).

    python tools/shuffle_rec.py IN_DIR OUT_DIR [--seed 0] [--force]

Reads either layout (InsightFace header layout or plain), writes keys 0..N-1 in a seeded random
order, each record an image with its scalar class label; image bytes are copied unchanged.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from utils.data import recordio  # noqa: E402  (utils/data/datasets.py imports torch, so it loads lazily)


class ShuffleError(ValueError):
    """Bad input for shuffle_rec; the message is one line."""


def shuffle_rec(in_dir: str, out_dir: str, seed: int = 0, force: bool = False, progress: bool = False) -> tuple[int, int]:
    """Write the shuffled plain-layout copy; returns (num_images, num_classes)."""
    from utils.data.datasets import RecordDataset, write_property

    if os.path.abspath(in_dir) == os.path.abspath(out_dir):
        raise ShuffleError(f"{out_dir}: output folder must differ from the input folder")
    existing = [n for n in ("train.rec", "train.idx") if os.path.exists(os.path.join(out_dir, n))]
    if existing and not force:
        raise ShuffleError(f"{out_dir}: already holds {', '.join(existing)}; pass --force to overwrite")
    source = RecordDataset(in_dir, flip=False, skip_bad_records=False)
    order = np.random.default_rng(seed).permutation(len(source))
    os.makedirs(out_dir, exist_ok=True)
    writer = recordio.MXIndexedRecordIO(os.path.join(out_dir, "train.idx"), os.path.join(out_dir, "train.rec"), "w")
    start = time.time()
    for new_key, index in enumerate(order):
        header, img, key = source.read_record(int(index))
        label = recordio.class_of(header)
        if not 0 <= label < source.num_classes:
            raise ShuffleError(f"{source.rec_path}: key {key}: label {label} out of range, expected "
                               f"0 <= label < num_classes={source.num_classes}")
        writer.write_idx(new_key, recordio.pack(recordio.IRHeader(0, float(label), new_key, 0), img))
        if progress and (new_key % 10000 == 9999 or new_key == len(order) - 1):
            sys.stderr.write(f"\rshuffled {new_key + 1}/{len(order)} ({(new_key + 1) / (time.time() - start):.0f} rec/s)")
    if progress:
        sys.stderr.write("\n")
    writer.close()
    write_property(os.path.join(out_dir, "property"), source.num_classes, source.image_size)
    return len(order), source.num_classes


def main(argv: list[str] | None = None) -> int:
    """Shuffle a RecordIO set into the plain layout; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("in_dir", help="folder with train.rec/train.idx (either layout)")
    parser.add_argument("out_dir", help="output folder for the shuffled plain-layout set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="overwrite an existing set in out_dir")
    args = parser.parse_args(argv)
    from utils.data.errors import DatasetError

    try:
        num_images, num_classes = shuffle_rec(args.in_dir, args.out_dir, args.seed, args.force, progress=True)
    except (ShuffleError, DatasetError, recordio.RecordIOError) as exc:
        print(f"shuffle_rec: error: {exc}", file=sys.stderr)
        return 2
    print(f"num_images={num_images} num_classes={num_classes} layout=plain out={args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
