"""tools/inference.py: embed one image, compare two, bad inputs."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from backbones import get_model
from eval.verification import read_bin
from tools.inference import InferenceError, cosine, embed, main, read_face

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, insightface_fixtures):
    directory = tmp_path_factory.mktemp("inference")
    torch.manual_seed(0)
    model = get_model("mbf").eval()
    torch.save(model.state_dict(), directory / "model.pt")
    encoded, _ = read_bin(os.path.join(insightface_fixtures, "pairs_py2.bin"))
    for index in range(3):
        (directory / f"face{index}.jpg").write_bytes(encoded[index])
    return directory, model


def test_embed_and_compare_in_process(workdir):
    directory, model = workdir
    image = read_face(str(directory / "face0.jpg"))
    assert image.shape == (1, 3, 112, 112) and image.dtype == torch.uint8
    feature = embed(model, image, torch.device("cpu"))
    with torch.no_grad():
        expected = model(((image.float() / 255) - 0.5) / 0.5)[0].double().numpy()
    assert np.allclose(feature, expected)
    # worked by hand: (3*4 + 4*3) / (5 * 5) = 0.96; scale-free; opposite vectors give -1
    assert cosine(np.array([3.0, 4.0]), np.array([4.0, 3.0])) == pytest.approx(0.96, abs=1e-12)
    assert cosine(np.array([6.0, 8.0]), np.array([0.4, 0.3])) == pytest.approx(0.96, abs=1e-12)
    assert cosine(feature, -2 * feature) == pytest.approx(-1.0, abs=1e-12)
    cv2.imwrite(str(directory / "big.png"), np.zeros((200, 150, 3), np.uint8))
    assert read_face(str(directory / "big.png")).shape == (1, 3, 112, 112)


def test_bad_images(workdir):
    directory, _ = workdir
    with pytest.raises(InferenceError, match=r"nope\.jpg: image not found"):
        read_face(str(directory / "nope.jpg"))
    (directory / "text.jpg").write_text("hello")
    with pytest.raises(InferenceError, match=r"text\.jpg: not a readable image"):
        read_face(str(directory / "text.jpg"))


def test_cli(workdir, capsys):
    directory, model = workdir
    common = ["--model", str(directory / "model.pt"), "--network", "mbf"]
    # one real process (script form); the other cases call main() in-process to keep the suite fast
    done = subprocess.run([sys.executable, "tools/inference.py", *common, "--img", str(directory / "face0.jpg"),
                           "--save", str(directory / "e.npy")], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "embedding: dim 512, norm " in done.stdout
    saved = np.load(directory / "e.npy")
    assert saved.shape == (512,)
    assert f"norm {np.linalg.norm(saved):.4f}" in done.stdout

    assert main([*common, "--img", str(directory / "face0.jpg"), "--img2", str(directory / "face1.jpg"),
                 "--threshold", "-1"]) == 0
    out = capsys.readouterr().out
    image0, image1 = read_face(str(directory / "face0.jpg")), read_face(str(directory / "face1.jpg"))
    expected = cosine(embed(model, image0, torch.device("cpu")), embed(model, image1, torch.device("cpu")))
    assert f"cosine similarity: {expected:.5f}" in out
    assert "verdict at threshold -1 (--threshold): same person" in out
    assert main([*common, "--img", str(directory / "face0.jpg"), "--img2", str(directory / "face2.jpg"),
                 "--threshold", "1"]) == 0
    assert "verdict at threshold 1 (--threshold): different people" in capsys.readouterr().out
    assert main([*common, "--img", str(directory / "missing.jpg")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {directory / 'missing.jpg'}: image not found"
    assert main([*common, "--img", str(directory / "face0.jpg"), "--threshold", "3"]) == 2
    assert "--threshold must be a cosine similarity in [-1, 1], got 3.0" in capsys.readouterr().err
    # Without --network the file's keys and shapes name the network (mbf, embedding size 512).
    assert main(["--model", str(directory / "model.pt"), "--img", str(directory / "face0.jpg")]) == 0
    assert f"norm {np.linalg.norm(saved):.4f}" in capsys.readouterr().out


def test_cli_reads_network_and_embedding_size_from_a_training_checkpoint(workdir, tmp_path, capsys):
    from utils.run.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, atomic_save
    directory, _ = workdir
    torch.manual_seed(1)
    tiny = get_model("tiny", num_features=24).eval()
    # The layout train.py's save_checkpoint writes (head/optimizer state left out: not read here).
    checkpoint = tmp_path / "checkpoint_step000000007.pt"
    atomic_save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": 7, "epoch": 0,
                 "backbone": tiny.state_dict(), "config": {"network": "tiny", "embedding_size": 24}}, str(checkpoint))
    image = read_face(str(directory / "face0.jpg"))
    expected = embed(tiny, image, torch.device("cpu"))
    assert main(["--model", str(checkpoint), "--img", str(directory / "face0.jpg")]) == 0
    assert f"embedding: dim 24, norm {np.linalg.norm(expected):.4f}" in capsys.readouterr().out
    # A wrong --network is refused with the network the file looks like.
    assert main(["--model", str(checkpoint), "--network", "mbf", "--img", str(directory / "face0.jpg")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.rstrip().endswith("the file looks like network 'tiny' with embedding size 24")
