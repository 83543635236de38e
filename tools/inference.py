"""Embed one aligned face image, or compare two.

    python tools/inference.py --model model.pt --network r50 --img a.jpg [--save a.npy]
    python tools/inference.py --model model.pt --network r50 --img a.jpg --img2 b.jpg --threshold 0.3

Images should be aligned 112x112 crops (see tools/align_faces.py); other sizes are resized, as
arcface_torch's inference.py does. ``--model`` may also be an .onnx file from tools/torch2onnx.py.
The verdict compares the cosine similarity of the L2-normalised embeddings with ``--threshold``;
pick the threshold on your own validation pairs (0.3 is a common starting point for ArcFace models).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402


class InferenceError(ValueError):
    """An unreadable image or bad option; the message is one line."""


def read_face(path: str, image_size: tuple[int, int] = (112, 112)) -> torch.Tensor:
    """uint8 RGB [1, 3, H, W] of an image file, resized to ``image_size`` when needed."""
    import cv2

    if not os.path.isfile(path):
        raise InferenceError(f"{path}: image not found")
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise InferenceError(f"{path}: not a readable image")
    if image.shape[:2] != tuple(image_size):
        image = cv2.resize(image, (image_size[1], image_size[0]))
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]


@torch.no_grad()
def embed(model, image: torch.Tensor, device: torch.device, flip: bool = False) -> np.ndarray:
    """Raw embedding [D] (image + mirror image when ``flip``)."""
    from eval.embed import embed_images
    plain, mirrored = embed_images(model, image, device, batch_size=1, flip=flip)
    feature = plain[0] + mirrored[0] if flip else plain[0]
    return feature.double().numpy()


def cosine(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.dot(first, second) / (np.linalg.norm(first) * np.linalg.norm(second)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model.pt, a training checkpoint, or an .onnx file")
    parser.add_argument("--network", default=None, help="backbone name (not needed for .onnx)")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--img", required=True, help="aligned face image")
    parser.add_argument("--img2", default=None, help="second image: print cosine similarity and verdict")
    parser.add_argument("--threshold", type=float, default=0.3, help="cosine threshold for 'same person'")
    parser.add_argument("--flip", action="store_true", help="add the mirror image's embedding (flip test)")
    parser.add_argument("--save", default=None, help="save the (first) embedding to this .npy file")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | npu | auto")
    args = parser.parse_args(argv)
    from eval.verification import load_model
    from utils import device as devices
    try:
        if not -1.0 <= args.threshold <= 1.0:
            raise InferenceError(f"--threshold must be a cosine similarity in [-1, 1], got {args.threshold}")
        device = devices.setup(args.device).device
        images = [read_face(path) for path in [args.img] + ([args.img2] if args.img2 else [])]
        model = load_model(args.model, args.network, device, args.embedding_size)
        features = [embed(model, image, device, args.flip) for image in images]
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    first = features[0]
    if args.save:
        np.save(args.save, first.astype(np.float32))
        print(f"saved embedding [{first.shape[0]}] to {args.save}")
    if len(features) == 1:
        print(f"embedding: dim {first.shape[0]}, norm {np.linalg.norm(first):.4f}, first values "
              + " ".join(f"{value:.5f}" for value in first[:8]))
        return 0
    similarity = cosine(first, features[1])
    verdict = "same person" if similarity >= args.threshold else "different people"
    print(f"cosine similarity: {similarity:.5f}")
    print(f"verdict at threshold {args.threshold:g}: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
