"""Backbone forward and forward+backward images/s, achieved GFLOP/s vs the machine's GEMM rate.

    python tools/benchmark.py backbone --network r50 --batch 32

Runs each mode (fp32; fp32 + channels_last; bf16 autocast where the device supports bf16) on a
random batch. "GFLOP/s" counts 2 FLOPs per multiply-accumulate of tools/flops.py; a training
step is counted as 3x the forward. "of GEMM" divides by the fp32 (or bf16) matrix-multiply rate
measured in the same run, i.e. how much of what this device can do the backbone actually gets.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from backbones import MODEL_NAMES, get_model
from tools.flops import build_on_meta, count_macs
from utils.devices import device as devices


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``backbone`` subcommand's options."""
    parser.add_argument("--network", default="r50", choices=MODEL_NAMES)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | npu")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per measurement "
                        "(default: 2 on cpu, 20 on accelerators)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 1 cpu, 5 else)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (cpu)")
    parser.add_argument("--modes", default=None,
                        help="comma list of fp32, fp32-cl, bf16, bf16-cl, fp16, fp16-cl "
                             "(default: fp32,fp32-cl plus bf16,bf16-cl where bf16 is supported)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="measure with checkpointing on")
    parser.add_argument("--forward-only", action="store_true")


def _time(step: Callable[[], None], ctx: devices.DeviceContext, warmup: int, iters: int) -> float:
    """Seconds per call (median of ``iters`` timed calls after ``warmup`` untimed ones)."""
    for _ in range(warmup):
        step()
    devices.synchronize(ctx)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        devices.synchronize(ctx)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def gemm_gflops(ctx: devices.DeviceContext, dtype: torch.dtype, warmup: int) -> float:
    """Square matmul rate (2 n^3 FLOPs per product), the device's practical dense ceiling."""
    device = ctx.device
    size = 2048 if device.type == "cpu" else 8192
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = _time(lambda: torch.mm(a, b), ctx, max(warmup, 1), 5 if device.type == "cpu" else 20)
    return 2 * size ** 3 / seconds / 1e9


def run(args: argparse.Namespace) -> None:
    """Print the table of forward and training rates per mode."""
    ctx = devices.setup(args.device)  # a DeviceError becomes one line in tools/benchmark.py
    device = ctx.device
    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = device.type != "cpu"
    iters = args.iters or (20 if accelerator else 2)
    warmup = args.warmup if args.warmup is not None else (5 if accelerator else 1)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    bf16 = devices.bf16_supported(ctx)
    is_vit = args.network.startswith("vit")
    if args.modes:
        modes = args.modes.split(",")
    else:
        modes = ["fp32"] + ([] if is_vit else ["fp32-cl"])
        if bf16:
            modes += ["bf16"] + ([] if is_vit else ["bf16-cl"])

    macs = count_macs(build_on_meta(args.network))
    gemm = {"fp32": gemm_gflops(ctx, torch.float32, warmup)}
    if bf16 or any(mode.startswith("bf16") for mode in modes):
        gemm["bf16"] = gemm_gflops(ctx, torch.bfloat16, warmup)
    if any(mode.startswith("fp16") for mode in modes):
        gemm["fp16"] = gemm_gflops(ctx, torch.float16, warmup)

    print(f"network={args.network} batch={args.batch} device={device} threads={torch.get_num_threads()} "
          f"iters={iters} warmup={warmup} gradient_checkpointing={args.gradient_checkpointing}")
    print(f"model: {macs / 1e9:.3f} GMACs/image = {2 * macs / 1e9:.2f} GFLOP forward; "
          + ", ".join(f"{name} GEMM {rate:.0f} GFLOP/s" for name, rate in gemm.items()))
    print(f"{'mode':<9}{'fwd img/s':>11}{'GFLOP/s':>9}{'of GEMM':>9}{'train img/s':>13}{'GFLOP/s':>9}{'of GEMM':>9}"
          + ("  peak MiB" if accelerator else ""))

    torch.manual_seed(0)
    model = get_model(args.network, gradient_checkpointing=args.gradient_checkpointing).to(device)
    images = torch.rand(args.batch, 3, 112, 112, device=device) * 2 - 1
    for mode in modes:
        precision, channels_last = mode.split("-")[0], mode.endswith("-cl")
        if precision not in gemm:
            raise SystemExit(f"unknown mode {mode!r}; use fp32, fp32-cl, bf16, bf16-cl, fp16, fp16-cl")
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=memory_format)
        batch = images.contiguous(memory_format=memory_format)
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                    if precision != "fp32" else torch.autocast(device.type, enabled=False))

        def forward() -> None:
            with torch.no_grad(), autocast:
                model(batch)

        def train_step() -> None:
            model.zero_grad(set_to_none=True)
            with autocast:
                out = model(batch)
            out.float().square().mean().backward()

        model.eval()
        forward_rate = args.batch / _time(forward, ctx, warmup, iters)
        row = f"{mode:<9}{forward_rate:>11.1f}{forward_rate * 2 * macs / 1e9:>9.0f}" \
              f"{forward_rate * 2 * macs / 1e9 / gemm[precision]:>9.0%}"
        if not args.forward_only:
            model.train()
            devices.reset_peak_memory(ctx)
            train_rate = args.batch / _time(train_step, ctx, warmup, iters)
            train_gflops = train_rate * 6 * macs / 1e9
            row += f"{train_rate:>13.1f}{train_gflops:>9.0f}{train_gflops / gemm[precision]:>9.0%}"
            if accelerator:
                row += f"{devices.memory_gib(ctx) * 1024:>10.0f}"
        print(row, flush=True)
