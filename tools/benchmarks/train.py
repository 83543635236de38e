"""End-to-end training throughput (samples/s, data-wait fraction) through train.py itself.

    python tools/benchmark.py train --networks r18,r50,mbf --nprocs 1,2 --steps 12 --batch 32

Each case runs ``train.py`` (under torchrun when nproc > 1) on random tensors (``rec="random"``,
arcface_torch's "synthetic" speed mode), skips the first logged interval (warm-up) and prints the
mean of the rest. Each child gets OMP_NUM_THREADS = ``--threads`` (default: CPU count // processes)
and torchrun a free port.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# train.py's status line (utils/run/summary.py log_progress); "mem" is absent from older logs.
STATUS_LINE = re.compile(r"step (\d+)/\d+ epoch \d+ \| loss (n/a \(all steps skipped\)|\S+) \| lr \S+ \| "
                         r"([0-9.]+) samples/s \| data wait (\d+)% \| scale \S+(?: \| mem ([0-9.]+) GiB)?")
FREQUENT = 3  # train.py logs a status line every FREQUENT steps and at the last step
MIN_STEPS = FREQUENT + 1  # the first logged interval is warm-up and dropped: one more line is needed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` subcommand's options."""
    parser.add_argument("--networks", default="r18,r50,mbf", help="comma-separated backbone names")
    parser.add_argument("--nprocs", default="1,2", help="comma-separated process counts")
    parser.add_argument("--steps", type=int, default=12,
                        help=f"optimizer steps per case (at least {MIN_STEPS}: the first {FREQUENT} are warm-up)")
    parser.add_argument("--batch", type=int, default=32, help="per-process batch size")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | npu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--num-classes", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS (torch threads) per train.py process (default: CPU count // procs)")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel picks it), for torchrun's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def threads_per_process(args: argparse.Namespace, nproc: int) -> int:
    """``--threads``, else the CPU count shared by ``nproc`` processes."""
    return args.threads or max(1, (os.cpu_count() or 1) // nproc)


def check_arguments(args: argparse.Namespace) -> list[int]:
    """One-line SystemExit for values that cannot run or cannot be measured; returns the process counts."""
    if args.steps < MIN_STEPS:
        raise SystemExit(f"--steps {args.steps} is too few to measure: need at least {MIN_STEPS} (train.py logs "
                         f"every {FREQUENT} steps and the first interval is dropped as warm-up)")
    for flag, value in (("--batch", args.batch), ("--num-classes", args.num_classes)):
        if value < 1:
            raise SystemExit(f"{flag} {value}: expected a positive integer")
    if args.workers < 0:
        raise SystemExit(f"--workers {args.workers}: expected 0 or more")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads {args.threads}: expected a positive integer")
    try:
        nprocs = [int(n) for n in args.nprocs.split(",")]
    except ValueError:
        nprocs = []
    if not nprocs or min(nprocs) < 1:
        raise SystemExit(f"--nprocs {args.nprocs!r}: expected comma-separated positive integers, e.g. 1,2")
    return nprocs


def launch_train(config: str, overrides: dict, nproc: int, threads: int) -> subprocess.CompletedProcess:
    """``train.py CONFIG --set key=value ...`` to the end, under torchrun (a free port) when ``nproc`` > 1, each
    process with OMP_NUM_THREADS=``threads``; output captured."""
    sets = [item for key, value in overrides.items() for item in ("--set", f"{key}={value!r}")]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    return subprocess.run(launcher + ["train.py", config] + sets, cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True)


def status_lines(stdout: str) -> list[dict]:
    """Rank 0's status lines: step, loss (nan when every step of the interval was skipped), samples/s,
    data-wait fraction and peak memory in GiB (None when the line has none)."""
    return [{"step": int(match[1]), "loss": float("nan") if match[2].startswith("n/a") else float(match[2]),
             "samples_per_s": float(match[3]), "data_wait": int(match[4]) / 100,
             "mem_gib": float(match[5]) if match[5] else None} for match in STATUS_LINE.finditer(stdout)]


def run_case(args: argparse.Namespace, network: str, nproc: int, workdir: str) -> tuple[float, float]:
    """Train one case on random tensors; returns (samples/s, data-wait fraction) after the warm-up interval."""
    overrides = {"device": args.device, "network": network, "rec": "random", "num_classes": args.num_classes,
                 "num_image": args.batch * nproc * args.steps * 2, "batch_size": args.batch,
                 "max_steps": args.steps, "frequent": FREQUENT, "verbose": 0, "val_targets": [],
                 "num_workers": args.workers, "tensorboard": False, "fp16": args.precision == "fp16",
                 "bf16": args.precision == "bf16", "output": os.path.join(workdir, f"{network}_{nproc}")}
    result = launch_train("configs/base.py", overrides, nproc, threads_per_process(args, nproc))
    if result.returncode != 0:
        raise SystemExit(f"{network} x{nproc} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    intervals = [(line["samples_per_s"], line["data_wait"]) for line in status_lines(result.stdout)][1:]
    if not intervals:
        raise SystemExit(f"{network} x{nproc}: too few steps to measure; raise --steps")
    return (sum(rate for rate, _ in intervals) / len(intervals), sum(wait for _, wait in intervals) / len(intervals))


def run(args: argparse.Namespace) -> None:
    """Run every (network, process count) case and print the table."""
    nprocs = check_arguments(args)
    print(f"device={args.device} precision={args.precision} batch/process={args.batch} steps={args.steps} "
          f"classes={args.num_classes} workers={args.workers}")
    print(f"{'network':<10}{'procs':>6}{'threads':>8}{'samples/s':>12}{'data wait':>11}")
    with tempfile.TemporaryDirectory() as workdir:
        for network in args.networks.split(","):
            for nproc in nprocs:
                rate, wait = run_case(args, network, nproc, workdir)
                print(f"{network:<10}{nproc:>6}{threads_per_process(args, nproc):>8}{rate:>12.1f}{100 * wait:>10.0f}%",
                      flush=True)
