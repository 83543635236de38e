"""train.py with the weights users start from: a missing init_backbone file, a file or checkpoint of
another network, and an arcface_torch config's W&B keys (one warning). Tiny CPU runs, in-process."""
import os

import pytest
import torch

import train
from backbones import get_model
from tests.test_train import training_log, write_config
from utils.data.synthetic import make_identity_set
from utils.run.checkpoint import list_checkpoints
from tests.utils.weights.test_fetch import served  # noqa: F401  (the local HTTP server fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def identity_set(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("ids") / "set")
    return make_identity_set(out, num_identities=8, images_per_identity=8, num_val_identities=0, num_val_pairs=0,
                             seed=3)


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


def test_a_missing_init_backbone_names_the_key_the_path_and_the_way_out(tmp_path, identity_set, capsys,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, rec=identity_set, init_backbone="vggface2.pt")
    assert train.main([config]) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: config key 'init_backbone': weights file 'vggface2.pt' not found (looked for "
                           f"{tmp_path / 'vggface2.pt'}); ")
    assert "facenet:vggface2" in line and "docs/weights.md" in line
    assert line.endswith("or set init_backbone=None to train from scratch")
    assert not os.path.exists(tmp_path / "out_job")  # refused before the output folder or any data


def test_init_backbone_of_another_network_says_which_network_the_file_holds(tmp_path, identity_set, capsys):
    path = tmp_path / "tiny.pt"
    torch.save(get_model("tiny", num_features=24).state_dict(), path)
    config = write_config(tmp_path, rec=identity_set, network="mbf", init_backbone=str(path))
    assert train.main([config]) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {path}: ") and "for network 'mbf'" in line
    assert line.endswith("the file looks like network 'tiny' with embedding size 24")


def test_arcface_torch_keys_warn_once_and_a_resume_into_another_network_names_the_checkpoints(
        tmp_path, identity_set, capsys):
    config = write_config(tmp_path, rec=identity_set, wandb_key="0" * 40, suffix_run_name=None, wandb_log_all=True,
                          save_artifacts=False, wandb_resume=False)
    assert train.main([config]) == 0
    output = str(tmp_path / "out_job")
    log = training_log(output)
    assert log.count("ignored arcface_torch config keys") == 1
    assert ("ignored arcface_torch config keys 'wandb_key', 'suffix_run_name', 'wandb_log_all', 'save_artifacts', "
            "'wandb_resume': no meaning in ArcScale") in log
    capsys.readouterr()
    assert train.main([config, "--set", "resume=True", "--set", "num_epoch=2", "--set", "network=mbf"]) == 2
    line = error_line(capsys)
    checkpoint = list_checkpoints(output)[-1]
    assert line.startswith(f"error: {checkpoint}: backbone does not match the config's network (MobileFaceNet: ")
    assert ("the checkpoint holds network 'tiny' with embedding size 32: resume with --set network=tiny "
            "--set embedding_size=32, or start a new `output` from its backbone with init_backbone=") in line


def test_init_backbone_by_registered_name_downloads_once_and_trains_from_it(tmp_path, identity_set, served):
    from tests.test_train import backbone_state

    config = write_config(tmp_path, rec=identity_set, embedding_size=16, init_backbone="facenet:test", lr=1e-9,
                          weight_decay=0.0, max_steps=1)
    assert train.main([config]) == 0
    cached = served["cache"] / "facenet" / "test" / "test.pt"
    assert cached.is_file() and (served["cache"] / "facenet" / "test" / "test.pt.sha256").is_file()
    start = torch.load(cached, weights_only=True)
    trained = backbone_state(str(tmp_path / "out_job"))
    # lr 1e-9 for one step: every weight is still the file's (BatchNorm statistics move with the batch).
    weights = [key for key in start if key.endswith("weight")]
    assert weights and all(torch.allclose(trained[key], start[key], atol=1e-6) for key in weights)
    assert "initialised backbone from facenet:test" in training_log(str(tmp_path / "out_job"))
