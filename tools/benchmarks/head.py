"""Partial FC head: step time and peak memory of forward + backward + optimizer step.

    python tools/benchmark.py head --num-classes 1000000 --sample-rate 0.1 --batch 256
    python tools/benchmark.py head --num-classes 100000 1000000 4000000 --sample-rate 1.0 0.1
    python tools/benchmark.py head --find-max 4000000 5000000 6000000 --weight-dtype bfloat16 --state-dtype bfloat16

Modes: ``sparse`` (default update: sampled rows only), ``dense`` (every row decays each step,
arcface_torch v2 semantics, no dense gradient tensor) and ``reference`` (arcface_torch v2's way: the
full weight as an autograd Parameter, a dense [C, D] gradient and torch.optim.SGD). Every
configuration runs in its own subprocess (so peak RSS is its own), one at a time, and is killed if
its resident memory passes ``--max-gib``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODES = ("sparse", "dense", "reference")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``head`` subcommand's options."""
    parser.add_argument("--num-classes", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--sample-rate", type=float, nargs="+", default=[0.1])
    parser.add_argument("--batch", type=int, default=256, help="global batch (one process)")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default="sgd")
    parser.add_argument("--weight-dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--state-dtype", choices=("float32", "bfloat16", "int8"), default="float32",
                        help="optimizer state storage (int8: SGD momentum with a per-row scale)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after --warmup")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every configuration's modes this many times, interleaved, and report the "
                             "median over rounds (on a shared machine the load changes between runs; "
                             "use an odd number)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-gib", type=float, default=18.0, help="skip / kill a configuration above this RSS")
    parser.add_argument("--timeout", type=float, default=170.0, help="seconds per configuration")
    parser.add_argument("--find-max", type=int, nargs="+", metavar="C", default=None,
                        help="instead of the grid: try these class counts (sparse, first --sample-rate) and "
                             "report the largest that trains within --max-gib")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)


def estimate_gib(mode: str, num_classes: int, sample_rate: float, batch: int, dim: int,
                 weight_bytes: int, state_bytes: int) -> float:
    """Rough resident estimate, used to skip configurations that cannot fit (the watchdog is the real cap)."""
    rows = num_classes * dim
    sampled = max(1, round(sample_rate * num_classes))
    logits = 3 * batch * sampled * 4
    if mode == "reference":  # weight + dense grad + momentum + the weight-decay temporary
        total = 4 * rows * 4 + 3 * sampled * dim * 4 + logits
    else:  # weight + state + the sampled rows and their gradient (fp32) + one [B, S] buffer
        total = rows * (weight_bytes + state_bytes) + 2 * sampled * dim * 4 + batch * sampled * 4
    return total / 2**30 + 0.5


def _child(spec: dict) -> dict:
    """Runs inside the per-configuration subprocess; returns the measurements."""
    import resource

    import torch
    import torch.nn.functional as F

    import losses
    from partial_fc import PartialFC

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(12345)
    # The first torch.optim optimizer imports torch._dynamo (~70 MB, ~2 s); do it before the baseline in
    # every mode, so only the reference mode's figures do not carry it.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    num_classes, dim, batch, rate = spec["num_classes"], spec["embedding_size"], spec["batch"], spec["sample_rate"]
    margin = losses.CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)
    # A fresh batch every step, as in training (one repeated batch would be memorised in a few steps).
    batches = [(torch.randn(batch, dim), torch.randint(0, num_classes, (batch,)))
               for _ in range(spec["warmup"] + spec["steps"])]
    batch_iter = iter(batches)
    build_start = time.perf_counter()
    if spec["mode"] == "reference":
        weight = torch.nn.Parameter(torch.empty(num_classes, dim).normal_(0, 0.01))
        optimizer = {"sgd": lambda: torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=5e-4),
                     "adam": lambda: torch.optim.Adam([weight], lr=0.001, weight_decay=5e-4),
                     "adamw": lambda: torch.optim.AdamW([weight], lr=0.001, weight_decay=5e-4)}[spec["optimizer"]]()
        num_sample = max(1, round(rate * num_classes))

        def step() -> float:
            embeddings, labels = next(batch_iter)
            emb = embeddings.requires_grad_(True)
            if rate < 1.0:
                with torch.no_grad():
                    positives = torch.unique(labels)
                    scores = torch.rand(num_classes)
                    scores[positives] = 2.0
                    index = torch.topk(scores, num_sample).indices.sort().values
                    target = torch.searchsorted(index, labels)
                rows = weight[index]
            else:
                rows, target = weight, labels
            logits = F.linear(F.normalize(emb), F.normalize(rows)).clamp(-1, 1)
            loss = F.cross_entropy(margin(logits, target, inplace=True), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            return loss.item()
    else:
        head = PartialFC(margin, dim, num_classes, sample_rate=rate, pfc_update=spec["mode"],
                         weight_dtype=spec["weight_dtype"], state_dtype=spec["state_dtype"])
        head.configure_optimizer(spec["optimizer"], momentum=0.9, weight_decay=5e-4)

        def step() -> float:
            embeddings, labels = next(batch_iter)
            emb = embeddings.requires_grad_(True)
            loss = head(emb, labels)
            loss.backward()
            head.step(0.1)
            head.zero_grad()
            return loss.item()
    build_seconds = time.perf_counter() - build_start
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    for _ in range(spec["warmup"]):
        step()
    times = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"step_s": sorted(times)[len(times) // 2], "min_step_s": min(times), "peak_rss_gib": peak,
            "peak_above_start_gib": peak - rss_start, "after_build_gib": rss_built - rss_start,
            "build_s": build_seconds, "loss": loss}


def _rss_gib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def run_one(spec: dict, max_gib: float, timeout: float) -> dict:
    """One configuration in a fresh subprocess, killed above ``max_gib`` resident or after ``timeout``."""
    command = [sys.executable, "-m", "tools.benchmarks.head", "--child", json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    start, peak, killed = time.monotonic(), 0.0, None
    while proc.poll() is None:
        peak = max(peak, _rss_gib(proc.pid))
        if peak > max_gib:
            killed = f"killed: RSS {peak:.1f} GiB > {max_gib} GiB"
        elif time.monotonic() - start > timeout:
            killed = f"killed: over {timeout:.0f} s"
        if killed:
            proc.kill()
            proc.wait()
            return {"error": killed}
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        last = (err.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {proc.returncode}: {last}"}
    return json.loads(out.strip().splitlines()[-1])


def _spec(args, mode: str, num_classes: int, rate: float) -> dict:
    return {"mode": mode, "num_classes": num_classes, "sample_rate": rate, "batch": args.batch,
            "embedding_size": args.embedding_size, "optimizer": args.optimizer, "weight_dtype": args.weight_dtype,
            "state_dtype": args.state_dtype, "steps": args.steps, "warmup": args.warmup, "threads": args.threads}


def _line(spec: dict, result: dict) -> str:
    name = (f"C={spec['num_classes']:>9,d} r={spec['sample_rate']:<4} {spec['mode']:<9} "
            f"w={spec['weight_dtype'][:4]} state={spec['state_dtype'][:4]}")
    if "error" in result:
        return f"{name} | {result['error']}"
    return (f"{name} | step {result['step_s']:7.3f} s (min {result['min_step_s']:.3f}) | peak RSS "
            f"{result['peak_rss_gib']:5.2f} GiB ({result['peak_above_start_gib']:5.2f} above start) | "
            f"loss {result['loss']:.3f}")


def run(args: argparse.Namespace) -> None:
    """Run each configuration in its own subprocess and print step time and memory (or find the largest class count)."""
    weight_bytes = 4 if args.weight_dtype == "float32" else 2
    state_bytes = {"float32": 4, "bfloat16": 2, "int8": 1}[args.state_dtype] * (1 if args.optimizer == "sgd" else 2)
    print(f"head benchmark: batch {args.batch}, D={args.embedding_size}, {args.optimizer}, {args.threads} threads, "
          f"max {args.max_gib} GiB; one subprocess per configuration", flush=True)
    if args.find_max:
        rate, best = args.sample_rate[0], None
        for num_classes in sorted(args.find_max):
            spec = _spec(args, "sparse", num_classes, rate)
            spec["steps"] = max(1, min(args.steps, 2))
            result = run_one(spec, args.max_gib, args.timeout)
            print(_line(spec, result), flush=True)
            if "error" in result:
                break
            best = num_classes
        print(f"largest class count within {args.max_gib} GiB at r={rate} ({args.weight_dtype} weight, "
              f"{args.state_dtype} state): {best if best else 'none of those tried'}")
        return
    for num_classes in args.num_classes:
        for rate in args.sample_rate:
            rounds: dict[str, list[dict]] = {}
            for mode in args.modes:
                estimate = estimate_gib(mode, num_classes, rate, args.batch, args.embedding_size,
                                        weight_bytes if mode != "reference" else 4,
                                        state_bytes if mode != "reference" else 4)
                if estimate > args.max_gib:
                    print(_line(_spec(args, mode, num_classes, rate),
                                {"error": f"skipped: needs ~{estimate:.1f} GiB > {args.max_gib} GiB"}), flush=True)
                else:
                    rounds[mode] = []
            for _ in range(max(1, args.rounds)):
                for mode in rounds:
                    spec = _spec(args, mode, num_classes, rate)
                    result = run_one(spec, args.max_gib, args.timeout)
                    print(_line(spec, result), flush=True)
                    if "error" not in result:
                        rounds[mode].append(result)
            medians = {mode: _median_result(found) for mode, found in rounds.items() if found}
            if args.rounds > 1:
                for mode, result in medians.items():
                    print(f"  median of {len(rounds[mode])} rounds: " + _line(_spec(args, mode, num_classes, rate),
                                                                             result), flush=True)
            if "sparse" in medians:
                for base in ("reference", "dense"):
                    if base in medians:
                        print(f"  sparse / {base}: time {medians['sparse']['step_s'] / medians[base]['step_s']:.2f}x, "
                              f"peak RSS {medians['sparse']['peak_rss_gib'] / medians[base]['peak_rss_gib']:.2f}x",
                              flush=True)


def _median_result(results: list[dict]) -> dict:
    """The round with the median step time (its memory figures come with it); with an even number of
    rounds, the upper middle one with the mean step time of the two middle rounds."""
    ordered = sorted(results, key=lambda result: result["step_s"])
    middle = dict(ordered[len(ordered) // 2])
    if len(ordered) % 2 == 0:
        middle["step_s"] = (ordered[len(ordered) // 2 - 1]["step_s"] + middle["step_s"]) / 2
    return middle

if __name__ == "__main__":
    sys.path.insert(0, REPO_ROOT)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    cli = parser.parse_args()
    if cli.child:
        print(json.dumps(_child(json.loads(cli.child))))
    else:
        run(cli)
