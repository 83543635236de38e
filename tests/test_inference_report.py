"""tools/inference.py says what it used: weights file, network, sizes, per image the face or the whole frame,
where the threshold comes from; warnings for the demo's tiny network, untrained weights and uncropped photos.
Real photos from tests/fixtures/facenet."""
import json
import os

import pytest
import torch

import train
from backbones import get_model
from tests.test_train import write_config
from eval.model_info import COLLAPSED_COSINE, untrained_reasons
from tools.inference import main
from utils.data.synthetic import make_identity_set

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict:
    """model.pt of a tiny trained by train.py for one epoch (8 steps), and a freshly initialised one."""
    folder = tmp_path_factory.mktemp("tiny")
    data = make_identity_set(str(folder / "set"), num_identities=8, images_per_identity=8, num_val_identities=0,
                             num_val_pairs=0, seed=3)
    assert train.main([write_config(folder, rec=data)]) == 0
    torch.manual_seed(0)
    untrained = folder / "untrained.pt"
    torch.save(get_model("tiny", num_features=32).state_dict(), untrained)
    return {"trained": str(folder / "out_job" / "model.pt"), "untrained": str(untrained)}


def photo(facenet_fixtures, name: str) -> str:
    return os.path.join(facenet_fixtures, "images", f"{name}.png")


def test_untrained_tiny_on_whole_photos_says_everything_it_used_and_warns(tiny_files, facenet_fixtures, capsys):
    first, second = photo(facenet_fixtures, "angelina_jolie"), photo(facenet_fixtures, "kate_siegel")
    assert main(["--model", tiny_files["untrained"], "--img", first, "--img2", second]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == (f"model: {tiny_files['untrained']} (backbone state_dict): network 'tiny' (read from the file), embedding size 32, "
                        f"input 112x112 RGB, pixels (x - 127.5) / 127.5")
    assert lines[1].startswith(f"image 1: {first}: whole frame ") and lines[1].endswith(
        " resized to 112x112 (no face detection)")
    assert lines[2].startswith(f"image 2: {second}: whole frame ")
    assert lines[-1].startswith("verdict at threshold 0.3 (the default of --threshold, a common starting point for "
                                "ArcFace models, not fitted to this model")
    warnings = err.splitlines()
    assert warnings[0].startswith("warning: the weights look untrained: all 6 BatchNorm layers still hold their "
                                  "initial statistics (mean 0, variance 1)")
    assert warnings[1].startswith("warning: network 'tiny' is ArcScale's small CPU demo network")
    assert warnings[2].startswith(f"warning: {first} is not a 112x112 face crop: the whole photo was resized")
    assert warnings[3].startswith(f"warning: {second} is not a 112x112 face crop") and len(warnings) == 4


def test_trained_tiny_has_no_untrained_warning(tiny_files, facenet_fixtures, capsys):
    crop = os.path.join(facenet_fixtures, "crops", "angelina_jolie_0_s112_m0.png")
    assert main(["--model", tiny_files["trained"], "--img", crop, "--threshold", "0.5"]) == 0
    out, err = capsys.readouterr()
    assert f"image 1: {crop}: whole frame 112x112 (the model's crop size; no face detection)" in out
    assert err.splitlines() == ["warning: network 'tiny' is ArcScale's small CPU demo network, trained on generated "
                                "faces: its answers on real photos mean little"]


def test_the_collapse_rule_is_measured_on_two_unrelated_inputs(tiny_files):
    from utils.weights.load import load_backbone

    model = load_backbone(tiny_files["trained"], "tiny", num_features=32)
    assert untrained_reasons(model, model.state_dict(), (112, 112), torch.device("cpu")) == []
    with torch.no_grad():
        model.fc.weight.zero_()  # the embedding no longer depends on the input
    reasons = untrained_reasons(model, model.state_dict(), (112, 112), torch.device("cpu"))
    assert reasons == ["6 unrelated inputs (noise, a colour gradient, black, white, a checkerboard, a half-white "
                       "frame) get embeddings whose pairwise cosine similarities are all >= 1.0000 (rule: >= 0.99): "
                       "the embedding hardly depends on the input"]
    assert COLLAPSED_COSINE == 0.99


def test_detected_faces_are_reported_with_box_probability_and_count(tiny_files, facenet_fixtures, capsys):
    expected = json.load(open(os.path.join(facenet_fixtures, "expected.json")))["mtcnn"]["images"]["multiface"]
    many, one = photo(facenet_fixtures, "multiface"), photo(facenet_fixtures, "paul_rudd")
    assert main(["--model", tiny_files["trained"], "--img", many, "--img2", one, "--detect",
                 "--threshold", "0.4"]) == 0
    out, err = capsys.readouterr()
    box = ", ".join(f"{value:.0f}" for value in expected["faces"][0]["box"])
    assert (f"image 1: {many}: detected face: 6 faces found, took the largest: box [{box}], probability "
            f"{expected['faces'][0]['prob']:.4f}, aligned onto the ArcFace template at 112x112") in out
    assert f"image 2: {one}: detected face: 1 face found: box [" in out
    assert "verdict at threshold 0.4 (--threshold): " in out
    assert "is not a 112x112 face crop" not in err  # detected faces are crops


def test_an_untrained_inception_resnet_v1_is_warned_about_on_real_photos(tmp_path, facenet_fixtures, capsys):
    torch.manual_seed(0)
    path = tmp_path / "irv1.pt"
    torch.save(get_model("inception_resnet_v1").state_dict(), path)
    first, second = photo(facenet_fixtures, "angelina_jolie"), photo(facenet_fixtures, "shea_whigham")
    assert main(["--model", str(path), "--img", first, "--img2", second, "--detect"]) == 0
    out, err = capsys.readouterr()
    assert "network 'inception_resnet_v1' (read from the file), embedding size 512, input 160x160" in out
    assert "box + margin 0 cut at 160x160" in out
    warning = err.splitlines()[0]
    assert warning.startswith("warning: the weights look untrained: all ")
    assert "6 unrelated inputs (noise, a colour gradient, black, white, a checkerboard, a half-white frame) get " \
           "embeddings whose pairwise cosine similarities are all >= 0.99" in warning
