"""Check an environment in one command: versions, devices, backends, native precisions, then a short real training.

    python tools/benchmark.py doctor                         # r50 + Partial FC at configs/ms1mv3_r50.py's precision
    python tools/benchmark.py doctor --config configs/wf42m_pfc03_vit_b.py   # your own config's network and precision
    python tools/benchmark.py doctor --network tiny --steps 6 --batch-size 8 --num-classes 100   # a quick CPU check

The training is train.py itself, launched as ``tools/benchmark.py train`` launches it: ``--steps`` optimizer
steps on random tensors with the config's network, head (Partial FC unless the config says otherwise) and
fp16/bf16, DDP over every local GPU or NPU (torchrun, one process per device; one process on CPU). It prints
samples/s (after the first quarter of the steps), the peak memory rank 0 logged and whether the loss moved.
Exit 0 when it trained and the loss moved; 1 when the run failed or the loss stayed put or was not finite.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile

import torch

from tools.benchmarks.train import launch_train, status_lines

DEFAULT_CONFIG = "configs/ms1mv3_r50.py"
DEFAULT_CLASSES = 10000  # when the config leaves num_classes to the data
TAIL_LINES = 20          # of a failed run's output, shown before the one-line verdict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``doctor`` subcommand's options (each defaults to the config's value)."""
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="config whose network, head and precision to run "
                                                                "(default: %(default)s)")
    parser.add_argument("--network", default=None, help="backbone instead of the config's, e.g. tiny on CPU")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps to train (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=None, help="per process (default: the config's)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help=f"Partial FC classes (default: the config's, else {DEFAULT_CLASSES})")
    parser.add_argument("--device", default=None, help="auto | cuda | npu | cpu (default: the config's)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per process")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS per process (default: CPU count // processes)")


def print_rows(title: str, rows: list[tuple[str, str]]) -> None:
    """A titled block of ``name  value`` lines."""
    print(title)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def print_environment() -> None:
    """Versions, devices, distributed backends and native precisions (utils/devices/device.py)."""
    from utils.devices import report

    print_rows("doctor: software", report.software_versions())
    print_rows("doctor: devices", report.local_devices())
    print_rows("doctor: distributed backends", report.distributed_backends())
    print_rows("doctor: precisions", report.native_precisions())


def load_doctor_config(args: argparse.Namespace):
    """The config the training runs (one-line SystemExit when it cannot be loaded)."""
    from backbones import MODEL_NAMES
    from utils.config.load import load_config
    from utils.config.rules import ConfigError

    sets = [f"network={args.network}"] if args.network else []
    try:
        return load_config(args.config, sets, known_values={"network": MODEL_NAMES})
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None


def precision_words(cfg, kind: str) -> str:
    """What train.py will compute in on ``kind`` for the config's fp16/bf16 (CPU swaps fp16 for bf16 or fp32)."""
    from utils.devices import device as devices

    quiet = logging.getLogger(devices.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # resolve_precision's fallback warning is said here in words
    try:
        ctx = devices.DeviceContext(kind, torch.device(kind), 0, 0, 1, devices.BACKENDS[kind])
        fp16, bf16 = devices.resolve_precision(ctx, bool(cfg.fp16), bool(cfg.bf16))
    finally:
        quiet.setLevel(level)
    used = "fp16" if fp16 else "bf16" if bf16 else "fp32"
    configured = "fp16" if cfg.fp16 else "bf16" if cfg.bf16 else "fp32"
    return used if used == configured else f"{used} (the config says {configured}; {kind} runs {used} instead)"


def head_words(cfg) -> str:
    """The training objective the config selects, as train.py builds it."""
    if cfg.loss == "triplet":
        return "the triplet loss"
    if cfg.head == "softmax":
        return "a softmax head"
    return f"Partial FC ({cfg.head} margins, sample_rate {cfg.sample_rate:g})"


def check_arguments(args: argparse.Namespace) -> None:
    """One-line SystemExit for values that cannot run."""
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--num-classes", args.num_classes),
                        ("--threads", args.threads)):
        if value is not None and value < 1:
            raise SystemExit(f"{flag} {value}: expected a positive integer")
    if args.workers < 0:
        raise SystemExit(f"--workers {args.workers}: expected 0 or more")


def summarize(lines: list[dict], steps: int, global_batch: int, kind: str) -> tuple[list[tuple[str, str]], str]:
    """(result rows, problem or "") from rank 0's per-step status lines on device ``kind``."""
    if len(lines) < steps:
        return [], f"train.py logged {len(lines)} of {steps} steps"
    skip = max(1, steps // 4)  # the first steps pay for allocation, cuDNN autotuning and worker start-up
    timed = lines[skip:] or lines[-1:]
    # Each line covers one step of global_batch samples: the rate over them is the harmonic mean.
    rate = len(timed) / sum(1.0 / max(line["samples_per_s"], 1e-12) for line in timed)
    memory = [line["mem_gib"] for line in lines if line["mem_gib"] is not None]
    first, last = lines[0]["loss"], lines[-1]["loss"]
    finite = math.isfinite(first) and math.isfinite(last)
    moved = finite and abs(last - first) >= 1e-4 * max(1.0, abs(first))
    verdict = ("moved" + (" (down)" if last < first else " (up)")) if moved else (
        "not finite" if not finite else "did not move")
    rows = [("samples/s", f"{rate:.1f} (steps {timed[0]['step']}-{timed[-1]['step']}, global batch {global_batch})"),
            ("peak memory", f"{max(memory):.2f} GiB (rank 0's {'peak RSS' if kind == 'cpu' else 'peak allocated'})"
                            if memory else "not logged"),
            ("loss", f"{first:.4f} -> {last:.4f} over {len(lines)} steps: {verdict}")]
    problem = "" if moved else f"the loss {verdict} ({first:.4f} -> {last:.4f} over {len(lines)} steps)"
    return rows, problem


def run(args: argparse.Namespace) -> None:
    """Print the environment, train ``--steps`` steps through train.py and print what they showed."""
    from utils.devices import device as devices, report

    check_arguments(args)
    print_environment()
    cfg = load_doctor_config(args)
    kind = devices.resolve_kind(args.device or cfg.device)
    nproc = report.local_device_count(kind)
    batch = args.batch_size or int(cfg.batch_size)
    classes = args.num_classes or cfg.num_classes or DEFAULT_CLASSES
    threads = args.threads or max(1, (os.cpu_count() or 1) // nproc)
    global_batch = batch * nproc * int(cfg.gradient_acc)
    print(f"doctor: training {cfg.network} + {head_words(cfg)} on random tensors: {nproc} process(es) on {kind} "
          f"({devices.BACKENDS[kind]}), {precision_words(cfg, kind)}, batch {batch} per process, {classes} classes, "
          f"{args.steps} steps ({args.config})")
    with tempfile.TemporaryDirectory(prefix="arcscale_doctor_") as workdir:
        overrides = {"device": kind, "network": cfg.network, "rec": "random", "num_classes": classes,
                     "num_image": global_batch * args.steps, "batch_size": batch, "num_epoch": 1,
                     "max_steps": args.steps, "warmup_epoch": 0, "frequent": 1, "verbose": 0, "val_targets": [],
                     "verify_at_start": False, "num_workers": args.workers, "tensorboard": False,
                     "using_wandb": False, "init_backbone": None, "resume": False, "save_every_steps": 0,
                     "output": os.path.join(workdir, "run")}
        result = launch_train(args.config, overrides, nproc, threads)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip().splitlines()
        print("\n".join(output[-TAIL_LINES:]), file=sys.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        reason = errors[-1] if errors else (output[-1] if output else "no output")
        raise SystemExit(f"doctor: the training run failed (exit {result.returncode}): {reason}")
    rows, problem = summarize(status_lines(result.stdout), args.steps, global_batch, kind)
    if rows:
        print_rows("doctor: training", rows)
    if problem:
        raise SystemExit(f"doctor: problem: {problem}")
    print(f"doctor: OK: {kind} x{nproc} trained {args.steps} steps")
