"""tools/flops.py against insightface's published GFLOPs table."""
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
    flops.main(["r18", "mbf"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["network", "params", "(M)", "GFLOPs", "(MACs)"]
    assert lines[1].split() == ["r18", "24.03", "2.623"]
    assert lines[2].split()[:2] == ["mbf", "2.06"]


def test_cli_unknown_network(capsys):
    with pytest.raises(SystemExit):
        flops.main(["r51"])
    assert "unknown network(s) r51; valid names: r18" in capsys.readouterr().err
