"""Fine-tuning as a recipe, end to end on tiny runs: head-only epochs (1 and 2 ranks, resumed inside and after
the phase), freeze_bn under DDP with gradient accumulation, freeze_stages, backbone_lr_scale in the optimizer."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.test_train_stops import (assert_same_weights, checkpoints, identity_cache, load, logged_steps,  # noqa: F401
                                    run_to_end, torchrun_args, train_args, training_log, write_config)

EMBEDDING = 64


@pytest.fixture(scope="module")
def init_file(tmp_path_factory) -> Path:
    """A tiny backbone state_dict to start from, with BatchNorm statistics that are not the fresh defaults."""
    from backbones import get_model

    torch.manual_seed(1)
    model = get_model("tiny", num_features=EMBEDDING)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.9, 1.1)
    path = tmp_path_factory.mktemp("finetune_init") / "init.pt"
    torch.save(model.state_dict(), path)
    return path


def backbone_state(path: Path) -> dict[str, torch.Tensor]:
    """The backbone of a checkpoint or a model.pt."""
    state = load(path)
    return state["backbone"] if "backbone" in state and isinstance(state["backbone"], dict) else state


def differing(expected: dict, actual: dict, keys) -> list[str]:
    return [key for key in keys if not torch.equal(expected[key], actual[key])]


def is_buffer(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def assert_finite_losses(output: Path) -> None:
    log = training_log(output)
    losses = [float(line.split("| loss ")[1].split()[0]) for line in log.splitlines() if "| loss " in line]
    assert losses and all(math.isfinite(value) for value in losses), losses


@pytest.mark.parametrize("ranks", [1, 2])
def test_head_only_epochs_leave_backbone_bit_identical_then_train(tmp_path, identity_cache, init_file, ranks):
    config = write_config(tmp_path, "head_only", identity_cache, num_epoch=2, head_only_epochs=1,
                          init_backbone=str(init_file), backbone_lr_scale=0.5, keep_checkpoints=0)
    args = torchrun_args(config) if ranks == 2 else train_args(config)
    launched = run_to_end(args, tmp_path)
    assert launched.proc.returncode == 0, launched.output
    output = tmp_path / "out_head_only"
    saved = checkpoints(output)
    steps_per_epoch = 96 // (8 * ranks)
    init = load(init_file)
    boundary = saved[steps_per_epoch]  # the end of epoch 0: the last step of the head-only phase
    assert differing(init, backbone_state(boundary), init) == []
    state = load(boundary)
    assert state["optimizer"]["backbone"]["state"] == {}  # no momentum made for a frozen backbone
    final = backbone_state(output / "model.pt")
    changed = differing(init, final, init)
    assert [key for key in changed if not is_buffer(key)] and [key for key in changed if is_buffer(key)]
    groups = load(saved[2 * steps_per_epoch])["optimizer"]
    assert groups["backbone"]["param_groups"][0]["lr"] == pytest.approx(0.5 * groups["head"]["lr"])
    assert_finite_losses(output)
    log = training_log(output)
    assert "epoch 0: head only" in log and "epoch 1: backbone unfrozen" in log


def test_resume_inside_and_after_head_only_phase_matches_uninterrupted(tmp_path, identity_cache, init_file):
    keys = dict(num_epoch=2, head_only_epochs=1, init_backbone=str(init_file), save_every_steps=6, keep_checkpoints=0)
    config = write_config(tmp_path, "whole", identity_cache, **keys)
    assert run_to_end(train_args(config), tmp_path).proc.returncode == 0
    whole = tmp_path / "out_whole"
    saved = checkpoints(whole)
    assert {6, 12, 18, 24} <= set(saved)
    for start in (6, 18):  # inside the head-only phase (epoch 0), and after it (epoch 1)
        name = f"from{start}"
        config = write_config(tmp_path, name, identity_cache, resume=True, **keys)
        output = tmp_path / f"out_{name}"
        output.mkdir()
        shutil.copy(saved[start], output / saved[start].name)
        launched = run_to_end(train_args(config), tmp_path / name)
        assert launched.proc.returncode == 0, launched.output
        assert_same_weights(whole / "model.pt", output / "model.pt")
        if start == 6:
            assert differing(load(init_file), backbone_state(checkpoints(output)[12]), load(init_file)) == []


def test_freeze_bn_keeps_statistics_under_ddp_and_accumulation(tmp_path, identity_cache, init_file):
    config = write_config(tmp_path, "freeze_bn", identity_cache, num_epoch=1, freeze_bn=True, gradient_acc=2,
                          batch_size=4, init_backbone=str(init_file))
    launched = run_to_end(torchrun_args(config), tmp_path)
    assert launched.proc.returncode == 0, launched.output
    init, final = load(init_file), backbone_state(tmp_path / "out_freeze_bn" / "model.pt")
    assert differing(init, final, [key for key in init if is_buffer(key)]) == []
    assert [key for key in differing(init, final, init) if not is_buffer(key)]  # the weights (BN affine too) trained
    assert any(key.endswith(".1.weight") for key in differing(init, final, init))
    assert_finite_losses(tmp_path / "out_freeze_bn")


@pytest.mark.parametrize("ranks", [1, 2])
def test_freeze_stages_leave_those_stages_bit_identical(tmp_path, identity_cache, init_file, ranks):
    config = write_config(tmp_path, "stages", identity_cache, num_epoch=1, freeze_stages=2,
                          init_backbone=str(init_file))
    launched = run_to_end(torchrun_args(config) if ranks == 2 else train_args(config), tmp_path)
    assert launched.proc.returncode == 0, launched.output
    init, final = load(init_file), backbone_state(tmp_path / "out_stages" / "model.pt")
    frozen = [key for key in init if key.startswith(("layers.0.", "layers.1."))]
    later = [key for key in init if key.startswith(("layers.2.", "layers.3.", "layers.4.", "fc."))]
    assert frozen and differing(init, final, frozen) == []
    assert differing(init, final, later) == later  # every later weight and statistic trained


def test_freeze_stages_beyond_the_network_is_one_line(tmp_path, identity_cache):
    config = write_config(tmp_path, "too_many", identity_cache, freeze_stages=9)
    launched = run_to_end(train_args(config), tmp_path)
    assert launched.proc.returncode == 2
    errors = [line for line in launched.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "freeze_stages" in errors[0] and "5 stages" in errors[0], launched.stderr
    assert "Traceback" not in launched.stderr


@pytest.mark.parametrize("head", ["combined", "softmax"])
def test_backbone_lr_scale_sets_the_backbone_groups_lr(head):
    from types import SimpleNamespace

    import train
    from utils.config.load import load_config

    config = load_config("configs/base.py", [f"head={head!r}", "backbone_lr_scale=0.1", "network='tiny'",
                                             "embedding_size=64"])
    ctx = SimpleNamespace(device=torch.device("cpu"), distributed=False, rank=0, world_size=1)
    backbone, _ = train.build_backbone(config, ctx)
    head_module = train.build_head(config, 10, None, ctx)
    optimizer = train.build_optimizer(config, backbone, head_module, None, 0.5)
    optimizer.set_lr(0.4)
    groups = optimizer.param_groups
    assert groups[0]["params"] == list(backbone.parameters()) and groups[0]["lr"] == pytest.approx(0.04)
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(0.4)  # the head: Partial FC's group or its own


@pytest.mark.parametrize("path", ["configs/finetune_folder_example.py", "configs/demo_cpu_finetune.py"])
def test_shipped_finetune_configs_load_with_their_keys(path):
    from utils.config.load import load_config

    config = load_config(path)
    assert config.init_backbone and config.head_only_epochs >= 1
    if "folder" in path:
        assert config.init_backbone == "facenet:vggface2" and config.freeze_bn and config.freeze_stages == 1
        assert config.backbone_lr_scale == 0.1
