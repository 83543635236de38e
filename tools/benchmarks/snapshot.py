"""The divergence rollback's in-memory snapshot: time and host memory per copy against a training step.

    python tools/benchmark.py snapshot --network r50 --batch 8 --classes 10000
    python tools/benchmark.py snapshot --network tiny --batch 64 --classes 200 --embedding 128   # the demo

Builds the backbone, a Partial FC head and the SGD optimizer as the trainer does, times a training step
(forward, backward, JointOptimizer step; median of --iters) and ``DivergenceGuard.take_snapshot`` (the copy of
backbone, head rows, optimizer state and scaler into host memory), then prints the snapshot's bytes and its
cost per step at a few ``snapshot_every_steps`` intervals (the copy happens once per interval).
"""
from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace
from typing import Callable

import torch

from backbones import MODEL_NAMES, get_model
from losses import CombinedMarginLoss
from partial_fc import PartialFC
from pfc.optim import build_joint_optimizer
from utils.devices import device as devices
from utils.devices import compat
from utils.run.divergence import DivergenceGuard
from utils.run.saving import tensor_bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``snapshot`` subcommand's options."""
    parser.add_argument("--network", default="r50", choices=MODEL_NAMES)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--classes", type=int, default=10000, help="Partial FC classes (rows copied with the head)")
    parser.add_argument("--embedding", type=int, default=512)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | npu")
    parser.add_argument("--iters", type=int, default=3, help="timed steps and snapshots (medians)")
    parser.add_argument("--intervals", default="10,25,100", help="snapshot_every_steps values to report")


def _median_seconds(work: Callable[[], None], ctx: devices.DeviceContext, iters: int) -> float:
    """Median seconds of ``iters`` calls of ``work`` after one untimed call, each ended by a device sync."""
    times = []
    for index in range(iters + 1):
        start = time.perf_counter()
        work()
        devices.synchronize(ctx)
        if index:  # the first call warms up (allocations, kernel choice)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args: argparse.Namespace) -> None:
    """Print the step time, the snapshot time and size, and the snapshot's share of a step per interval."""
    ctx = devices.setup(args.device)
    torch.manual_seed(0)
    backbone = get_model(args.network, num_features=args.embedding).to(ctx.device)
    head = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), args.embedding, args.classes).to(ctx.device)
    scaler = compat.grad_scaler(ctx.device.type, enabled=False)
    optimizer = build_joint_optimizer("sgd", backbone.parameters(), head, lr=0.1, momentum=0.9, weight_decay=5e-4,
                                      clip_grad_norm=5.0, scaler=scaler)
    images = torch.randn(args.batch, 3, 112, 112, device=ctx.device)
    labels = torch.randint(0, args.classes, (args.batch,), device=ctx.device)

    def step() -> None:
        loss = head(backbone(images).float(), labels)
        loss.backward()
        optimizer.step(loss=loss)
        optimizer.zero_grad()

    step_s = _median_seconds(step, ctx, args.iters)
    cfg = SimpleNamespace(on_divergence="rollback", max_nonfinite_steps=20)
    guard = DivergenceGuard(cfg, (backbone, head, optimizer, scaler, None))
    snapshot_s = _median_seconds(lambda: guard.take_snapshot(0, 0), ctx, args.iters)
    size = tensor_bytes(guard.snapshot)
    print(f"snapshot: {args.network} batch {args.batch}, {args.classes} classes x {args.embedding}, {ctx.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"  training step          {step_s * 1000:10.1f} ms")
    print(f"  snapshot (host copy)   {snapshot_s * 1000:10.1f} ms   {size / 2**20:.1f} MiB of host memory")
    for interval in (int(value) for value in args.intervals.split(",")):
        print(f"  every {interval:4d} steps       {100 * snapshot_s / (interval * step_s):9.3f} % of step time")
