"""eval/model_info.py: every evaluation CLI (eval.verification, eval.ijb, eval.folders) says which weights it
evaluates (file, where it came from, network, embedding and input size) before its numbers, with the same
warnings as tools/inference.py for the demo's tiny network and for untrained weights."""
import os

import pytest
import torch

from backbones import get_model
from eval import folders, ijb, verification
from tests.test_folders import write_crops
from tests.test_ijb import make_layout
from utils.run.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, atomic_save

pytestmark = pytest.mark.usefixtures("one_thread")

LINE = "network 'tiny' (read from the file), embedding size 24, input 112x112 RGB, pixels (x - 127.5) / 127.5"
UNTRAINED = ("warning: the weights look untrained: all 6 BatchNorm layers still hold their initial statistics "
             "(mean 0, variance 1): the weights never saw training data")
TINY = ("warning: network 'tiny' is ArcScale's small CPU demo network, trained on generated faces: its answers on "
        "real photos mean little")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict:
    """A freshly initialised tiny saved as a state_dict, and a tiny whose BatchNorm saw batches (a training
    checkpoint at step 2)."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    fresh = get_model("tiny", num_features=24)
    torch.save(fresh.state_dict(), folder / "fresh.pt")
    seen = get_model("tiny", num_features=24).train()
    with torch.no_grad():  # train-mode forwards move every BatchNorm's running statistics, as training does
        for _ in range(2):
            seen(torch.randn(8, 3, 112, 112))
    checkpoint = folder / "checkpoint_step000000002.pt"
    atomic_save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": 2, "epoch": 0,
                 "backbone": seen.state_dict(), "config": {"network": "tiny", "embedding_size": 24}}, str(checkpoint))
    return {"fresh": str(folder / "fresh.pt"), "checkpoint": str(checkpoint)}


def test_verification_names_the_weights_before_its_numbers_and_warns(weights, insightface_fixtures, capsys):
    common = ["--data-dir", insightface_fixtures, "--targets", "pairs_py2", "--device", "cpu", "--no-progress"]
    assert verification.main(["--model", weights["fresh"], *common]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == f"model: {weights['fresh']} (backbone state_dict): {LINE}"
    assert lines[1].startswith("[pairs_py2]")  # the numbers come after the model line
    assert err.splitlines() == [UNTRAINED, TINY]

    assert verification.main(["--model", weights["checkpoint"], "--network", "tiny", *common]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == (f"model: {weights['checkpoint']} (ArcScale training checkpoint, step 2, epoch 0): "
                                   f"{LINE.replace('(read from the file)', '(--network)')}")
    assert err.splitlines() == [TINY]  # its BatchNorm saw data and its embeddings differ: not untrained


def test_ijb_names_the_weights_before_its_numbers_and_warns(weights, insightface_fixtures, tmp_path, capsys):
    image_path = make_layout(str(tmp_path), insightface_fixtures, num_identities=2)
    assert ijb.main(["--model", weights["fresh"], "--image-path", image_path, "--result-dir", str(tmp_path / "res"),
                     "--device", "cpu", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith("protocol: ")
    assert lines[1] == f"model: {weights['fresh']} (backbone state_dict): {LINE}"
    assert "| Methods |" in "\n".join(lines[2:])
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [UNTRAINED, TINY]


def test_folders_names_each_model_before_its_numbers_and_warns(weights, tmp_path, capsys):
    root = tmp_path / "people"
    write_crops(root, 3, 3)
    out_dir = tmp_path / "out"
    assert folders.main([str(root), "--model", weights["fresh"], "--model", weights["checkpoint"], "--crops",
                         "--out", str(out_dir), "--no-plot", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    fresh_line = f"model: {weights['fresh']} (backbone state_dict): {LINE}"
    checkpoint_line = f"model: {weights['checkpoint']} (ArcScale training checkpoint, step 2, epoch 0): {LINE}"
    assert lines[:2] == [fresh_line, checkpoint_line]  # before the report
    warnings = [line for line in err.splitlines() if "look untrained" in line or "'tiny'" in line]
    labelled = [(UNTRAINED, "fresh.pt"), (TINY, "fresh.pt"), (TINY, "checkpoint_step000000002.pt")]
    assert warnings == [text.replace("warning: ", f"warning: {label}: ") for text, label in labelled]
    report = (out_dir / "report.md").read_text()
    assert fresh_line in report and checkpoint_line in report and UNTRAINED.replace("warning: ", "- ") in report
    assert os.path.isfile(out_dir / "report.json")
