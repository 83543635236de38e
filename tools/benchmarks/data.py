"""Data pipeline images/s: raw RecordIO reads, decode, per-worker pipeline, DataLoader scaling.

    python tools/benchmark.py data                      # on a generated 112x112 JPEG set
    python tools/benchmark.py data --rec /data/ms1m-retinaface-t1 --workers 1 2 4 8
    python tools/benchmark.py data --shards 8      # + the same records as 8 shards read as a list, vs one pack

Stages, each on the same records: raw ``read_idx``; a bare ``cv2.imdecode`` loop over bytes already
in memory (the reference); read + unpack + decode + flip as one worker does (``dataset[i]``);
the full DataLoader (uint8 batches, drop_last) with each worker count: its first batch is untimed
warm-up, so the set needs at least two batches of images. With ``--shards N`` the row of the shards also says
what each reading process (a worker, or the benchmark itself with 0 workers) holds open after its pass: one
descriptor per shard it read at most, and no index file (indexes are read into memory once).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``data`` subcommand's options."""
    parser.add_argument("--rec", default=None, help="folder with train.rec/train.idx (default: generate one)")
    parser.add_argument("--num-images", type=int, default=3000, help="records to time (and to generate)")
    parser.add_argument("--batch-size", type=int, default=128, help="DataLoader batch (needs 2 batches of images)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader worker counts")
    parser.add_argument("--repeat", type=int, default=3, help="best of N passes for the single-process stages")
    parser.add_argument("--shards", type=int, default=0, help="also time the same records split into N shards "
                                                              "read as a list (rec = a folder of shards)")


def _best_rate(function, count: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return count / best


def check_arguments(args: argparse.Namespace) -> None:
    """One-line SystemExit for values the benchmark cannot run with (before any set is generated)."""
    for flag, value in (("--num-images", args.num_images), ("--batch-size", args.batch_size),
                        ("--repeat", args.repeat)):
        if value < 1:
            raise SystemExit(f"{flag} {value}: expected a positive integer")
    if min(args.workers) < 0:
        raise SystemExit(f"--workers {' '.join(map(str, args.workers))}: expected worker counts of 0 or more")
    if args.rec is None and args.num_images < 2 * args.batch_size:
        raise SystemExit(f"--num-images {args.num_images} is too few for --batch-size {args.batch_size}: the "
                         f"DataLoader stage needs at least 2 batches ({2 * args.batch_size} images), one untimed and "
                         f"one timed")
    if args.rec is not None and not os.path.isdir(args.rec):
        raise SystemExit(f"--rec {args.rec}: no such folder (expected a folder with train.rec and train.idx)")


def write_shards(data, count: int, out_dir: str, shards: int) -> None:
    """The first ``count`` records of ``data`` as ``shards`` plain packs ``out_dir/train_<i>`` with whole identities
    (``tools/pack_rec.py``'s plan, labels made local to each shard): read as a list they are the same images and
    classes. Image bytes are copied unchanged. A set with fewer identities than shards is cut into equal runs."""
    import numpy as np

    from tools.pack_rec import shard_plan
    from utils.data import recordio
    from utils.data.datasets import write_property

    os.makedirs(out_dir, exist_ok=True)
    records = [data.read_record(i)[:2] for i in range(count)]
    labels = np.array([recordio.class_of(header) for header, _ in records], dtype=np.int64)
    split = shards > len(np.unique(labels))  # a tiny generated set: fewer identities than shards
    for number, indices in enumerate(shard_plan(labels.tolist(), shards, split_identities=split)):
        indices = np.sort(indices)
        classes, local = np.unique(labels[indices], return_inverse=True)
        name = os.path.join(out_dir, f"train_{number}")
        writer = recordio.MXIndexedRecordIO(f"{name}.idx", f"{name}.rec", "w")
        for key, (index, label) in enumerate(zip(indices.tolist(), local.tolist())):
            writer.write_idx(key, recordio.pack(recordio.IRHeader(0, float(label), key, 0), records[index][1]))
        writer.close()
        write_property(f"{name}.property", len(classes), data.image_size)


def _child_pids() -> list[int]:
    """This process's children (DataLoader workers), from /proc (Linux)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid():
                children.append(int(entry))
    return children


def open_pack_files(root: str, workers: int) -> tuple[int, int] | None:
    """(most .rec descriptors one reading process holds, .idx descriptors in all of them) under ``root``: the
    DataLoader's worker processes, or this process with 0 workers; None without /proc (not Linux)."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    folder = os.path.realpath(root) + os.sep
    most, indexes = 0, 0
    for pid in (_child_pids() if workers else [os.getpid()]):
        targets = []
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
        mine = [target for target in targets if target.startswith(folder)]
        most = max(most, sum(target.endswith(".rec") for target in mine))
        indexes += sum(target.endswith(".idx") for target in mine)
    return most, indexes


def _loader_rate(root: str, workers: int, batch_size: int) -> tuple[float, tuple[int, int] | None]:
    """Images/s of the training DataLoader over ``root`` (a pack or a folder of shards), the first batch untimed,
    and what :func:`open_pack_files` finds open after the pass (the workers persist until the loader goes)."""
    from easydict import EasyDict

    from dataset import get_dataloader

    cfg = EasyDict(rec=root, num_classes=None, num_image=None, image_size=(112, 112), num_workers=workers,
                   seed=0, batch_size=batch_size, skip_bad_records=True, dali=False)
    loader = get_dataloader(cfg, 0, 1)
    loader.sampler.set_epoch(0)
    batches = iter(loader)
    next(batches)  # start the workers and fill the prefetch queue outside the timing
    time.sleep(0.5)
    start = time.perf_counter()
    seen = 0
    for images, _ in batches:
        seen += images.shape[0]
    rate = seen / (time.perf_counter() - start)
    files = open_pack_files(root, workers)
    del batches, loader
    return rate, files


def run(args: argparse.Namespace) -> None:
    """Time raw reads, decoding, the per-worker pipeline and DataLoader scaling."""
    check_arguments(args)
    import cv2
    import numpy as np
    import torch
    from easydict import EasyDict

    from dataset import get_dataloader
    from utils.data.datasets import RecordDataset
    from utils.data import recordio
    from utils.data.errors import DatasetError
    from utils.data.synthetic import make_identity_set

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.rec
        if root is None:
            root = os.path.join(scratch, "set")
            identities = max(2, args.num_images // 50)
            make_identity_set(root, identities, -(-args.num_images // identities), 0, 0, seed=0)
        try:
            data = RecordDataset(root, flip=True)
        except (recordio.RecordIOError, DatasetError) as exc:
            raise SystemExit(f"--rec {root}: {exc}") from None
        if len(data) < 2 * args.batch_size:
            raise SystemExit(f"--rec {root} has {len(data)} images, too few for --batch-size {args.batch_size}: the "
                             f"DataLoader stage needs at least 2 batches ({2 * args.batch_size} images)")
        count = min(args.num_images, len(data))
        keys = data.image_keys[:count].tolist()
        reader = data.reader
        print(f"data: {root} layout={data.layout} images={len(data)} timing {count} records, "
              f"cv2 {cv2.__version__}, torch {torch.__version__}")

        raw = _best_rate(lambda: [reader.read_idx(k) for k in keys], count, args.repeat)
        jpegs = [recordio.unpack(reader.read_idx(k))[1] for k in keys]
        bare = _best_rate(lambda: [cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR) for j in jpegs],
                          count, args.repeat)
        pipeline = _best_rate(lambda: [data[i] for i in range(count)], count, args.repeat)
        print(f"raw record reads (read_idx)          {raw:10.0f} images/s")
        print(f"bare cv2.imdecode loop (reference)   {bare:10.0f} images/s")
        print(f"read+decode+flip per worker          {pipeline:10.0f} images/s  "
              f"({bare / pipeline:.2f}x the bare decode time)")

        single, one_pack = None, {}
        for workers in args.workers:
            rate = one_pack[workers] = _loader_rate(root, workers, args.batch_size)[0]
            single = single if single is not None else rate
            print(f"DataLoader batch {args.batch_size}, {workers} worker(s)   {rate:10.0f} images/s  "
                  f"(x{rate / single:.2f} of the first worker count)")
        if args.shards:
            sharded = os.path.join(scratch, "shards")
            write_shards(data, len(data), sharded, args.shards)
            for workers in args.workers:  # alternating passes, best of each: a busy machine's noise is one-sided
                pack_rate, rate, files = one_pack[workers], 0.0, None
                for _ in range(args.repeat):
                    shard_rate, files = _loader_rate(sharded, workers, args.batch_size)
                    rate = max(rate, shard_rate)
                    pack_rate = max(pack_rate, _loader_rate(root, workers, args.batch_size)[0])
                opened = "not measured (no /proc)" if files is None else \
                    f"at most {files[0]} .rec of {args.shards}, {files[1]} .idx"
                print(f"DataLoader batch {args.batch_size}, {workers} worker(s), {args.shards} shards  {rate:10.0f} "
                      f"images/s  (x{rate / pack_rate:.2f} of one pack, best of {args.repeat} alternating passes; "
                      f"open per reading process: {opened})")
