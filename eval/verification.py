"""Verification sets (lfw.bin, cfp_fp.bin, agedb_30.bin, ...): loading, evaluation, training callback, CLI.

A ``.bin`` is ``pickle.dump((bins, issame_list))``: ``bins`` holds 2N encoded images (JPEG/PNG
``bytes``, or numpy uint8 arrays as cv2.imencode-based packers write), pair i = images 2i and
2i+1. Files are read with a restricted unpickler that can build nothing but lists, tuples,
bytes, bools, ints and numpy uint8 arrays, so a crafted .bin cannot run code.

    python -m eval.verification --model model.pt --network r50 --data-dir DIR --targets lfw,cfp_fp,agedb_30
"""
from __future__ import annotations

import argparse
import codecs
import importlib
import io
import logging
import os
import pickle
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eval.embed import Progress, embed_images, gather_shards  # noqa: E402
from eval.metrics import VerificationResult, verification_metrics  # noqa: E402
from utils.devices.distributed import get_rank, get_world_size, rank0_buffers, shard_bounds  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_TARGETS = ("lfw", "cfp_fp", "agedb_30", "calfw", "cplfw", "cfp_ff", "vgg2_fp")
# Fewer pairs: warn. The 95% interval of an accuracy near 0.5 measured on n pairs is about +-1/sqrt(n) (+-0.05
# at 400), and the 10-fold thresholds are fitted on nine tenths of them: below that a set can read below chance.
MIN_RELIABLE_PAIRS = 400


class VerificationError(ValueError):
    """A verification file or request that cannot be evaluated; the message is one line."""


# ----------------------------------------------------------------------------- restricted unpickling

def _numpy_attr(module_names: tuple[str, ...], name: str) -> Any:
    for module_name in module_names:
        try:
            return getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {name} in {module_names}")


class RefusedContent(pickle.UnpicklingError):
    """Something a verification .bin must not contain (a global or dtype outside the allow-list)."""


_UINT8 = np.dtype(np.uint8)
_ALLOWED_DTYPES = {np.dtype(np.uint8), np.dtype(np.bool_)}


def _safe_dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype:
    if isinstance(spec, bytes):  # Python-2 pickles read with encoding='bytes'
        spec = spec.decode("ascii")
    dtype = np.dtype(spec) if isinstance(spec, str) else None
    if dtype not in _ALLOWED_DTYPES:
        raise RefusedContent(f"numpy dtype {spec!r} (only uint8 arrays and bool scalars are allowed)")
    return dtype


def _safe_frombuffer(buffer: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    if np.dtype(dtype) != _UINT8:
        raise RefusedContent(f"numpy array of dtype {dtype} (only uint8 arrays are allowed)")
    return _numpy_attr(("numpy._core.numeric", "numpy.core.numeric"), "_frombuffer")(buffer, dtype, shape, order)


def _safe_reconstruct(subtype: Any, shape: Any, dtype_code: Any) -> np.ndarray:
    # The real dtype arrives afterwards through ndarray.__setstate__; it is checked after loading.
    if subtype is not np.ndarray:
        raise RefusedContent(f"array subclass {subtype!r} (only numpy.ndarray is allowed)")
    return _numpy_attr(("numpy._core.multiarray", "numpy.core.multiarray"), "_reconstruct")(subtype, shape,
                                                                                           dtype_code)


def _safe_scalar(dtype: Any, data: Any = None) -> Any:
    if np.dtype(dtype) != np.dtype(np.bool_):
        raise RefusedContent(f"numpy scalar of dtype {dtype} (only bool scalars are allowed)")
    return _numpy_attr(("numpy._core.multiarray", "numpy.core.multiarray"), "scalar")(dtype, data)


def _safe_codecs_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Protocol-2 pickles store bytes as _codecs.encode(str, 'latin1'); nothing else is needed.
    if encoding not in ("latin1", "latin-1"):
        raise RefusedContent(f"_codecs.encode with encoding {encoding!r} (only latin1 is allowed)")
    return codecs.encode(text, "latin1")


_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMPY_NUMERIC = ("numpy.core.numeric", "numpy._core.numeric")
_ALLOWED_GLOBALS = {
    ("builtins", "bytearray"): bytearray,
    ("builtins", "bytes"): bytes,
    ("builtins", "bool"): bool,
    ("builtins", "int"): int,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("_codecs", "encode"): _safe_codecs_encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
    **{(module, "_reconstruct"): _safe_reconstruct for module in _NUMPY_CORE},
    **{(module, "scalar"): _safe_scalar for module in _NUMPY_CORE},
    **{(module, "_frombuffer"): _safe_frombuffer for module in _NUMPY_NUMERIC},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a verification .bin needs."""

    def find_class(self, module: str, name: str) -> Any:
        """Only the allow-listed globals a .bin needs; any other is refused (RefusedContent)."""
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedContent(f"refused global '{module}.{name}'") from None


def _unpickle(data: bytes, encoding: str) -> Any:
    return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()


def _image_bytes(entry: Any, path: str, index: int) -> bytes:
    if isinstance(entry, (bytes, bytearray)):
        return bytes(entry)
    if isinstance(entry, np.ndarray):
        if entry.dtype != _UINT8:
            raise VerificationError(f"{path}: image {index} is a numpy array of dtype {entry.dtype}, expected uint8")
        return entry.tobytes()
    raise VerificationError(f"{path}: image {index} is a {type(entry).__name__}, expected encoded image bytes "
                            "(bytes or a numpy uint8 array)")


def read_bin(path: str) -> tuple[list[bytes], np.ndarray]:
    """(encoded images, issame bool array) of a verification .bin, validated; nothing decoded yet."""
    if not os.path.isfile(path):
        raise VerificationError(f"{path}: verification file not found")
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        try:
            content = _unpickle(data, "ASCII")
        except UnicodeDecodeError:  # Python-2 str opcodes: the distributed lfw.bin & co.
            content = _unpickle(data, "bytes")
    except RefusedContent as exc:
        raise VerificationError(f"{path}: not a verification .bin: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise VerificationError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(content, (tuple, list)) or len(content) != 2:
        raise VerificationError(f"{path}: expected a pickled (images, issame_list) pair, found "
                                f"{type(content).__name__}")
    bins, issame_list = content
    if not isinstance(bins, (list, tuple)):
        raise VerificationError(f"{path}: the image list is a {type(bins).__name__}, expected a list")
    if not isinstance(issame_list, (list, tuple, np.ndarray)):
        raise VerificationError(f"{path}: the issame list is a {type(issame_list).__name__}, expected a list")
    issame = []
    for pair, value in enumerate(issame_list):
        if not isinstance(value, (bool, int, np.bool_)) or int(value) not in (0, 1):
            raise VerificationError(f"{path}: issame entry {pair} is {value!r}, expected a bool")
        issame.append(bool(value))
    if len(bins) != 2 * len(issame):
        raise VerificationError(f"{path}: issame list has {len(issame)} pairs, which need {2 * len(issame)} images, "
                                f"but the file holds {len(bins)} images")
    if not issame:
        raise VerificationError(f"{path}: holds no pairs")
    images = [_image_bytes(entry, path, index) for index, entry in enumerate(bins)]
    return images, np.asarray(issame, dtype=bool)


def decode_image(encoded: bytes, image_size: tuple[int, int], path: str = "<bytes>", index: int = 0) -> np.ndarray:
    """Encoded image -> uint8 RGB [H, W, 3] of ``image_size`` (short side resized, centre crop if not square)."""
    image = cv2.imdecode(np.frombuffer(encoded, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise VerificationError(f"{path}: image {index} (pair {index // 2}) is not a decodable image")
    height, width = image_size
    if image.shape[:2] != (height, width):
        scale = max(height / image.shape[0], width / image.shape[1])
        resized = (max(width, round(image.shape[1] * scale)), max(height, round(image.shape[0] * scale)))
        # mxnet's resize_short (insightface's loader) uses bicubic interpolation.
        image = cv2.resize(image, resized, interpolation=cv2.INTER_CUBIC)
        top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
        image = image[top:top + height, left:left + width]
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def decode_images(encoded: list[bytes], image_size: tuple[int, int], path: str = "<bytes>",
                  first_index: int = 0, num_threads: int = 4) -> torch.Tensor:
    """Decode a list of encoded images to a uint8 tensor [N, 3, H, W] RGB (threads: cv2 releases the GIL)."""
    images = torch.empty((len(encoded), 3, image_size[0], image_size[1]), dtype=torch.uint8)

    def work(position: int) -> None:
        rgb = decode_image(encoded[position], image_size, path, first_index + position)
        images[position] = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))

    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        list(pool.map(work, range(len(encoded))))
    return images


def load_bin(path: str, image_size: tuple[int, int] = (112, 112)) -> tuple[torch.Tensor, np.ndarray]:
    """(images uint8 tensor [N, 3, H, W] RGB, issame bool array [N/2]) of a verification .bin."""
    encoded, issame = read_bin(path)
    return decode_images(encoded, tuple(image_size), path), issame


# ----------------------------------------------------------------------------- evaluation

def format_lines(name: str, result: VerificationResult, step: int | None = None, flip_only: bool = False) -> list[str]:
    """insightface's log lines: ``[lfw][2000]XNorm: ...``, ``Accuracy``, ``Accuracy-Flip``."""
    tag = f"[{name}]" if step is None else f"[{name}][{step}]"
    lines = [f"{tag}XNorm: {result.xnorm:f}"]
    if not flip_only:
        lines.append(f"{tag}Accuracy: {result.plain.accuracy:1.5f}+-{result.plain.accuracy_std:1.5f}")
    lines.append(f"{tag}Accuracy-Flip: {result.flip.accuracy:1.5f}+-{result.flip.accuracy_std:1.5f}")
    return lines


class VerificationTarget:
    """One .bin: its issame list and this rank's contiguous shard of decoded images."""

    def __init__(self, name: str, path: str, image_size: tuple[int, int] = (112, 112)) -> None:
        rank, world_size = get_rank(), get_world_size()
        encoded, self.issame = read_bin(path)
        self.name, self.path, self.num_images = name, path, len(encoded)
        if world_size > self.num_images:
            raise VerificationError(f"{path}: {self.num_images} images cannot be sharded over {world_size} ranks")
        start, end = shard_bounds(self.num_images, world_size)[rank]
        stored = cv2.imdecode(np.frombuffer(encoded[start], dtype=np.uint8), cv2.IMREAD_COLOR)
        if stored is not None and stored.shape[:2] != tuple(image_size) and rank == 0:
            # e.g. a 112x112 lfw.bin for a 160x160 model (inception_resnet_v1): said once per target
            logger.info("%s: images are %dx%d, decoding them at %dx%d (bicubic, as mxnet's resize_short)", path,
                        stored.shape[0], stored.shape[1], image_size[0], image_size[1])
        self.local_images = decode_images(encoded[start:end], image_size, path, first_index=start)
        too_small = small_set_warning(path, len(self.issame))
        if too_small and rank == 0:
            logger.warning(too_small)

    @torch.no_grad()
    def evaluate(self, model: Any, device: torch.device, batch_size: int = 256,
                 show_progress: bool = False) -> VerificationResult:
        """Collective under torch.distributed: embeds the local shard, gathers, computes metrics on every rank."""
        rank, world_size = get_rank(), get_world_size()
        progress = Progress(self.local_images.shape[0], self.name, show_progress and rank == 0)
        local, local_flipped = embed_images(model, self.local_images, device, batch_size, True, progress)
        embeddings = gather_shards(local, self.num_images, device)
        flipped = gather_shards(local_flipped, self.num_images, device)
        return verification_metrics(embeddings.numpy(), flipped.numpy(), self.issame)


def small_set_warning(path: str, num_pairs: int, num_folds: int = 10) -> str:
    """The warning for a verification set too small to give a meaningful accuracy ("" when it is not)."""
    if num_pairs >= MIN_RELIABLE_PAIRS:
        return ""
    return (f"{path}: only {num_pairs} pairs, about {num_pairs // num_folds} per fold of {num_folds}: its accuracy is "
            f"uncertain by about +-{1.96 * 0.5 / num_pairs ** 0.5:.2f} and can come out below chance (0.5); "
            f"use at least {MIN_RELIABLE_PAIRS} pairs for a number to compare (lfw.bin has 6000)")


def target_path(data_dir: str, target: str) -> str:
    """``<data_dir>/<target>.bin``."""
    return os.path.join(data_dir, f"{target}.bin")


class VerificationCallback:
    """Runs the verification targets during training (every rank calls it; the work is sharded).

    It scores the model rank 0 saves: every rank embeds its shard with rank 0's BatchNorm statistics
    (``rank0_buffers``), and keeps its own for training."""

    def __init__(self, targets: list[str], data_dir: str, batch_size: int = 256,
                 image_size: tuple[int, int] = (112, 112)) -> None:
        if isinstance(targets, str):
            targets = [targets]
        self.batch_size = int(batch_size)
        if self.batch_size <= 0:
            raise VerificationError(f"val_batch_size must be a positive integer, got {batch_size}")
        self.targets = [VerificationTarget(name, target_path(data_dir, name), tuple(image_size)) for name in targets]
        self.highest = {target.name: 0.0 for target in self.targets}
        # rank 0: the last evaluation's pair scores (cosine) and genuine flags per target, for TensorBoard
        self.score_histograms: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        rank = get_rank()
        if rank == 0:
            for target in self.targets:
                logger.info("verification target %s: %d pairs from %s", target.name, len(target.issame), target.path)

    @torch.no_grad()
    def __call__(self, step: int, backbone: nn.Module, device: torch.device) -> dict[str, float]:
        rank = get_rank()
        was_training = backbone.training
        backbone.eval()
        results: dict[str, float] = {}
        try:
            with rank0_buffers(backbone):
                for target in self.targets:
                    result = target.evaluate(backbone, device, self.batch_size)
                    self.highest[target.name] = max(self.highest[target.name], result.flip.accuracy)
                    if rank == 0:
                        self.score_histograms[target.name] = (result.pair_scores, target.issame)
                        for line in format_lines(target.name, result, step, flip_only=True):
                            logger.info(line)
                        logger.info("[%s][%d]Accuracy-Highest: %1.5f", target.name, step, self.highest[target.name])
                    results[f"{target.name}/accuracy_flip"] = result.flip.accuracy
                    results[f"{target.name}/best"] = self.highest[target.name]
                    results[f"{target.name}/xnorm"] = result.xnorm
        finally:
            backbone.train(was_training)
        return results


# ----------------------------------------------------------------------------- command line

def format_table(rows: list[tuple[str, int, VerificationResult]]) -> list[str]:
    """The summary table; VAL@FAR=1e-3 comes with the FAR its fitted thresholds actually reached on the
    test folds (a collapsed model shows VAL 1.0 at FAR 1.0, not a perfect score)."""
    header = ["target", "pairs", "XNorm", "Accuracy", "Accuracy-Flip", "VAL@FAR=1e-3", "FAR reached"]
    table = [header] + [[name, str(pairs), f"{result.xnorm:.4f}",
                         f"{result.plain.accuracy:.5f}+-{result.plain.accuracy_std:.5f}",
                         f"{result.flip.accuracy:.5f}+-{result.flip.accuracy_std:.5f}",
                         f"{result.flip.val:.5f}", f"{result.flip.far:.2e}"] for name, pairs, result in rows]
    widths = [max(len(line[column]) for line in table) for column in range(len(header))]
    # Target names left-aligned, numbers right-aligned, every column as wide as its longest cell.
    return [" ".join([line[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(line[1:], widths[1:])])
            for line in table]


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m eval.verification``."""
    parser = argparse.ArgumentParser(prog="python -m eval.verification",
                                     description="Evaluate a model on insightface verification .bin files.")
    parser.add_argument("--model", required=True,
                        help="model.pt, a training checkpoint, an .onnx file, or a released name (facenet:vggface2)")
    parser.add_argument("--network", default=None,
                        help="backbone name (r18..r200, mbf, vit_*); default: read from the file; not for .onnx")
    parser.add_argument("--embedding-size", type=int, default=None, help="default: read from the file")
    parser.add_argument("--data-dir", required=True, help="folder holding <target>.bin files")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS[:5]),
                        help="comma-separated stems of <data-dir>/<target>.bin (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="decode size (default: the model's input size, e.g. 160 160 for inception_resnet_v1)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | npu")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--plot", nargs="?", const="verification_plots", default=None, metavar="DIR",
                        help="write <target>_roc.png and <target>_scores.png into DIR (default verification_plots; "
                             "needs matplotlib)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Evaluate a model on verification .bin files and print the table; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from utils.devices import device as devices
    try:
        ctx = devices.setup(args.device)
        targets = [name.strip() for name in args.targets.split(",") if name.strip()]
        missing = [target_path(args.data_dir, name) for name in targets
                   if not os.path.isfile(target_path(args.data_dir, name))]
        if missing:
            raise VerificationError(f"{missing[0]}: verification file not found (target stems: {', '.join(targets)})")
        if args.batch_size <= 0:
            raise VerificationError(f"--batch-size must be positive, got {args.batch_size}")
        from eval.model_info import load_model
        loaded = load_model(args.model, args.network, ctx.device, args.embedding_size)
        model = loaded.model
        if ctx.is_main:
            loaded.announce()
        from backbones.common import input_spec
        image_size = tuple(args.image_size) if args.image_size else input_spec(model).image_size
        rows = []
        for name in targets:
            target = VerificationTarget(name, target_path(args.data_dir, name), image_size)
            result = target.evaluate(model, ctx.device, args.batch_size, show_progress=not args.no_progress)
            if ctx.is_main:
                print("\n".join(format_lines(name, result)), flush=True)
                if args.plot:
                    from eval.plots import pair_pictures
                    for path in pair_pictures(args.plot, name, result.pair_scores, target.issame, name):
                        print(f"picture: {path}", flush=True)
            rows.append((name, len(target.issame), result))
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if ctx.is_main:
        print()
        print("\n".join(format_table(rows)))
    devices.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
