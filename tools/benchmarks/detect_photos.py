"""The detection benchmark's sized photo set, and folder-scale (``detect_batch``) timing.

``make_photo_set(DIR)`` writes 18 PNG photos from 320x240 to 800x800 (``SIZES``), made from the five real
fixture photos (four portraits, the six-face group photo; the blank is left out): photo ``i`` of ``SIZES``
comes from source ``i % 5`` (``SOURCES``' order), cut to the size's aspect ratio by the largest crop centred on
its faces (the middle of the union of the faces' boxes in ``expected.json``, the crop moved inside the photo
where it would leave it), then resampled to the size with OpenCV (INTER_AREA when it shrinks, INTER_CUBIC
when it grows). The files are named ``NN_<source>_<w>x<h>.png`` so a folder listing keeps ``SIZES``' order.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np

SOURCES = ("angelina_jolie", "kate_siegel", "multiface", "paul_rudd", "shea_whigham")
SIZES = ((320, 240), (240, 320), (400, 300), (360, 360), (480, 360), (360, 480), (512, 384), (480, 480),
         (640, 480), (480, 640), (600, 450), (560, 560), (720, 540), (640, 640), (800, 600), (600, 800),
         (720, 720), (800, 800))  # (width, height)


def sized_photo(image: np.ndarray, width: int, height: int, centre: tuple[float, float]) -> np.ndarray:
    """``image`` cut to ``width``:``height`` by its largest crop centred on ``centre`` (x, y; moved inside the
    image where needed), then resampled to width x height."""
    import cv2

    rows, cols = image.shape[:2]
    if cols * height > rows * width:  # too wide: keep the full height
        crop_w, crop_h = rows * width // height, rows
    else:
        crop_w, crop_h = cols, cols * height // width
    left = min(max(int(round(centre[0] - crop_w / 2)), 0), cols - crop_w)
    top = min(max(int(round(centre[1] - crop_h / 2)), 0), rows - crop_h)
    crop = image[top:top + crop_h, left:left + crop_w]
    interpolation = cv2.INTER_AREA if crop_w >= width else cv2.INTER_CUBIC
    return cv2.resize(crop, (width, height), interpolation=interpolation)


def make_photo_set(source_dir: str, out_dir: str) -> list[str]:
    """Write the sized photo set (module docstring) from ``source_dir``'s ``<name>.png`` into ``out_dir``;
    the paths written, in ``SIZES``' order."""
    import cv2

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(os.path.dirname(source_dir), "expected.json")) as handle:
        faces = json.load(handle)["mtcnn"]["images"]
    sources, centres = {}, {}
    for name in SOURCES:
        image = cv2.imread(os.path.join(source_dir, f"{name}.png"), cv2.IMREAD_COLOR)
        if image is None:
            raise SystemExit(f"--make-set: {source_dir}/{name}.png is missing or not readable")
        sources[name] = image
        boxes = np.array([face["box"] for face in faces[name]["faces"]])
        centres[name] = ((boxes[:, 0].min() + boxes[:, 2].max()) / 2, (boxes[:, 1].min() + boxes[:, 3].max()) / 2)
    paths = []
    for index, (width, height) in enumerate(SIZES):
        name = SOURCES[index % len(SOURCES)]
        path = os.path.join(out_dir, f"{index:02d}_{name}_{width}x{height}.png")
        cv2.imwrite(path, sized_photo(sources[name], width, height, centres[name]))
        paths.append(path)
    return paths


def time_folder(detectors: dict, photos: list[np.ndarray], rounds: int, warmup: int,
                settle: bool = False) -> dict[str, tuple]:
    """Per detector (``name -> (batch_function, label)``, where batch_function takes the list of photos), the
    median over ``rounds`` of the CPU and wall seconds for the whole list; rounds interleaved (who goes first
    alternates). ``settle``: each timed pass follows an untimed one of the same detector (on several threads a
    detector's first pass after the other's is slower: measured +15-25% for ArcScale's after facenet-pytorch's
    2-thread loop, even after a 0.5 s pause; a folder run is the steady state). Returns ``name -> (cpu_median,
    wall_median, label)``."""
    names = list(detectors)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for round_index in range(warmup + rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            if settle and round_index >= warmup:
                detectors[name][0](photos)
            wall, cpu = time.perf_counter(), time.process_time()
            detectors[name][0](photos)
            spent = (time.process_time() - cpu, time.perf_counter() - wall)
            if round_index >= warmup:
                samples[name].append(spent)
    return {name: (statistics.median(s[0] for s in samples[name]), statistics.median(s[1] for s in samples[name]),
                   detectors[name][1]) for name in names}


def reference_batch(detect_many, detect_one):
    """facenet-pytorch over a folder: its batch mode (``detect_many(list)``) where it works on these photos,
    else its per-photo loop; ``(function, label)``. Its batch mode stacks the photos into one array, so mixed
    sizes fail; a failure is caught once, on the first call, and the loop is used from then on."""
    state = {"mode": None}

    def run(photos):
        if state["mode"] is None:
            try:
                detect_many(photos)
                state["mode"] = "batch"
                return
            except Exception as exc:  # noqa: BLE001 - any failure of its batch mode means: use its loop
                state["mode"] = f"per-photo loop (its batch mode failed: {type(exc).__name__})"
        if state["mode"] == "batch":
            detect_many(photos)
        else:
            for photo in photos:
                detect_one(photo)

    return run, state
