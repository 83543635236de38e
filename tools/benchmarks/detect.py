"""Face detection time per photo: ArcScale's MTCNN against facenet-pytorch's (or against itself under
onnxruntime, ``--onnx``) on the same photos.

    python tools/benchmark.py detect                              # the fixture photos, 5 interleaved rounds
    python tools/benchmark.py detect --images DIR_OR_FILES --rounds 9 --threads 2
    python tools/benchmark.py detect --onnx DIR                   # torch vs onnxruntime (tools/mtcnn2onnx.py DIR)
    python tools/benchmark.py detect --breakdown [--onnx DIR]     # where the time goes: PNet, RNet, ONet, the rest
    python tools/benchmark.py detect --make-set DIR               # write the 18 sized photos (detect_photos.py)
    python tools/benchmark.py detect --images DIR --batch         # then the whole folder: detect_batch vs the reference
    python tools/benchmark.py detect --images DIR --batch --workers 2   # + both detectors on 2 cores, wall-clock

facenet-pytorch is timed in the same run when it is importable (it is never a requirement; a throw-away
venv works: ``python -m venv --system-site-packages /tmp/fnvenv && /tmp/fnvenv/bin/pip install --no-deps
facenet-pytorch==2.4.1``, then run this command with ``/tmp/fnvenv/bin/python``). It imports torchvision
for ``batched_nms`` and ``to_tensor`` only; when torchvision is absent this benchmark gives it exact
stand-ins (``utils.faces.mtcnn.nms``, tensors in and out, numpy inside: the same NMS both detectors then use)
for the run only.
Rounds alternate which detector goes first; each photo's time is the median over rounds, as wall-clock time and
as this process's CPU time (on a shared machine the CPU time is the steadier figure: it leaves out the time the
process waited for a core). Both detectors' boxes are compared, so a speed figure never comes from a different
result.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import statistics
import sys
import time
import types

import numpy as np

FIXTURE_IMAGES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "tests", "fixtures", "facenet", "images")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``detect`` subcommand's options."""
    parser.add_argument("--images", nargs="+", default=[FIXTURE_IMAGES],
                        help="photos or folders of photos (default: tests/fixtures/facenet/images)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds over all photos (median per photo)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both detectors")
    parser.add_argument("--no-reference", action="store_true", help="time ArcScale's detector only")
    parser.add_argument("--onnx", default=None, metavar="DIR",
                        help="compare with ArcScale's detector under onnxruntime (DIR from tools/mtcnn2onnx.py, the "
                             "same --threads) instead of facenet-pytorch")
    parser.add_argument("--make-set", default=None, metavar="DIR",
                        help="write the 18 photos from 320x240 to 800x800 made from the fixture photos "
                             "(tools/benchmarks/detect_photos.py says how) into DIR, then time them")
    parser.add_argument("--batch", action="store_true",
                        help="then the whole list of photos at once: MTCNN.detect_batch against facenet-pytorch's "
                             "batch mode (its per-photo loop where the batch mode fails on these photos)")
    parser.add_argument("--workers", type=int, default=1,
                        help="with --batch, also the whole machine's throughput: detect_batch(workers=N) (N threads, "
                             "one torch thread each) against facenet-pytorch with N torch threads, wall-clock")
    parser.add_argument("--breakdown", action="store_true",
                        help="then, per photo, the time in each of the three networks and in everything else "
                             "(ArcScale's detector, and the onnxruntime one with --onnx), and the networks' "
                             "GFLOP/s against this machine's GEMM and convolution rates (detect_rates.py)")


def _photo_paths(items: list[str]) -> list[str]:
    paths = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(path for path in glob.glob(os.path.join(item, "*"))
                           if path.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                raise SystemExit(f"--images {item}: no {'/'.join(IMAGE_SUFFIXES)} photos in this folder")
            paths.extend(found)
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise SystemExit(f"--images {item}: no such file or folder")
    return paths


def _read(path: str) -> np.ndarray:
    import cv2

    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise SystemExit(f"--images {path}: not a readable image")
    return np.ascontiguousarray(image[:, :, ::-1])


def _with_torchvision_stand_ins(load):
    """Run ``load()`` with stand-in torchvision modules in sys.modules when torchvision is not installed."""
    if importlib.util.find_spec("torchvision") is not None:
        return load()
    import torch

    from utils.faces.mtcnn import nms

    def batched_nms(boxes, scores, idxs, iou_threshold):
        return nms(boxes, scores, iou_threshold, idxs)

    def to_tensor(picture):
        array = np.asarray(picture)
        tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
        return tensor.float().div(255) if array.dtype == np.uint8 else tensor.float()

    names = ("torchvision", "torchvision.ops", "torchvision.ops.boxes", "torchvision.transforms",
             "torchvision.transforms.functional")
    fakes = {name: types.ModuleType(name) for name in names}
    fakes["torchvision.ops.boxes"].batched_nms = batched_nms
    fakes["torchvision.ops"].boxes = fakes["torchvision.ops.boxes"]
    fakes["torchvision.transforms.functional"].to_tensor = to_tensor
    fakes["torchvision.transforms"].functional = fakes["torchvision.transforms.functional"]
    fakes["torchvision"].ops, fakes["torchvision"].transforms = fakes["torchvision.ops"], fakes["torchvision.transforms"]
    sys.modules.update(fakes)
    try:
        return load()
    finally:  # the imported reference keeps its own references; nothing else in this process sees the fakes
        for name in names:
            sys.modules.pop(name, None)


def _reference_detector():
    """facenet-pytorch's MTCNN (all faces, largest first) as ``image -> boxes``, or None when not importable."""
    if importlib.util.find_spec("facenet_pytorch") is None:
        return None

    def load():
        from facenet_pytorch import MTCNN as ReferenceMTCNN

        return ReferenceMTCNN(keep_all=True, select_largest=True, device="cpu")

    reference = _with_torchvision_stand_ins(load)

    def detect(image: np.ndarray) -> np.ndarray:
        boxes, _ = reference.detect(image)
        return np.zeros((0, 4), np.float32) if boxes is None else np.asarray(boxes, np.float32)

    detect.detect_many = reference.detect  # its batch mode: a list of photos in one call
    return detect


NETWORKS = ("pnet", "rnet", "onet")


class _TimedNet:
    """A network runner that adds the wall and CPU seconds of its calls (``__call__``, PNet's ``heads``) to
    ``clock[key]``; every other attribute (``row_bands``, ``packed_layout``, ``packs``) is the runner's own."""

    def __init__(self, net, clock: dict[str, list[float]], key: str) -> None:
        self.net, self.clock, self.key = net, clock, key

    def _timed_call(self, function, *args):
        wall, cpu = time.perf_counter(), time.process_time()
        out = function(*args)
        spent = self.clock[self.key]
        spent[0] += time.perf_counter() - wall
        spent[1] += time.process_time() - cpu
        return out

    def __call__(self, x):
        return self._timed_call(self.net, x)

    def heads(self, *args):
        return self._timed_call(self.net.heads, *args)

    def __getattr__(self, name: str):
        return getattr(self.net, name)


def breakdown(detector, photos: list[np.ndarray], rounds: int) -> list[dict[str, float]]:
    """Per photo, the median over ``rounds`` of the detection's CPU seconds (``total``, ``wall``: its wall
    seconds) and of the CPU seconds inside each network's calls and outside them (``other``: pyramid
    resampling, candidate screening, NMS, crops, box arithmetic). The detector's networks are wrapped in
    timers for the run and put back afterwards; its results are unchanged (the same runners do the work)."""
    clock = {key: [0.0, 0.0] for key in NETWORKS}
    nets = detector.pnet, detector.rnet, detector.onet
    detector.pnet, detector.rnet, detector.onet = (_TimedNet(net, clock, key) for net, key in zip(nets, NETWORKS))
    try:
        medians = []
        for photo in photos:
            samples: dict[str, list[float]] = {key: [] for key in ("total", "wall", "other", *NETWORKS)}
            for _ in range(rounds):
                for spent in clock.values():
                    spent[0] = spent[1] = 0.0
                wall, cpu, _ = _timed(lambda image: detector.detect(image), photo)
                samples["total"].append(cpu)
                samples["wall"].append(wall)
                for key in NETWORKS:
                    samples[key].append(clock[key][1])
                samples["other"].append(cpu - sum(clock[key][1] for key in NETWORKS))
            medians.append({key: statistics.median(values) for key, values in samples.items()})
        return medians
    finally:
        detector.pnet, detector.rnet, detector.onet = nets


def _print_breakdown(name: str, paths: list[str], medians: list[dict[str, float]]) -> None:
    print(f"where {name}'s detection time goes (CPU ms, median per photo; other = everything outside the three "
          f"networks' calls):")
    print(f"{'photo':<22} {'total':>8} {'pnet':>14} {'rnet':>14} {'onet':>14} {'other':>14} {'wall':>8}")
    sums = {key: sum(row[key] for row in medians) for key in medians[0]}
    for label, row in [*zip((os.path.basename(path) for path in paths), medians), ("total (sum of medians)", sums)]:
        parts = " ".join(f"{row[key] * 1000:>7.1f} ({row[key] / max(row['total'], 1e-12):>4.0%})"
                         for key in (*NETWORKS, "other"))
        print(f"{label:<22} {row['total'] * 1000:>8.1f} {parts} {row['wall'] * 1000:>8.1f}")


def _load() -> str:
    """The 1/5/15-minute load averages (/proc/loadavg), or "n/a" where there is none."""
    try:
        with open("/proc/loadavg") as handle:
            return " ".join(handle.read().split()[:3])
    except OSError:
        return "n/a"


def _timed(function, image: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Wall seconds, process CPU seconds and the boxes of one detection."""
    wall, cpu = time.perf_counter(), time.process_time()
    boxes = function(image)
    return time.perf_counter() - wall, time.process_time() - cpu, boxes


def _folder(ours, reference, photos: list[np.ndarray], args: argparse.Namespace) -> None:
    """Print the whole list's time: ArcScale's ``detect_batch`` against facenet-pytorch's batch mode or loop."""
    from tools.benchmarks.detect_photos import reference_batch, time_folder

    found = ours.detect_batch(photos)
    for index, (photo, (boxes, _, _)) in enumerate(zip(photos, found)):
        single = ours.detect(photo)[0]
        if single.shape != boxes.shape or (len(boxes) and np.abs(single - boxes).max() > 1e-4):
            raise SystemExit(f"error: detect_batch's boxes of photo {index} differ from detect's")
    detectors = {"arcscale": (ours.detect_batch, "MTCNN.detect_batch")}
    state = None
    if reference is not None and hasattr(reference, "detect_many"):
        function, state = reference_batch(reference.detect_many, reference)
        detectors["facenet-pytorch"] = (function, "")
    result = time_folder(detectors, photos, args.rounds, max(args.warmup, 1))
    print(f"folder of {len(photos)} photos at once (CPU ms, wall ms, photos per CPU second; median of {args.rounds}):")
    for name, (cpu, wall, label) in result.items():
        label = label or (state["mode"] if state else "")
        print(f"  {name:<16} {cpu * 1000:>9.1f} {wall * 1000:>9.1f} {len(photos) / cpu:>8.1f}/s  {label}")
    if "facenet-pytorch" in result:
        print(f"  throughput ArcScale / facenet-pytorch (CPU): "
              f"{result['facenet-pytorch'][0] / result['arcscale'][0]:.2f}x")
    if args.workers > 1:
        _whole_machine(ours, detectors.get("facenet-pytorch", (None,))[0], photos, args)


def _whole_machine(ours, reference_folder, photos: list[np.ndarray], args: argparse.Namespace) -> None:
    """Wall-clock throughput with ``args.workers`` cores given to each detector as it uses them best:
    ArcScale's ``detect_batch(workers=N)`` (photos on N threads, one torch thread each) against
    facenet-pytorch with N torch intra-op threads (its batch mode or loop, as above)."""
    import torch

    from tools.benchmarks.detect_photos import time_folder

    workers, threads = args.workers, torch.get_num_threads()

    def reference(batch):
        torch.set_num_threads(workers)
        try:
            reference_folder(batch)
        finally:
            torch.set_num_threads(threads)

    detectors = {"arcscale": (lambda batch: ours.detect_batch(batch, workers=workers),
                              f"MTCNN.detect_batch(workers={workers})")}
    if reference_folder is not None:
        detectors["facenet-pytorch"] = (reference, f"{workers} torch threads")
    result = time_folder(detectors, photos, args.rounds, max(args.warmup, 1), settle=True)
    print(f"whole machine, {workers} cores each (wall ms, photos per second; median of {args.rounds}, each pass "
          f"after an untimed one of the same detector; {os.cpu_count()} CPUs here):")
    for name, (_, wall, label) in result.items():
        print(f"  {name:<16} {wall * 1000:>9.1f} {len(photos) / wall:>8.1f}/s  {label}")
    if "facenet-pytorch" in result:
        print(f"  throughput ArcScale / facenet-pytorch (wall, {workers} cores each): "
              f"{result['facenet-pytorch'][1] / result['arcscale'][1]:.2f}x")


def run(args: argparse.Namespace) -> None:
    """Time MTCNN detection per photo (and the reference implementation when installed)."""
    if args.workers < 1:
        raise SystemExit(f"--workers {args.workers}: expected at least 1")
    if args.rounds < 1 or args.warmup < 0 or args.threads < 1:
        raise SystemExit(f"--rounds {args.rounds} --warmup {args.warmup} --threads {args.threads}: expected "
                         f"rounds >= 1, warmup >= 0, threads >= 1")
    import torch

    from utils.faces.mtcnn import MTCNN

    if args.make_set:
        from tools.benchmarks.detect_photos import make_photo_set

        paths = make_photo_set(FIXTURE_IMAGES, args.make_set)
    else:
        paths = _photo_paths(args.images)
    photos = [_read(path) for path in paths]
    torch.set_num_threads(args.threads)
    ours = MTCNN(device="cpu")
    detectors = {"arcscale": lambda image: ours.detect(image)[0]}
    other = "facenet-pytorch"
    if args.onnx:
        from utils.faces.mtcnn import MTCNNError

        try:
            onnx_detector = MTCNN.from_onnx(args.onnx, threads=args.threads)
        except MTCNNError as exc:
            raise SystemExit(f"error: {exc}") from None
        other = f"onnxruntime {sys.modules['onnxruntime'].__version__}"  # imported by from_onnx
        reference = lambda image: onnx_detector.detect(image)[0]  # noqa: E731
    else:
        reference = None if args.no_reference else _reference_detector()
    if reference is not None:
        detectors[other] = reference
    print(f"detect benchmark: {len(photos)} photos, {args.rounds} rounds (+{args.warmup} warm-up), "
          f"{args.threads} torch threads, torch {torch.__version__}, "
          f"reference {other if reference is not None else 'not importable (skipped)'}, load {_load()}")
    times = {name: [[] for _ in photos] for name in detectors}
    cpu_times = {name: [[] for _ in photos] for name in detectors}
    found: dict[str, list[np.ndarray]] = {name: [np.zeros((0, 4))] * len(photos) for name in detectors}
    names = list(detectors)
    for round_index in range(args.warmup + args.rounds):
        order = names if round_index % 2 == 0 else names[::-1]  # alternate who runs first
        for index, photo in enumerate(photos):
            for name in order:
                seconds, cpu_seconds, boxes = _timed(detectors[name], photo)
                found[name][index] = boxes
                if round_index >= args.warmup:
                    times[name][index].append(seconds)
                    cpu_times[name][index].append(cpu_seconds)
    wall_medians = {name: [statistics.median(per_photo) for per_photo in times[name]] for name in detectors}
    cpu_medians = {name: [statistics.median(per_photo) for per_photo in cpu_times[name]] for name in detectors}
    compared = reference is not None
    header = f"{'photo':<22} {'size':>9} {'faces':>5} {'wall ms':>8} {'cpu ms':>8}"
    if compared:
        header += f" {'ref wall ms':>11} {'ref cpu ms':>10} {'wall ratio':>10} {'cpu ratio':>9} {'max box diff px':>15}"
    print(header)
    for index, (path, photo) in enumerate(zip(paths, photos)):
        line = f"{os.path.basename(path):<22} {photo.shape[1]:>4}x{photo.shape[0]:<4} " \
               f"{len(found['arcscale'][index]):>5} {wall_medians['arcscale'][index] * 1000:>8.1f} " \
               f"{cpu_medians['arcscale'][index] * 1000:>8.1f}"
        if compared:
            mine, theirs = found["arcscale"][index], found[other][index]
            if mine.shape != theirs.shape:
                diff = f"faces {len(mine)} vs {len(theirs)}"
            else:
                diff = f"{np.abs(mine - theirs).max():.2e}" if len(mine) else "0"
            line += f" {wall_medians[other][index] * 1000:>11.1f} " \
                    f"{cpu_medians[other][index] * 1000:>10.1f} " \
                    f"{wall_medians['arcscale'][index] / wall_medians[other][index]:>10.2f} " \
                    f"{cpu_medians['arcscale'][index] / cpu_medians[other][index]:>9.2f} {diff:>15}"
        print(line)
    line = f"{'total (sum of medians)':<38} {sum(wall_medians['arcscale']) * 1000:>8.1f} " \
           f"{sum(cpu_medians['arcscale']) * 1000:>8.1f}"
    if compared:
        wall_ref, cpu_ref = sum(wall_medians[other]), sum(cpu_medians[other])
        line += f" {wall_ref * 1000:>11.1f} {cpu_ref * 1000:>10.1f} {sum(wall_medians['arcscale']) / wall_ref:>10.2f} " \
                f"{sum(cpu_medians['arcscale']) / cpu_ref:>9.2f}"
    print(line)
    if args.batch:
        _folder(ours, reference if not args.onnx else None, photos, args)
    if args.breakdown:
        from tools.benchmarks.detect_rates import machine_rates, network_flops, print_rates

        flops = [network_flops(ours, photo) for photo in photos]
        rates = machine_rates()
        medians = breakdown(ours, photos, args.rounds)
        _print_breakdown("torch (ArcScale)", paths, medians)
        print_rates(flops, medians, rates)
        if args.onnx:
            medians = breakdown(onnx_detector, photos, args.rounds)
            _print_breakdown("onnxruntime (ArcScale)", paths, medians)
            print_rates(flops, medians, rates)
    print(f"load average at the end: {_load()}")
