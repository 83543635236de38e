"""tools/flops.py against insightface's published GFLOPs table (and a hand count for inception_resnet_v1)."""
import json
import math
import os

import pytest
import torch

from backbones import get_model
from tools import flops

PUBLISHED_GFLOPS = {"r18": 2.6, "r50": 6.3, "r100": 12.1, "r200": 23.5, "mbf": 0.45,
                    "vit_t": 1.5, "vit_s": 5.7, "vit_b": 11.4, "vit_l": 25.3}


@pytest.mark.parametrize("name, published", sorted(PUBLISHED_GFLOPS.items()))
def test_within_two_percent_of_published(name, published):
    gflops = flops.count_macs(flops.build_on_meta(name)) / 1e9
    assert abs(gflops - published) / published < 0.02, gflops


def test_real_model_counts_like_meta():
    torch.manual_seed(0)
    real = get_model("mbf")
    assert flops.count_ops(real) == flops.count_ops(flops.build_on_meta("mbf"))
    assert real.training  # counting does not leave the model in eval mode


def test_breakdown_by_kind():
    ops = flops.count_ops(flops.build_on_meta("vit_t"))
    # 12 blocks x (QK^T + attn@V) = 12 * 2 * 144^2 * 256 multiply-accumulates.
    assert ops["attention"] == 12 * 2 * 144 * 144 * 256
    assert flops.count_ops(flops.build_on_meta("r18"))["attention"] == 0


def test_cli_prints_params_and_gflops(capsys):
    flops.main(["r50", "mbf"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["network", "params", "(M)", "GFLOPs", "(MACs)", "input"]
    for line, name, published in zip(lines[1:], ("r50", "mbf"), (6.3, 0.45)):
        network, params, gflops, size = line.split()
        assert (network, size) == (name, "112x112")
        # insightface publishes 6.3 (r50) and 0.45 (mbf, "mobilefacenet-0.45G"): equal at that precision.
        decimals = len(str(published).split(".")[1])
        assert round(float(gflops), decimals) == published
        # parameters of the real model, counted here without tools/flops.py
        assert float(params) == round(sum(p.numel() for p in get_model(name).parameters()) / 1e6, 2)


def test_cli_unknown_network(capsys):
    with pytest.raises(SystemExit):
        flops.main(["r51"])
    assert "unknown network(s) r51; valid names: r18" in capsys.readouterr().err


# Output side of every layer of inception_resnet_v1 for a 160x160 input, worked out by hand from the
# architecture (a valid 3x3 conv or 3x3/2 pool maps n -> (n - 3) // stride + 1; padded convs keep n):
# 160 -3x3/2-> 79 -3x3-> 77 -3x3 pad-> 77 -pool/2-> 38 -1x1-> 38 -3x3-> 36 -3x3/2-> 17 (blocks A)
# -reduction A-> 8 (blocks B) -reduction B-> 3 (blocks C). Longest prefix first.
IRV1_SIDES = [("conv2d_1a", 79), ("conv2d_2a", 77), ("conv2d_2b", 77), ("conv2d_3b", 38), ("conv2d_4a", 36),
              ("conv2d_4b", 17), ("repeat_1", 17), ("mixed_6a.branch0", 8), ("mixed_6a.branch1.2", 8),
              ("mixed_6a.branch1", 17), ("repeat_2", 8), ("mixed_7a.branch0.1", 3), ("mixed_7a.branch1.1", 3),
              ("mixed_7a.branch2.2", 3), ("mixed_7a", 8), ("repeat_3", 3), ("block8", 3), ("last_linear", 1)]


def test_inception_resnet_v1_conv_linear_macs_match_a_hand_count(facenet_fixtures):
    # facenet-pytorch publishes no FLOPs figure: count MACs = weight elements x output positions from the
    # reference's own key/shape list (tests/fixtures/facenet/expected.json), not from our modules.
    with open(os.path.join(facenet_fixtures, "expected.json")) as handle:
        keys = json.load(handle)["inception_resnet_v1"]["keys"]

    def side(key):
        return next(n for prefix, n in IRV1_SIDES if key.startswith(prefix + "."))

    weights = [(key, shape) for key, shape in keys if key.endswith(".weight") and len(shape) >= 2]
    assert len(weights) == 133  # stem 6, 5 x 7 (A), 4, 10 x 5 (B), 7, 6 x 5 (C), the embedding linear
    hand = sum(math.prod(shape) * side(key) ** 2 for key, shape in weights)
    model = flops.build_on_meta("inception_resnet_v1")
    ops = flops.count_ops(model)  # at the model's own 160x160
    assert ops["conv_linear"] == hand == 1_417_662_304
    assert ops["attention"] == 0
    assert round(flops.count_parameters(model) / 1e6, 2) == 23.48
