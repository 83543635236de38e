"""Evaluation speed: a verification .bin (decode, embed image + flip, metrics) and IJB pair scoring.

    python tools/benchmark.py eval --network r50 --num-images 12000 --batch-size 256 --embed-images 512

Embedding all 12,000 images x 2 views with r50 on a small CPU takes many minutes, so by default a
subset (``--embed-images``) is embedded and the full-set time is extrapolated linearly; the output
says which figures are measured and which are extrapolated. Use ``--embed-images 0`` to embed all.
"""
from __future__ import annotations

import argparse
import os
import pickle
import tempfile
import time

import numpy as np
import torch

MIN_BIN_IMAGES = 20  # 10-fold verification needs at least 10 pairs of 2 images


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``eval`` subcommand's options."""
    parser.add_argument("--network", default="r50")
    parser.add_argument("--num-images", type=int, default=12000,
                        help=f"images in the generated .bin, an even number >= {MIN_BIN_IMAGES} (lfw: 12000)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--embed-images", type=int, default=512,
                        help="images actually embedded (x2 with flip); 0 = all, else extrapolated")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | npu")
    parser.add_argument("--ijb-pairs", type=int, default=1_000_000,
                        help="pairs to score, at least 2 (the first two: one genuine, one impostor)")
    parser.add_argument("--ijb-templates", type=int, default=23124, help="IJB-C 1:1 has 23,124 templates")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--skip-bin", action="store_true", help="only the IJB scoring part")


def _write_bin(path: str, num_images: int) -> None:
    import cv2

    rng = np.random.default_rng(0)
    unique = []
    for _ in range(64):  # smooth face-sized JPEGs of realistic size (~3-5 KB); repeated to num_images
        image = cv2.GaussianBlur(rng.normal(128, 70, (112, 112, 3)).astype(np.float32), (0, 0), 3)
        unique.append(cv2.imencode(".jpg", np.clip(image * 2 - 128, 0, 255).astype(np.uint8),
                                   [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    bins = [unique[index % len(unique)] for index in range(num_images)]
    issame = [bool(pair % 2 == 0) for pair in range(num_images // 2)]
    with open(path, "wb") as handle:
        pickle.dump((bins, issame), handle, protocol=pickle.HIGHEST_PROTOCOL)


def bench_bin(args: argparse.Namespace) -> None:
    """Time decoding, embedding (image + flip) and the metrics of a generated verification .bin."""
    from backbones import get_model
    from eval.embed import embed_images
    from eval.metrics import verification_metrics
    from eval.verification import load_bin
    from utils.devices import device as devices

    ctx = devices.setup(args.device)  # a DeviceError becomes one line in tools/benchmark.py
    device = ctx.device
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.bin")
        _write_bin(path, args.num_images)
        start = time.perf_counter()
        images, issame = load_bin(path)
        decode_s = time.perf_counter() - start
    model = get_model(args.network, num_features=args.embedding_size).to(device).eval()
    count = args.num_images if args.embed_images <= 0 else min(args.embed_images, args.num_images)
    with torch.no_grad():  # warm-up batch (allocator, kernels) not timed
        embed_images(model, images[: min(8, count)], device, args.batch_size, flip=False)
    devices.synchronize(ctx)
    start = time.perf_counter()
    embed_images(model, images[:count], device, args.batch_size, flip=True)
    devices.synchronize(ctx)
    embed_s = time.perf_counter() - start
    full_embed_s = embed_s * args.num_images / count
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(args.num_images, args.embedding_size))
    start = time.perf_counter()
    verification_metrics(embeddings, embeddings + rng.normal(size=embeddings.shape), issame)
    metrics_s = time.perf_counter() - start
    label = "measured" if count == args.num_images else f"extrapolated from {count} images"
    print(f"verification .bin: {args.num_images} images, {args.network}, batch {args.batch_size}, "
          f"device {device}, torch threads {torch.get_num_threads()}")
    print(f"  decode (load_bin, measured):        {decode_s:8.2f} s  ({args.num_images / decode_s:.0f} img/s)")
    print(f"  embed image+flip ({label}): {full_embed_s:8.2f} s  ({2 * count / embed_s:.1f} forward img/s; "
          f"measured {embed_s:.2f} s for {count} images x 2)")
    print(f"  metrics (Accuracy + Accuracy-Flip + VAL, measured): {metrics_s:8.3f} s")
    print(f"  total:                              {decode_s + full_embed_s + metrics_s:8.2f} s")


def bench_ijb(args: argparse.Namespace) -> None:
    """Time IJB 1:1 pair scoring and the TAR@FAR table on random unit embeddings."""
    import sklearn.metrics  # noqa: F401  (tar_at_far imports it on first call: ~1 s that is not ROC time)

    from eval.ijb_scores import pair_scores, tar_at_far

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(args.ijb_templates, args.embedding_size))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    templates = np.arange(args.ijb_templates) * 3 + 1
    template1 = rng.choice(templates, args.ijb_pairs)
    template2 = rng.choice(templates, args.ijb_pairs)
    labels = (rng.random(args.ijb_pairs) < 0.01).astype(np.int64)
    labels[:2] = (1, 0)  # ROC needs both kinds, which 1% genuine may not give for a few pairs
    start = time.perf_counter()
    scores = pair_scores(feats, templates, template1, template2)
    score_s = time.perf_counter() - start
    start = time.perf_counter()
    tar_at_far(labels, scores)
    roc_s = time.perf_counter() - start
    per_million = 1e6 / args.ijb_pairs
    print(f"IJB scoring: {args.ijb_pairs} pairs over {args.ijb_templates} templates, dim {args.embedding_size}")
    print(f"  cosine scores (chunks of 8192): {score_s:.3f} s  = {score_s * per_million:.3f} s per million pairs")
    print(f"  ROC + TAR@FAR table:            {roc_s:.3f} s  = {roc_s * per_million:.3f} s per million pairs")


def check_arguments(args: argparse.Namespace) -> None:
    """One-line SystemExit for sizes the benchmark cannot run with."""
    if not args.skip_bin:
        if args.num_images < MIN_BIN_IMAGES or args.num_images % 2:
            raise SystemExit(f"--num-images {args.num_images}: expected an even number >= {MIN_BIN_IMAGES} "
                             f"(10-fold verification needs at least 10 pairs of 2 images)")
        if args.batch_size < 1:
            raise SystemExit(f"--batch-size {args.batch_size}: expected a positive integer")
    if args.ijb_pairs < 2:
        raise SystemExit(f"--ijb-pairs {args.ijb_pairs}: expected at least 2 (one genuine and one impostor pair)")
    for flag, value in (("--ijb-templates", args.ijb_templates), ("--embedding-size", args.embedding_size)):
        if value < 1:
            raise SystemExit(f"{flag} {value}: expected a positive integer")


def run(args: argparse.Namespace) -> None:
    """Check the arguments, then run the .bin part (unless ``--skip-bin``) and the IJB part."""
    check_arguments(args)
    if not args.skip_bin:
        bench_bin(args)
    bench_ijb(args)
