"""Embed one aligned face image, or compare two.

    python tools/inference.py --model model.pt --network r50 --img a.jpg [--save a.npy]
    python tools/inference.py --model model.pt --network r50 --img a.jpg --img2 b.jpg --threshold 0.3
    python tools/inference.py --model model.pt --img photo1.jpg --img2 photo2.jpg --detect   # raw photos

With ``--detect`` the inputs are raw photos: MTCNN (utils/faces/mtcnn.py) finds the largest face, which is
aligned onto the ArcFace template for 112-style models or cut as box + ``--margin`` for 160x160 facenet
models (docs/facenet.md). Otherwise images should be aligned crops of the model's input size (112x112
for insightface's networks, 160x160 for inception_resnet_v1; see tools/align_faces.py); other sizes are
resized, as arcface_torch's inference.py does. The size and pixel normalisation come from the model
(``backbones.input_spec``). ``--model`` may also be an .onnx file from tools/torch2onnx.py.
``--network`` and ``--embedding-size`` default to what the file says (utils.weights.load.load_backbone_file).
The verdict compares the cosine similarity of the L2-normalised embeddings with ``--threshold``;
pick the threshold on your own validation pairs (0.3 is a common starting point for ArcFace models).

Every answer says what it used: the weights file, the network (and whether it was named or read from
the file), the embedding and input size, and per image the detected face (box, probability, how many
faces, which one was taken) or the whole frame. Warnings (stderr) for the demo's ``tiny`` network, for
weights that look untrained and for whole photos of another size than the crop. The model line and the first
two warnings come from eval/model_info.py, as in every evaluation CLI.

Instead of ``--threshold``, take the one ``python -m eval.folders`` measured on your own people at a FAR:

    python tools/inference.py --model model.pt --img a.jpg --img2 b.jpg --detect --threshold-from DIR/report.json --far 1e-4

The threshold is then the report's for this model file (matched by its SHA-256), the flip setting the
report's, and the verdict says where the threshold comes from.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from eval.model_info import cosine, load_model  # noqa: E402


DEFAULT_THRESHOLD = 0.3  # a common starting point for ArcFace models; not fitted to any one model


class InferenceError(ValueError):
    """An unreadable image or bad option; the message is one line."""


def _read_bgr(path: str) -> np.ndarray:
    import cv2

    if not os.path.isfile(path):
        raise InferenceError(f"{path}: image not found")
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise InferenceError(f"{path}: not a readable image")
    return image


def _as_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]


def read_frame(path: str, image_size: tuple[int, int] = (112, 112)) -> tuple[torch.Tensor, str, bool]:
    """(uint8 RGB [1, 3, H, W] of the whole image resized to ``image_size``, what was done in words,
    whether it had to be resized)."""
    import cv2

    image = _read_bgr(path)
    height, width = image.shape[:2]
    resized = (height, width) != tuple(image_size)
    if resized:
        image = cv2.resize(image, (image_size[1], image_size[0]))
    words = (f"whole frame {height}x{width} resized to {image_size[0]}x{image_size[1]} (no face detection)"
             if resized else f"whole frame {height}x{width} (the model's crop size; no face detection)")
    return _as_tensor(cv2.cvtColor(image, cv2.COLOR_BGR2RGB)), words, resized


def read_face(path: str, image_size: tuple[int, int] = (112, 112)) -> torch.Tensor:
    """uint8 RGB [1, 3, H, W] of an image file, resized to ``image_size`` when needed."""
    return read_frame(path, image_size)[0]


def detect_face(path: str, image_size: tuple[int, int], detector, margin: int = 0) -> tuple[torch.Tensor, str]:
    """(uint8 RGB [1, 3, H, W] of the largest face MTCNN finds in a raw photo, what was found and taken in
    words), prepared by the model's convention (utils/faces/prepare.py): a square input whose side is a
    multiple of 112 or 128 is aligned onto the ArcFace template (5 landmarks); any other size (160 for
    facenet models) is the box plus ``margin`` output pixels, as facenet-pytorch crops."""
    from utils.faces.align import AlignmentError
    from utils.faces.prepare import convention, decode_photo, model_face

    if not os.path.isfile(path):
        raise InferenceError(f"{path}: image not found")
    with open(path, "rb") as handle:
        rgb = decode_photo(handle.read())
    if rgb is None:
        raise InferenceError(f"{path}: not a readable image")
    boxes, probs, landmarks = detector.detect(rgb)
    if len(boxes) == 0:
        raise InferenceError(f"{path}: MTCNN found no face (faces from {detector.min_face_size:g} px are searched)")
    try:
        face = model_face(rgb, boxes[0], landmarks[0], image_size, detector, margin)
        name = convention(image_size, margin)
    except AlignmentError as exc:
        raise InferenceError(f"--detect: {exc}") from None
    height, width = image_size
    how = (f"aligned onto the ArcFace template at {height}x{width}" if name.startswith("arcface") else
           f"box + margin {margin} cut at {height}x{width}")
    box = ", ".join(f"{value:.0f}" for value in boxes[0])
    found = f"{len(boxes)} faces found, took the largest" if len(boxes) > 1 else "1 face found"
    return _as_tensor(face), f"detected face: {found}: box [{box}], probability {float(probs[0]):.4f}, {how}"


def read_detected_face(path: str, image_size: tuple[int, int], detector, margin: int = 0) -> torch.Tensor:
    """uint8 RGB [1, 3, H, W] of the largest face MTCNN finds in a raw photo (see :func:`detect_face`)."""
    return detect_face(path, image_size, detector, margin)[0]


@torch.no_grad()
def embed(model, image: torch.Tensor, device: torch.device, flip: bool = False) -> np.ndarray:
    """Raw embedding [D] (image + mirror image when ``flip``)."""
    from eval.embed import embed_images
    plain, mirrored = embed_images(model, image, device, batch_size=1, flip=flip)
    feature = plain[0] + mirrored[0] if flip else plain[0]
    return feature.double().numpy()


def threshold_from_report(path: str, far: float, model_path: str) -> tuple[float, dict, str]:
    """(threshold, the report's settings, description) measured by eval.folders at ``far`` for the model file
    ``model_path``."""
    import json

    from eval.folder_faces import file_sha256

    try:
        with open(path) as handle:
            report = json.load(handle)
        models, settings = report["models"], dict(report["settings"])
        settings["flip"], settings["crops"] = bool(settings["flip"]), bool(settings["crops"])
    except OSError as exc:
        raise InferenceError(f"--threshold-from {path}: cannot read it ({exc.strerror or exc})") from None
    except (ValueError, KeyError, TypeError):
        raise InferenceError(f"--threshold-from {path}: not a report.json of python -m eval.folders") from None
    sha = file_sha256(model_path)
    matching = [label for label, model in models.items() if model.get("sha256") == sha]
    if not matching:
        raise InferenceError(f"--threshold-from {path}: measured for {', '.join(sorted(models))}, not for "
                             f"{model_path} (another file: its threshold would not apply; run eval.folders with it)")
    label = matching[0]
    rows = {float(row["far"]): row for row in models[label]["one_to_one"]["tar_at_far"]}
    row = next((value for key, value in rows.items() if abs(key - far) <= 1e-9 * far), None)
    if row is None:
        raise InferenceError(f"--far {far:g}: {path} has thresholds at FAR "
                             f"{', '.join(f'{key:g}' for key in sorted(rows, reverse=True))}")
    impostors = models[label]["one_to_one"]["impostor_pairs"]
    if not row["measurable"] or row["threshold"] is None:
        raise InferenceError(f"--far {far:g}: not measured in {path} ({impostors} impostor pairs measure FAR down to "
                             f"{1 / impostors:.1e}); pick a larger --far or evaluate more people")
    description = (f"measured by eval.folders on your photos ({path}, {label}): at FAR {far:g} it accepted "
                   f"{100 * row['tar']:.2f}% of genuine pairs, FAR reached {row['far_reached']:.2e} over {impostors} "
                   f"impostor pairs")
    return float(row["threshold"]), settings, description


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``tools/inference.py``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="model.pt, a training checkpoint, an .onnx file, or a released name (facenet:vggface2)")
    parser.add_argument("--network", default=None,
                        help="backbone name; default: read from the file (not needed for .onnx)")
    parser.add_argument("--embedding-size", type=int, default=None, help="default: read from the file")
    parser.add_argument("--img", required=True, help="aligned face image")
    parser.add_argument("--img2", default=None, help="second image: print cosine similarity and verdict")
    parser.add_argument("--threshold", type=float, default=None,
                        help=f"cosine threshold for 'same person' (default {DEFAULT_THRESHOLD}: a common starting "
                             f"point for ArcFace models, not fitted to this one)")
    parser.add_argument("--threshold-from", default=None, metavar="REPORT_JSON",
                        help="take the threshold eval.folders measured on your people (with --far)")
    parser.add_argument("--far", type=float, default=None, help="with --threshold-from: the FAR whose threshold to use")
    parser.add_argument("--flip", action="store_true", help="add the mirror image's embedding (flip test)")
    parser.add_argument("--save", default=None, help="save the (first) embedding to this .npy file")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | npu | auto")
    parser.add_argument("--detect", action="store_true",
                        help="raw photos: detect the largest face (MTCNN), then align it (112-style models) or "
                             "crop box + --margin (160x160 facenet models)")
    parser.add_argument("--margin", type=int, default=0, help="--detect crops: margin in output pixels")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Embed one image (or compare two) from the command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    from utils.devices import device as devices
    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    measured = ""  # where a --threshold-from threshold comes from
    try:
        if not -1.0 <= threshold <= 1.0:
            raise InferenceError(f"--threshold must be a cosine similarity in [-1, 1], got {threshold}")
        if args.threshold_from is not None:
            if args.threshold is not None:
                raise InferenceError("--threshold and --threshold-from: give one of them")
            if args.far is None or not 0 < args.far < 1:
                raise InferenceError(f"--threshold-from needs --far, a false accept rate in (0, 1) such as 1e-4, "
                                     f"got {args.far}")
            if not args.img2:
                raise InferenceError("--threshold-from: a threshold needs two images (--img2)")
        elif args.far is not None:
            raise InferenceError("--far is only for --threshold-from REPORT_JSON")
        if args.save:
            from utils.config.paths import ensure_output_file
            ensure_output_file(args.save, "--save")  # checked before the model loads
        device = devices.setup(args.device).device
        loaded = load_model(args.model, args.network, device, args.embedding_size)
        model, args.model = loaded.model, loaded.path  # a registered name is now its cached file
        if args.threshold_from is not None:
            threshold, settings, measured = threshold_from_report(args.threshold_from, args.far, args.model)
            if settings["flip"] != args.flip:
                args.flip = settings["flip"]  # the score must be computed as the threshold's scores were
                measured += f"; flip {'on' if args.flip else 'off'} as in the report"
            if not settings["crops"] and not args.detect:
                measured += "; note: it was measured on detected faces of raw photos (add --detect for raw photos)"
        from backbones.common import input_spec
        size = input_spec(model).image_size  # crops are read at the size the model takes
        paths = [args.img] + ([args.img2] if args.img2 else [])
        warnings, lines = [], []
        if args.detect:
            from utils.faces.mtcnn import MTCNN
            detector = MTCNN()
            read = [detect_face(path, size, detector, args.margin) for path in paths]
        else:
            read = []
            for path in paths:
                image, words, resized = read_frame(path, size)
                read.append((image, words))
                if resized:
                    warnings.append(f"{path} is not a {size[0]}x{size[1]} face crop: the whole photo was resized, "
                                    f"no face was found or aligned; pass --detect for raw photos (or align crops "
                                    f"with tools/align_faces.py)")
        features = [embed(model, image, device, args.flip) for image, _ in read]
        lines = [f"image {index + 1}: {path}: {words}" for index, (path, (_, words)) in enumerate(zip(paths, read))]
        warnings = loaded.warnings + warnings
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(loaded.line)
    print("\n".join(lines))
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    first = features[0]
    if args.save:
        # np.save appends .npy to other names; the temp file + os.replace keeps the write atomic.
        target = args.save if args.save.endswith(".npy") else args.save + ".npy"
        with open(target + ".tmp", "wb") as handle:
            np.save(handle, first.astype(np.float32))
        os.replace(target + ".tmp", target)
        print(f"saved embedding [{first.shape[0]}] to {args.save}")
    if len(features) == 1:
        print(f"embedding: dim {first.shape[0]}, norm {np.linalg.norm(first):.4f}, first values "
              + " ".join(f"{value:.5f}" for value in first[:8]))
        return 0
    similarity = cosine(first, features[1])
    verdict = "same person" if similarity >= threshold else "different people"
    source = ("--threshold" if args.threshold is not None else
              "the default of --threshold, a common starting point for ArcFace models, not fitted to this model: "
              "fit one on your own pairs (python -m eval.verification)")
    print(f"cosine similarity: {similarity:.5f}")
    if measured:
        print(f"verdict at threshold {threshold:.5f} (measured on your people at FAR {args.far:g}): {verdict}")
        print(f"threshold {measured}")
    else:
        print(f"verdict at threshold {threshold:g} ({source}): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
