"""Rewrite a RecordIO set shuffled into the plain layout (what DALI's sequential reader needs).

    python tools/shuffle_rec.py IN_DIR OUT_DIR [--seed 0] [--force]
    python tools/shuffle_rec.py SHARDS_DIR OUT_DIR          # every shard train_<i> shuffled within itself
    python tools/shuffle_rec.py DIR1 DIR2 'wf/train_*.rec' OUT_DIR   # the whole list: one pack of the union

Reads either layout (InsightFace header layout or plain), writes keys 0..N-1 in a seeded random
order, each record an image with its scalar class label; image bytes are copied unchanged. A folder
of shards gives OUT_DIR/train_<i>.rec/.idx/.property, each shard shuffled with seed + i and keeping
its own labels (so the folder still reads as the same list); several sources (or a glob) give one
train.rec of their union, labelled as training over that list labels it (offsets, no identity map).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from utils.data import recordio  # noqa: E402  (utils/data/datasets.py imports torch, so it loads lazily)


class ShuffleError(ValueError):
    """Bad input for shuffle_rec; the message is one line."""


def _write_shuffled(read: Any, count: int, num_classes: int, image_size: Any, out_dir: str, name: str,
                    seed: int, progress: bool) -> None:
    """Keys 0..count-1 of ``out_dir/name.rec`` in a seeded order: record i is ``read(order[i])`` = (image
    bytes, label)."""
    from utils.data.datasets import write_property

    order = np.random.default_rng(seed).permutation(count)
    writer = recordio.MXIndexedRecordIO(os.path.join(out_dir, f"{name}.idx"), os.path.join(out_dir, f"{name}.rec"),
                                        "w")
    start = time.time()
    for new_key, index in enumerate(order):
        img, label = read(int(index))
        writer.write_idx(new_key, recordio.pack(recordio.IRHeader(0, float(label), new_key, 0), img))
        if progress and (new_key % 10000 == 9999 or new_key == len(order) - 1):
            sys.stderr.write(f"\rshuffled {new_key + 1}/{len(order)} ({(new_key + 1) / (time.time() - start):.0f} rec/s)")
    if progress:
        sys.stderr.write("\n")
    writer.close()
    write_property(os.path.join(out_dir, "property" if name == "train" else f"{name}.property"), num_classes,
                   image_size)


def _checked(source: Any, index: int) -> tuple[bytes, int]:
    header, img, key = source.read_record(index)
    label = recordio.class_of(header)
    if not 0 <= label < source.num_classes:
        raise ShuffleError(f"{source.rec_path}: key {key}: label {label} out of range, expected "
                           f"0 <= label < num_classes={source.num_classes}")
    return img, label


def shuffle_rec(in_dir: Any, out_dir: str, seed: int = 0, force: bool = False, progress: bool = False) -> tuple[int, int]:
    """Write the shuffled plain-layout copy of a pack, of every shard of a sharded folder, or (``in_dir`` a
    list) of the union of several sources; returns (num_images, num_classes)."""
    from utils.data.datasets import RecordDataset
    from utils.data.sources import build_sources, expand_source

    inputs = list(in_dir) if isinstance(in_dir, (list, tuple)) else [in_dir]
    if any(os.path.abspath(entry) == os.path.abspath(out_dir) for entry in inputs):
        raise ShuffleError(f"{out_dir}: output folder must differ from the input folder")
    existing = [n for n in ("train.rec", "train.idx") if os.path.exists(os.path.join(out_dir, n))]
    existing += sorted(n for n in (os.listdir(out_dir) if os.path.isdir(out_dir) else [])
                       if n.startswith("train_") and n.endswith(".rec"))
    if existing and not force:
        raise ShuffleError(f"{out_dir}: already holds {', '.join(existing)}; pass --force to overwrite")
    kind, parts = expand_source(inputs[0]) if len(inputs) == 1 else ("list", [])
    if kind == "recordio":
        source = RecordDataset(inputs[0], flip=False, skip_bad_records=False)
        os.makedirs(out_dir, exist_ok=True)
        _write_shuffled(lambda i: _checked(source, i), len(source), source.num_classes, source.image_size, out_dir,
                        "train", seed, progress)
        return len(source), source.num_classes
    if kind == "shards" and all(name for _, name in parts):
        os.makedirs(out_dir, exist_ok=True)
        images = classes = 0
        for number, (folder, name) in enumerate(parts):
            shard = RecordDataset(folder, flip=False, skip_bad_records=False, name=name)
            _write_shuffled(lambda i, shard=shard: _checked(shard, i), len(shard), shard.num_classes, shard.image_size,
                            out_dir, f"train_{number}", seed + number, progress)
            images, classes = images + len(shard), classes + shard.num_classes
        return images, classes
    union = build_sources(inputs, (112, 112), False)
    if not all(isinstance(part, RecordDataset) for part in union.parts):
        raise ShuffleError("the inputs hold an image folder: pack it first (tools/pack_rec.py)")
    os.makedirs(out_dir, exist_ok=True)

    def read(index: int) -> tuple[bytes, int]:
        part, local = union.locate(index)
        img, label = _checked(union.parts[part], local)
        return img, int(union.lookups[part][label])
    _write_shuffled(read, len(union), union.num_classes, union.parts[0].image_size, out_dir, "train", seed, progress)
    return len(union), union.num_classes


def main(argv: list[str] | None = None) -> int:
    """Shuffle a RecordIO set into the plain layout; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("in_dir", nargs="+", help="folder with train.rec/train.idx (either layout), a folder of "
                                                  "shards, or several sources (their union)")
    parser.add_argument("out_dir", help="output folder for the shuffled plain-layout set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="overwrite an existing set in out_dir")
    args = parser.parse_args(argv)
    from utils.data.errors import DatasetError

    try:
        inputs = args.in_dir if len(args.in_dir) > 1 else args.in_dir[0]
        num_images, num_classes = shuffle_rec(inputs, args.out_dir, args.seed, args.force, progress=True)
    except (ShuffleError, DatasetError, recordio.RecordIOError) as exc:
        print(f"shuffle_rec: error: {exc}", file=sys.stderr)
        return 2
    print(f"num_images={num_images} num_classes={num_classes} layout=plain out={args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
