"""Export MTCNN's three networks to ONNX and check them against torch with onnxruntime.

    python tools/mtcnn2onnx.py OUT_DIR                 # OUT_DIR/pnet.onnx, rnet.onnx, onet.onnx
    python tools/mtcnn2onnx.py OUT_DIR --weights-dir utils/faces/mtcnn_weights --opset 17 --no-verify

PNet takes any batch, height and width; RNet and ONet any batch (inputs and outputs: utils/faces/mtcnn_onnx.py).
Detection with them: ``MTCNN.from_onnx(OUT_DIR)`` (utils/faces/mtcnn.py) or ``tools/detect_faces.py --onnx
OUT_DIR``. Needs the optional extras onnx and onnxruntime.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from utils.devices import compat  # noqa: E402
from utils.faces.mtcnn_nets import WEIGHTS_DIR, MTCNNError, load_net  # noqa: E402
from utils.faces.mtcnn_onnx import INPUT_NAME, OUTPUTS  # noqa: E402

CROP_SIZES = {"rnet": 24, "onet": 48}
# input sizes the check runs PNet at: odd and even sides (ceil-mode pooling), the smallest input, a wide one
PNET_CHECK_SIZES = ((1, 12, 12), (2, 37, 50), (1, 101, 64), (3, 64, 257))


class _PNetHeads(nn.Module):
    """PNet's ``plain_heads`` as the module's forward, for the exporter."""

    def __init__(self, pnet: nn.Module) -> None:
        super().__init__()
        self.pnet = pnet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pnet.plain_heads(x)


def _exportable(name: str, weights_dir: str) -> tuple[nn.Module, torch.Tensor, dict]:
    """The module to trace, a sample input and its dynamic axes."""
    net = load_net(name, weights_dir)
    if name == "pnet":
        axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, "heads": {0: "batch", 1: "rows", 2: "columns"}}
        return _PNetHeads(net).eval(), torch.zeros(2, 3, 37, 50), axes
    size = CROP_SIZES[name]
    return net, torch.zeros(2, 3, size, size), {key: {0: "batch"} for key in (INPUT_NAME, *OUTPUTS[name])}


def export_mtcnn(out_dir: str, weights_dir: str = WEIGHTS_DIR, opset: int = 17) -> list[str]:
    """Write pnet.onnx, rnet.onnx and onet.onnx into ``out_dir``; their paths."""
    try:
        import onnx
    except ImportError:
        raise MTCNNError("ONNX export needs the optional extra onnx (pip install onnx onnxruntime)") from None
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name in ("pnet", "rnet", "onet"):
        module, sample, axes = _exportable(name, weights_dir)
        path = os.path.join(out_dir, f"{name}.onnx")
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter is "legacy" in torch 2.9+; tracer notes
            try:
                torch.onnx.export(module, sample, path, input_names=[INPUT_NAME], output_names=list(OUTPUTS[name]),
                                  dynamic_axes=axes, opset_version=opset, do_constant_folding=True,
                                  **compat.onnx_export_kwargs())
            except Exception as exc:  # exporter errors are long multi-line messages
                raise MTCNNError(f"{path}: torch.onnx.export failed for {name}: "
                                 f"{str(exc).strip().splitlines()[0]}") from None
        proto = onnx.load(path)
        proto.producer_name = "arcscale"
        entry = proto.metadata_props.add()
        entry.key, entry.value = "preprocess", "x = (pixel_rgb - 127.5) / 128, NCHW float32"
        onnx.checker.check_model(proto)
        onnx.save(proto, path)
        paths.append(path)
    return paths


def verify_mtcnn(out_dir: str, weights_dir: str = WEIGHTS_DIR, seed: int = 0) -> dict[str, float]:
    """Max |onnxruntime - torch| per network on random inputs of several sizes (PNet against its fast
    ``heads``, the path the detector runs); MTCNNError when any exceeds 1e-4."""
    from utils.faces.mtcnn_onnx import load_onnx_nets

    onnx_nets = dict(zip(("pnet", "rnet", "onet"), load_onnx_nets(out_dir)))
    generator = torch.Generator().manual_seed(seed)
    report = {}
    for name in ("pnet", "rnet", "onet"):
        net = load_net(name, weights_dir)
        shapes = PNET_CHECK_SIZES if name == "pnet" else ((1,) + (CROP_SIZES[name],) * 2, (7,) + (CROP_SIZES[name],) * 2)
        worst = 0.0
        for batch, height, width in shapes:
            x = torch.rand(batch, 3, height, width, generator=generator) * 2 - 1
            with torch.no_grad():
                expected = (net.heads(x),) if name == "pnet" else net(x)
            got = (onnx_nets[name].heads(x),) if name == "pnet" else onnx_nets[name](x)
            for want, have in zip(expected, got):
                if tuple(want.shape) != tuple(have.shape):
                    raise MTCNNError(f"{out_dir}/{name}.onnx: output shape {tuple(have.shape)} for input "
                                     f"{[batch, 3, height, width]}, torch gives {tuple(want.shape)}")
                worst = max(worst, float(np.abs(want.numpy() - have.numpy()).max()))
        report[name] = worst
        if worst > 1e-4:
            raise MTCNNError(f"{out_dir}/{name}.onnx: onnxruntime differs from torch by {worst:.3g} (tolerance 1e-4)")
    return report


def main(argv: list[str] | None = None) -> int:
    """Export the three networks and check them; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder for pnet.onnx, rnet.onnx, onet.onnx")
    parser.add_argument("--weights-dir", default=WEIGHTS_DIR, help="pnet.pt, rnet.pt, onet.pt (default: shipped)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    args = parser.parse_args(argv)
    try:
        if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
            raise MTCNNError(f"{args.out_dir}: exists and is not a folder (expected the output folder)")
        for path in export_mtcnn(args.out_dir, args.weights_dir, args.opset):
            print(f"exported {path}")
        report = {} if args.no_verify else verify_mtcnn(args.out_dir, args.weights_dir)
        print("".join(f"{name}: max abs diff onnxruntime vs torch {worst:.2e}\n" for name, worst in report.items())
              + ("verified: outputs match within 1e-4" if report else "not verified (--no-verify)"))
        return 0
    except (MTCNNError, OSError) as exc:  # one line, exit 2, as the other tools
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
