"""Describe a RecordIO training set, optionally decoding every record.

    python tools/rec_info.py DIR            # num_images=<N> num_classes=<K> layout=<header|plain> + histogram
    python tools/rec_info.py DIR --verify   # also decode every image; exit 1 listing bad keys
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from utils import recordio  # noqa: E402  (dataset.py imports torch, so it loads lazily)

HISTOGRAM_EDGES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def identity_sizes(dataset: "RecordDataset") -> np.ndarray:
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


def verify(dataset: "RecordDataset") -> list[tuple[int, str]]:
    """(key, reason) of every record that cannot be read, decoded or has a bad label."""
    bad = []
    for index in range(len(dataset)):
        try:
            dataset.load(index)
        except recordio.BadRecordError as exc:
            bad.append((int(dataset.image_keys[index]), str(exc)))
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="folder with train.rec and train.idx")
    parser.add_argument("--verify", action="store_true", help="decode every image; exit 1 listing bad keys")
    args = parser.parse_args(argv)
    from dataset import DatasetError, RecordDataset

    try:
        dataset = RecordDataset(args.folder, flip=False, skip_bad_records=False)
        print(f"num_images={dataset.num_image} num_classes={dataset.num_classes} layout={dataset.layout}")
        for line in histogram_lines(identity_sizes(dataset)):
            print(line)
        if args.verify:
            bad = verify(dataset)
            if bad:
                print(f"verify: {len(bad)} bad records, keys: {' '.join(str(key) for key, _ in bad)}")
                for _, reason in bad:
                    print(f"  {reason}")
                return 1
            print(f"verify: all {len(dataset)} images decode")
    except (DatasetError, recordio.RecordIOError) as exc:
        print(f"rec_info: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
