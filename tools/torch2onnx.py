"""Export a backbone to ONNX and check it against PyTorch with onnxruntime.

    python tools/torch2onnx.py work_dirs/ms1mv3_r50/model.pt --network r50 --output r50.onnx
    python tools/torch2onnx.py work_dirs/ms1mv3_r50/checkpoint_step000002000.pt   # network from its config

The model takes input ``data``: float32 [N, 3, H, W], RGB, ``(pixel - mean) / std`` with the
network's own convention (112x112, 127.5/127.5 for insightface's networks; 160x160, 127.5/128 for
inception_resnet_v1), any batch size N; it returns ``embedding``: float32 [N, 512] (not normalised).
These conventions are written into the file's metadata_props (input_height, input_width, input_mean,
input_std), where eval.embed.OnnxEmbedder reads them back. Needs the optional extras onnx and onnxruntime.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from backbones.common import ARCFACE_INPUT, InputSpec, declared_input_spec, normalize  # noqa: E402
from utils.devices import compat  # noqa: E402

logger = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "data", "embedding"


class ExportError(RuntimeError):
    """The export or its verification failed; the message is one line."""


def sample_inputs(image_size: tuple[int, int] = (112, 112), seed: int = 0,
                  spec: InputSpec | None = None) -> dict[str, torch.Tensor]:
    """A uniform-noise batch and a "real-looking" batch (smooth blobs with face-like pixel statistics),
    the latter normalised with ``spec`` (a backbones.InputSpec; default insightface's)."""
    import cv2

    rng = np.random.default_rng(seed)
    height, width = image_size
    noise = torch.from_numpy(rng.uniform(-1, 1, size=(2, 3, height, width)).astype(np.float32))
    smooth = []
    for _ in range(3):
        image = rng.normal(128, 60, size=(height, width, 3)).astype(np.float32)
        image = np.clip(cv2.GaussianBlur(image, (0, 0), 6) * 3 - 256, 0, 255).round()
        smooth.append(image.transpose(2, 0, 1))
    pixels = torch.from_numpy(np.stack(smooth).astype(np.uint8))
    base = spec or ARCFACE_INPUT
    real = normalize(pixels, InputSpec(tuple(image_size), base.mean, base.std))
    return {"random": noise, "real-looking": real}


def model_input_spec(model: nn.Module, image_size: tuple[int, int] | None = None,
                     network: str = "unknown") -> InputSpec:
    """The model's input convention (``backbones.input_spec``). An explicit ``image_size`` must agree with a
    declared one; a model that declares none gets insightface's mean/std at ``image_size`` (default 112)."""
    spec = declared_input_spec(model)
    if spec is None:
        return InputSpec(tuple(image_size or ARCFACE_INPUT.image_size), ARCFACE_INPUT.mean, ARCFACE_INPUT.std)
    if image_size is not None and tuple(image_size) != spec.image_size:
        raise ExportError(f"--image-size {image_size[0]} {image_size[1]} does not match network '{network}', "
                          f"which takes {spec.describe()}")
    return spec


def export_onnx(model: nn.Module, output: str, network: str = "unknown", image_size: tuple[int, int] | None = None,
                opset: int = 17) -> None:
    """TorchScript-based export (needs no onnxscript) with a dynamic batch axis and preprocessing metadata."""
    try:
        import onnx
    except ImportError as exc:
        raise ExportError("ONNX export needs the optional extra onnx (pip install onnx onnxruntime)") from exc
    spec = model_input_spec(model, image_size, network)
    image_size = spec.image_size
    model = model.eval()
    dummy = torch.zeros(1, 3, *image_size)
    with torch.no_grad():
        embedding_size = int(model(dummy).shape[1])
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is "legacy" in torch 2.9+
        try:
            torch.onnx.export(model, dummy, output, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              opset_version=opset, do_constant_folding=True, **compat.onnx_export_kwargs())
        except Exception as exc:  # exporter errors are long multi-line messages
            raise ExportError(f"{output}: torch.onnx.export failed for network '{network}': "
                              f"{str(exc).strip().splitlines()[0]}") from exc
    proto = onnx.load(output)
    metadata = {"arcscale.network": network, "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
                "input_shape": f"N,3,{image_size[0]},{image_size[1]}", "input_color": "RGB",
                **spec.to_metadata(),
                "preprocess": f"x = (pixel_rgb - {spec.mean:g}) / {spec.std:g}, NCHW float32",
                "embedding_size": str(embedding_size), "embedding_normalized": "false"}
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "arcscale"
    onnx.checker.check_model(proto)
    onnx.save(proto, output)


def _l2_normalize(values: np.ndarray) -> np.ndarray:
    return values / np.maximum(np.linalg.norm(values, axis=1, keepdims=True), 1e-12)


def verify_onnx(model: nn.Module, output: str, image_size: tuple[int, int] | None = None,
                tolerance: float = 1e-4) -> dict[str, dict[str, float]]:
    """Compare onnxruntime with PyTorch on a random and a real-looking batch.

    Per input kind: ``raw`` = max |difference| of the raw embeddings, ``scale`` = max |PyTorch output|,
    ``normalized`` = max |difference| of the L2-normalised embeddings (what cosine scores use).
    Raises ExportError unless ``normalized < tolerance`` and ``raw < tolerance * max(1, scale)`` (float32
    round-off grows with the output magnitude; untrained nets can output 1e-6 or 1e+2).
    """
    try:
        import onnxruntime
    except ImportError as exc:
        raise ExportError("verification needs the optional extra onnxruntime (pip install onnxruntime)") from exc
    session = onnxruntime.InferenceSession(output, providers=["CPUExecutionProvider"])
    spec = model_input_spec(model, image_size)
    model = model.eval()
    report = {}
    for kind, batch in sample_inputs(spec.image_size, spec=spec).items():
        with torch.no_grad():
            expected = model(batch).float().numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0]
        if got.shape != expected.shape:
            raise ExportError(f"{output}: onnxruntime output shape {got.shape} != PyTorch {expected.shape}")
        raw = float(np.abs(got - expected).max())
        scale = float(np.abs(expected).max())
        normalized = float(np.abs(_l2_normalize(got.astype(np.float64)) - _l2_normalize(expected.astype(np.float64))).max())
        report[kind] = {"raw": raw, "scale": scale, "normalized": normalized}
        if not (normalized < tolerance and raw < tolerance * max(1.0, scale)):
            raise ExportError(f"{output}: onnxruntime differs from PyTorch on the {kind} batch: max abs diff "
                              f"{raw:.3g} (outputs up to {scale:.3g}), {normalized:.3g} after L2 normalisation "
                              f"(tolerance {tolerance:g})")
    return report


def main(argv: list[str] | None = None) -> int:
    """Export a backbone to ONNX and check it against torch; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="model.pt (bare backbone state_dict), a training checkpoint, or a "
                                           "released name (facenet:vggface2)")
    parser.add_argument("--network", default=None,
                        help="backbone name, e.g. r50, r100, mbf, vit_t; default: read from the file")
    parser.add_argument("--output", default=None, help="output .onnx (default: next to the checkpoint)")
    parser.add_argument("--embedding-size", type=int, default=None, help="default: read from the file")
    parser.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="input size; default and only accepted value: the network's own")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference allowed (default 1e-4)")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    args = parser.parse_args(argv)
    from utils.weights.load import load_backbone_file
    from utils.weights.registry import is_registry_name, lookup
    released = lookup(args.checkpoint)  # a released name: the .onnx goes to the working folder
    output = args.output or (os.path.splitext(released.file_name if released else args.checkpoint)[0] + ".onnx")
    try:
        if is_registry_name(args.checkpoint):
            from utils.weights.resolve import resolve_weights
            args.checkpoint = resolve_weights(args.checkpoint, "checkpoint")
        if args.checkpoint.endswith(".onnx"):
            raise ExportError(f"{args.checkpoint}: already an ONNX model; pass a PyTorch checkpoint")
        from utils.config.paths import ensure_output_file
        ensure_output_file(output, "--output")  # before the slow export: a bad path fails in one line
        model, network, _ = load_backbone_file(args.checkpoint, args.network, args.embedding_size)
        spec = model_input_spec(model, args.image_size, network)
        image_size = spec.image_size
        export_onnx(model, output, network, image_size, args.opset)
        print(f"exported {network} to {output} (input '{INPUT_NAME}' [N,3,{image_size[0]},"
              f"{image_size[1]}] RGB (x-{spec.mean:g})/{spec.std:g}, output '{OUTPUT_NAME}', opset {args.opset})")
        if not args.no_verify:
            report = verify_onnx(model, output, image_size, args.tolerance)
            for kind, values in report.items():
                print(f"max abs diff onnxruntime vs PyTorch ({kind} input): {values['raw']:.3e} "
                      f"(outputs up to {values['scale']:.3g}); L2-normalised: {values['normalized']:.3e}")
            print(f"verified: outputs match within {args.tolerance:g}")
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
