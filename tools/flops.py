"""Parameters and GFLOPs of a backbone, in insightface's convention (multiply-accumulates).

    python tools/flops.py r50 mbf vit_t        # or: python -m tools.flops --all

Counts one image at the model's own input size (``backbones.input_spec``: 112x112 for insightface's
networks, 160x160 for inception_resnet_v1) the way the published arcface_torch tables (made with
ptflops) do: multiply-accumulates of every Conv2d and Linear (forward hooks), the QK^T and attn@V
products inside ViT attention, plus one op per element for bias, PReLU/ReLU/ReLU6 and two for affine
BatchNorm/LayerNorm (these matter only for MobileFaceNet: 0.438 -> 0.449). Pooling, concatenation
and residual adds are not counted. Models are built on the "meta" device, so counting r200 or vit_l
takes a second and no memory.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from backbones import MODEL_NAMES, get_model, input_spec  # noqa: E402
from backbones.vit import Attention  # noqa: E402


def count_parameters(model: nn.Module) -> int:
    """All parameters, trainable or not (the fixed features-BN scale included, as published)."""
    return sum(param.numel() for param in model.parameters())


def count_ops(model: nn.Module, image_size: tuple[int, int] | None = None) -> dict[str, int]:
    """Ops of one forward pass on one image (eval mode: no token masking), split by kind.

    ``image_size`` defaults to the model's input size. Runs on the model's device; a model on
    "meta" only propagates shapes.
    """
    image_size = tuple(image_size or input_spec(model).image_size)
    counts = {"conv_linear": 0, "attention": 0, "elementwise": 0}

    def hook(module: nn.Module, inputs, output) -> None:
        if isinstance(module, nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            counts["conv_linear"] += output.numel() * (module.in_channels // module.groups) * kernel
        elif isinstance(module, nn.Linear):
            counts["conv_linear"] += output.numel() * module.in_features
        elif isinstance(module, Attention):
            counts["attention"] += module.matmul_macs(*inputs[0].shape)
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
            counts["elementwise"] += output.numel()
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
            affine = getattr(module, "affine", None) or getattr(module, "elementwise_affine", False)
            counts["elementwise"] += output.numel() * (2 if affine else 1)
        elif isinstance(module, (nn.PReLU, nn.ReLU, nn.ReLU6)):
            counts["elementwise"] += output.numel()

    handles = [module.register_forward_hook(hook) for module in model.modules()]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *image_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return counts


def count_macs(model: nn.Module, image_size: tuple[int, int] | None = None) -> int:
    """Total ops of one image in insightface's GFLOPs convention (see the module docstring)."""
    return sum(count_ops(model, image_size).values())


def build_on_meta(name: str, **kwargs) -> nn.Module:
    """The model with shapes only (no memory, no init cost): enough for counting."""
    with torch.device("meta"):
        return get_model(name, **kwargs)


def main(argv: list[str] | None = None) -> None:
    """Print parameters and GFLOPs of the named networks."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("networks", nargs="*", help=f"model names: {', '.join(MODEL_NAMES)}")
    parser.add_argument("--all", action="store_true", help="every registered model")
    parser.add_argument("--num-features", type=int, default=512, help="embedding size (default 512)")
    args = parser.parse_args(argv)
    names = list(MODEL_NAMES) if args.all else args.networks
    if not names:
        parser.error("name at least one network, or pass --all")
    unknown = [name for name in names if name not in MODEL_NAMES]
    if unknown:
        parser.error(f"unknown network(s) {', '.join(unknown)}; valid names: {', '.join(MODEL_NAMES)}")
    print(f"{'network':<22}{'params (M)':>12}{'GFLOPs (MACs)':>16}{'input':>10}")
    for name in names:
        model = build_on_meta(name, num_features=args.num_features)
        height, width = input_spec(model).image_size
        print(f"{name:<22}{count_parameters(model) / 1e6:>12.2f}{count_macs(model) / 1e9:>16.3f}"
              f"{f'{height}x{width}':>10}")


if __name__ == "__main__":
    main()
