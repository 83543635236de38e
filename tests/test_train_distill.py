"""Knowledge distillation end to end (train.py + distill.py): 1 and 2 ranks, the three heads, the exported
model.pt, resume, the teacher's file, bad teacher configs."""
from __future__ import annotations

import hashlib
import os
import re
import shutil

import pytest
import torch

import train
from backbones import get_model
from tests.test_train import training_log, write_config
from tests.test_train_stops import (assert_one_line_error, identity_cache, run_to_end,  # noqa: F401 (fixture)
                                    torchrun_args, write_config as write_tiny_config)
from utils.data.synthetic import make_identity_set

pytestmark = pytest.mark.usefixtures("one_thread")
KD_STEP = re.compile(r"step (\d+)/\d+ epoch \d+ \| loss (\S+) \| lr \S+ \| kd (\S+) \|")


@pytest.fixture(scope="module")
def identity_set(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("ids") / "set")
    return make_identity_set(out, num_identities=8, images_per_identity=8, num_val_identities=0, num_val_pairs=0,
                             seed=3)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> str:
    """A tiny teacher of embedding size 16 (the students here have 32 or 64: the projection is exercised)."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.manual_seed(7)
    torch.save(get_model("tiny", num_features=16).state_dict(), path)
    return str(path)


def sha256(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def kd_values(log: str) -> list[float]:
    return [float(match[3]) for match in KD_STEP.finditer(log)]


def test_one_rank_partial_fc_cosine_trains_the_projection_and_exports_the_student_alone(tmp_path, identity_set,
                                                                                       teacher_file, capsys):
    digest, mtime = sha256(teacher_file), os.path.getmtime(teacher_file)
    config = write_config(tmp_path, rec=identity_set, teacher=dict(network="tiny", weights=teacher_file),
                          kd_loss="cosine", kd_weight=2.0, tensorboard=True)
    assert train.main([config]) == 0
    output = tmp_path / "out_job"
    log = training_log(str(output))
    values = kd_values(log)
    assert len(values) == 8 and all(0.0 < v < 2.0 for v in values), log[-2000:]  # 1 - cos is in [0, 2]
    assert "projection 32 -> 16" in log
    get_model("tiny", num_features=32).load_state_dict(load(output / "model.pt"), strict=True)
    state = load(output / "checkpoint_step000000008.pt")
    projection = state["distill"]["projection.weight"]
    assert projection.shape == (16, 32)
    from distill import seeded_projection
    assert not torch.equal(projection, seeded_projection(32, 16, seed=2048).weight)  # it was trained
    groups = state["optimizer"]["backbone"]["param_groups"]  # the backbone's, then the projection's own group
    assert len(groups[0]["params"]) == len(list(get_model("tiny", num_features=32).parameters()))
    assert groups[-1]["name"] == "distill" and len(groups[-1]["params"]) == 1 and groups[-1]["lr"] == groups[0]["lr"]
    assert sha256(teacher_file) == digest and os.path.getmtime(teacher_file) == mtime
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(output / "tensorboard")).Reload()
    assert [round(e.value, 4) for e in events.Scalars("train/kd")] == values


@pytest.mark.parametrize("keys", [dict(head="softmax", kd_loss="l2"),
                                  dict(loss="triplet", sampler="pk", images_per_identity=4, kd_loss="relation")],
                         ids=["softmax-l2", "triplet-relation"])
def test_the_softmax_head_and_the_triplet_loss_take_the_distillation_term(tmp_path, identity_set, teacher_file,
                                                                          keys):
    config = write_config(tmp_path, rec=identity_set, teacher=dict(network="tiny", weights=teacher_file), **keys)
    assert train.main([config]) == 0
    output = tmp_path / "out_job"
    values = kd_values(training_log(str(output)))
    assert values and all(v > 0 for v in values)
    get_model("tiny", num_features=32).load_state_dict(load(output / "model.pt"), strict=True)
    distill_state = load(output / "checkpoint_step000000008.pt")["distill"]
    assert list(distill_state) == ([] if keys["kd_loss"] == "relation" else ["projection.weight"])


def test_resume_keeps_the_projection_bit_identical_to_an_uninterrupted_run(tmp_path, identity_set, teacher_file):
    config = write_config(tmp_path, rec=identity_set, teacher=dict(network="tiny", weights=teacher_file),
                          save_every_steps=3)
    assert train.main([config]) == 0
    whole = tmp_path / "out_job"
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    for name in ("checkpoint_step000000006.pt", "checkpoint_step000000008.pt", "model.pt"):
        os.remove(resumed / name)
    assert train.main([config, "--set", f"output={str(resumed)!r}", "--set", "resume=True"]) == 0
    assert "resumed from" in training_log(str(resumed))
    a, b = load(whole / "checkpoint_step000000008.pt"), load(resumed / "checkpoint_step000000008.pt")
    assert torch.equal(a["distill"]["projection.weight"], b["distill"]["projection.weight"])
    assert not torch.equal(a["distill"]["projection.weight"],
                           load(whole / "checkpoint_step000000003.pt")["distill"]["projection.weight"])
    for key, value in a["backbone"].items():
        assert torch.equal(value, b["backbone"][key]), key
    assert a["optimizer"]["backbone"]["state"].keys() == b["optimizer"]["backbone"]["state"].keys()
    for index, entry in a["optimizer"]["backbone"]["state"].items():  # the projection's momentum included
        assert torch.equal(entry["momentum_buffer"], b["optimizer"]["backbone"]["state"][index]["momentum_buffer"])


def test_a_checkpoint_without_a_teacher_is_not_resumed_with_one(tmp_path, identity_set, teacher_file, capsys):
    config = write_config(tmp_path, rec=identity_set, save_every_steps=2)
    assert train.main([config]) == 0
    output = tmp_path / "out_job"
    for name in os.listdir(output):  # back to step 2: a run with steps left
        if name.endswith(".pt") and name != "checkpoint_step000000002.pt":
            os.remove(output / name)
    capsys.readouterr()
    assert train.main([config, "--set", "resume=True", "--set",
                       f"teacher={dict(network='tiny', weights=teacher_file)!r}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trained without a teacher and the config has one" in err, err


@pytest.mark.parametrize("teacher, needle", [
    (dict(network="tiny"), "config key 'teacher.weights': expected a non-empty string"),
    (dict(network="tiny", weights="missing.pt"), "config key 'teacher.weights': weights file 'missing.pt' not found"),
    (dict(network="tiyn", weights="TEACHER"), "config key 'teacher.network': unknown network 'tiyn'"),
    (dict(network="mbf", weights="TEACHER"), "config key 'teacher': "),
    (dict(network="tiny", weights="TEACHER", size=3), "config key 'teacher.size': unknown key"),
])
def test_a_bad_teacher_is_one_line_naming_the_key(tmp_path, identity_set, teacher_file, capsys, teacher, needle):
    teacher = {k: (teacher_file if v == "TEACHER" else v) for k, v in teacher.items()}
    config = write_config(tmp_path, rec=identity_set, teacher=teacher)
    assert train.main([config]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    if teacher.get("network") == "mbf":
        assert "the file looks like network 'tiny' with embedding size 16" in err


def test_the_teacher_file_cannot_be_the_runs_own_output(tmp_path, identity_set, teacher_file, capsys):
    output = tmp_path / "out_job"
    output.mkdir()
    shutil.copy(teacher_file, output / "model.pt")
    config = write_config(tmp_path, rec=identity_set, overwrite=True,
                          teacher=dict(network="tiny", weights=str(output / "model.pt")))
    assert train.main([config]) == 2
    assert "config key 'teacher.weights'" in capsys.readouterr().err and (output / "model.pt").exists()


def test_two_ranks_distill_each_rank_s_own_batch(tmp_path, identity_cache, teacher_file):
    digest = sha256(teacher_file)
    config = write_tiny_config(tmp_path, "kd2", identity_cache, num_epoch=1,
                               teacher=dict(network="tiny", weights=teacher_file), kd_loss="cosine")
    launched = run_to_end(torchrun_args(config), tmp_path / "logs")
    assert launched.proc.returncode == 0, launched.output[-3000:]
    output = tmp_path / "out_kd2"
    values = kd_values(training_log(str(output)))
    assert len(values) == 6 and all(v > 0 for v in values)  # 96 images / global batch 16
    get_model("tiny", num_features=64).load_state_dict(load(output / "model.pt"), strict=True)
    assert load(output / "checkpoint_step000000006.pt")["distill"]["projection.weight"].shape == (16, 64)
    assert sha256(teacher_file) == digest
