"""tools/weights.py list | fetch NAME | info NAME_OR_FILE, and --model NAME in tools/inference.py."""
import os

import pytest
import torch

from backbones import get_model
from tests.utils.weights.test_fetch import served  # noqa: F401  (the local HTTP server fixture)
from tools.weights import main
from utils.weights.registry import REGISTRY

pytestmark = pytest.mark.usefixtures("one_thread")


def test_list_names_every_entry_and_whether_it_is_cached(served, capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(REGISTRY)
    vgg = next(line for line in lines if line.startswith("facenet:vggface2 "))
    assert "inception_resnet_v1" in vgg and "download" in vgg and "not cached" in vgg and "LFW 0.9965" in vgg
    assert "by hand" in next(line for line in lines if line.startswith("insightface:ms1mv3_r50 "))


def test_fetch_then_info_of_the_name(served, capsys):
    assert main(["fetch", "facenet:test"]) == 0
    path = str(served["cache"] / "facenet" / "test" / "test.pt")
    captured = capsys.readouterr()
    assert captured.out.strip() == path and "downloading facenet:test" in captured.err
    assert main(["info", "facenet:test"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("facenet:test: network 'tiny', embedding size 16\n") and f"  file: {path} (cached)" in out
    assert main(["fetch", "facenet:nope"]) == 2
    assert capsys.readouterr().err == "error: 'facenet:nope' is not a registered name (python tools/weights.py list)\n"


def test_info_of_a_file_says_network_sizes_classifier_and_training(tmp_path, capsys):
    torch.manual_seed(0)
    model = get_model("inception_resnet_v1", num_classes=10)
    path = tmp_path / "irv1.pt"
    torch.save(model.state_dict(), path)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:5] == [f"{path}: network 'inception_resnet_v1' (matched by keys and shapes)", "  embedding size: 512",
                       "  input: 160x160 RGB, (x - 127.5) / 128", "  classifier: 10 classes (logits.*)",
                       f"  BatchNorm: 0 of {out[4].split(' of ')[1].split()[0]} layers moved from their initial "
                       f"statistics (untrained)"]
    assert main(["info", str(tmp_path / "missing.pt")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing.pt'}: checkpoint file not found\n"


def test_inference_takes_a_registered_name(served, facenet_fixtures, capsys):
    from tools.inference import main as inference

    crop = os.path.join(facenet_fixtures, "crops", "kate_siegel_0_s112_m0.png")
    assert inference(["--model", "facenet:test", "--img", crop]) == 0
    path = served["cache"] / "facenet" / "test" / "test.pt"
    assert capsys.readouterr().out.startswith(f"model: {path} (registered name 'facenet:test', its cached file; "
                                              f"backbone state_dict): network 'tiny' (read from the file), "
                                              f"embedding size 16")


def test_the_pretrained_weights_page_lists_every_name_with_its_network():
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "weights.md")) as page:
        text = page.read()
    for entry in REGISTRY.values():
        assert f"| `{entry.name}` | `{entry.network}` |" in text, entry.name


def test_the_evaluation_and_export_clis_take_a_registered_name(served, tmp_path, monkeypatch, capsys):
    from eval.model_info import load_model
    from tools.torch2onnx import main as export

    loaded = load_model("facenet:test", None, torch.device("cpu"))
    model = loaded.model
    assert loaded.line.startswith(f"model: {loaded.path} (registered name 'facenet:test', its cached file; backbone "
                                  f"state_dict): network 'tiny' (read from the file), embedding size 16")
    assert os.path.isfile(loaded.path) and type(model).__name__ == "TinyFaceNet" and model.features.num_features == 16
    monkeypatch.chdir(tmp_path)
    assert export(["facenet:test", "--no-verify"]) == 0
    assert (tmp_path / "test.onnx").is_file() and "exported tiny to test.onnx" in capsys.readouterr().out
