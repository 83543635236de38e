"""Speed and memory benchmarks that print numbers (never timed unit tests).

    python tools/benchmark.py data      [options]   # RecordIO reads, decode, DataLoader scaling
    python tools/benchmark.py backbone  [options]   # forward / forward+backward images/s, GFLOP/s
    python tools/benchmark.py head      [options]   # Partial FC step time and peak memory
    python tools/benchmark.py train     [options]   # end-to-end training FPS
    python tools/benchmark.py eval      [options]   # verification .bin and IJB scoring time
    python tools/benchmark.py detect    [options]   # MTCNN face detection time vs facenet-pytorch
    python tools/benchmark.py doctor    [options]   # check an environment: versions, devices, a short training
    python tools/benchmark.py snapshot  [options]   # the divergence rollback snapshot: time and memory per step

Each subcommand lives in ``tools/benchmarks/<name>.py`` with ``add_arguments(parser)``
and ``run(args)``; ``--help`` after a subcommand lists its options.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SUBCOMMANDS = ("data", "backbone", "head", "train", "eval", "detect", "doctor", "snapshot")


def main(argv: list[str] | None = None) -> None:
    """Parse the subcommand and run it."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    modules = {}
    for name in SUBCOMMANDS:
        try:
            modules[name] = importlib.import_module(f"tools.benchmarks.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"tools.benchmarks.{name}":
                raise
            continue
        sub_parser = sub.add_parser(name, help=(modules[name].__doc__ or "").strip().splitlines()[0])
        modules[name].add_arguments(sub_parser)
    args = parser.parse_args(argv)
    from utils.devices.device import DeviceError

    try:
        modules[args.what].run(args)
    except DeviceError as exc:  # e.g. --device cuda on a CPU-only build: one line, no traceback
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
