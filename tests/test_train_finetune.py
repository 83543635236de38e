"""Fine-tuning as a recipe, end to end on tiny runs: head-only epochs (1 and 2 ranks, resumed inside and after
the phase), freeze_bn under DDP with gradient accumulation, freeze_stages, backbone_lr_scale in the optimizer,
and resumes that change these keys (every parameter keeps its momentum, the new values apply)."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.test_train_stops import (assert_one_line_error, assert_same_weights, checkpoints,  # noqa: F401
                                    identity_cache, load, logged_steps, run_to_end, torchrun_args, train_args,
                                    training_log, write_config)

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


# ---------------------------------------------------------------- resume with other fine-tuning keys

def optimizer_for(config_path: str):
    """The run's backbone, head and optimizer as train.py builds them for the config at ``config_path``."""
    from types import SimpleNamespace

    import train
    from utils.config.load import load_config

    config = load_config(config_path)
    ctx = SimpleNamespace(device=torch.device("cpu"), distributed=False, rank=0, world_size=1)
    backbone, _ = train.build_backbone(config, ctx)
    head = train.build_head(config, 24, None, ctx)
    return train.build_optimizer(config, backbone, head, None, 0.1)


def momentum_by_name(optimizer_state: dict) -> dict[str, torch.Tensor]:
    """{parameter name: momentum buffer} of a saved torch optimizer state whose groups name their parameters."""
    named = {}
    for group in optimizer_state["param_groups"]:
        for name, pid in zip(group["param_names"], group["params"]):
            if pid in optimizer_state["state"]:
                named[name] = optimizer_state["state"][pid]["momentum_buffer"]
    return named


def head_lr(optimizer_state: dict) -> float:
    """The head's lr: Partial FC's group, or the softmax head's own group."""
    if optimizer_state["head"]:
        return optimizer_state["head"]["lr"]
    return next(group["lr"] for group in optimizer_state["backbone"]["param_groups"] if group["name"] == "head")


def resume_with(tmp_path: Path, identity_cache: Path, first: dict, second: dict, **common):
    """A run with the keys ``first`` checkpointed every 3 steps (12 in all), then a resume from step 6 with the
    keys ``second``: (the step-6 checkpoint, the resumed run's config, the resumed run, its output folder)."""
    keys = dict(num_epoch=1, save_every_steps=3, keep_checkpoints=0, init_backbone=None, **common)
    launched = run_to_end(train_args(write_config(tmp_path, "first", identity_cache, **keys, **first)), tmp_path)
    assert launched.proc.returncode == 0, launched.output
    saved = checkpoints(tmp_path / "out_first")[6]
    config = write_config(tmp_path, "second", identity_cache, resume=True, **keys, **second)
    output = tmp_path / "out_second"
    output.mkdir()
    shutil.copy(saved, output / saved.name)
    return saved, config, run_to_end(train_args(config), tmp_path / "second"), output


@pytest.mark.parametrize("head, old, new", [("softmax", 1.0, 0.1), ("softmax", 0.1, 1.0), ("combined", 1.0, 0.1)])
def test_resume_with_another_backbone_lr_scale_keeps_every_momentum_and_applies_the_new_scale(
        tmp_path, identity_cache, head, old, new):
    saved, config, launched, output = resume_with(tmp_path, identity_cache, dict(backbone_lr_scale=old),
                                                  dict(backbone_lr_scale=new), head=head)
    assert launched.proc.returncode == 0, launched.output
    log = training_log(output)
    assert [line["step"] for line in logged_steps(log)] == [7, 8, 9, 10, 11, 12]  # the step count goes on
    assert "backbone_lr_scale " + repr(old) + " -> " + repr(new) in log and "keeps its state (momentum)" in log
    assert f"backbone at {new:g} x the lr" in log
    later = load(checkpoints(output)[9])["optimizer"]
    backbone_group = later["backbone"]["param_groups"][0]
    assert backbone_group["name"] == "backbone" and backbone_group["lr"] == pytest.approx(new * head_lr(later))
    assert head_lr(later) > 0
    # What the first resumed step starts from: the resumed optimizer, loaded as train.py loads it, holds the
    # checkpoint's momentum buffers, parameter for parameter.
    state = load(saved)["optimizer"]
    optimizer = optimizer_for(config)
    optimizer.load_state_dict(state)
    expected, loaded = momentum_by_name(state["backbone"]), momentum_by_name(optimizer.state_dict()["backbone"])
    assert sorted(loaded) == sorted(expected) and any(name.startswith("backbone.") for name in expected)
    assert head != "softmax" or any(name.startswith("head.") for name in expected)
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)
    optimizer.set_lr(0.2)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2 * new)


@pytest.mark.parametrize("old, new", [(0, 2), (2, 0)])
def test_resume_with_other_frozen_stages_keeps_the_momentum_of_what_still_trains(tmp_path, identity_cache, old, new):
    saved, config, launched, output = resume_with(tmp_path, identity_cache, dict(freeze_stages=old),
                                                  dict(freeze_stages=new), head="softmax", backbone_lr_scale=0.5)
    assert launched.proc.returncode == 0, launched.output
    assert [line["step"] for line in logged_steps(training_log(output))] == [7, 8, 9, 10, 11, 12]
    state = load(saved)["optimizer"]
    optimizer = optimizer_for(config)
    optimizer.load_state_dict(state)
    expected, loaded = momentum_by_name(state["backbone"]), momentum_by_name(optimizer.state_dict()["backbone"])
    frozen = ("backbone.layers.0.", "backbone.layers.1.")
    assert any(name.startswith(frozen) for name in expected) == (old == 0)
    assert sorted(loaded) == sorted(name for name in expected if new == 0 or not name.startswith(frozen))
    assert all(torch.equal(loaded[name], expected[name]) for name in loaded)
    if new:  # the stages frozen from step 6 on stay as the checkpoint left them
        before, after = backbone_state(saved), backbone_state(output / "model.pt")
        keys = [key for key in before if key.startswith(("layers.0.", "layers.1."))]
        assert keys and differing(before, after, keys) == []
    else:  # unfrozen: they train from step 7, their momentum starts there
        assert "parameter(s) the checkpoint did not optimise start without optimizer state" in training_log(output)
        assert differing(backbone_state(saved), backbone_state(output / "model.pt"), ["layers.0.layers.0.weight"])


def legacy_optimizer_state(state: dict) -> dict:
    """``state`` as checkpoints written before parameter names were kept hold it with the softmax head at
    backbone_lr_scale=1.0: one group of the backbone's then the head's parameters, no names."""
    groups = state["backbone"]["param_groups"]
    merged = {key: value for key, value in groups[0].items() if key not in ("param_names", "name", "lr_scale")}
    merged["params"] = [pid for group in groups for pid in group["params"]]
    return {**state, "backbone": {"state": state["backbone"]["state"], "param_groups": [merged]}}


def test_a_checkpoint_without_parameter_names_resumes_by_position_or_says_which_key_differs(tmp_path, identity_cache):
    saved, config, launched, output = resume_with(tmp_path, identity_cache, dict(backbone_lr_scale=1.0),
                                                  dict(backbone_lr_scale=0.1), head="softmax")
    assert launched.proc.returncode == 0, launched.output
    checkpoint = load(saved)
    legacy = legacy_optimizer_state(checkpoint["optimizer"])
    optimizer = optimizer_for(config)  # two groups now: backbone at 0.1, head at 1
    optimizer.load_state_dict(legacy)
    expected = momentum_by_name(checkpoint["optimizer"]["backbone"])
    loaded = momentum_by_name(optimizer.state_dict()["backbone"])
    assert sorted(loaded) == sorted(expected) and all(torch.equal(loaded[name], expected[name]) for name in expected)
    # Fewer parameters now (two stages frozen) and no names to find them by: one line, nothing trained.
    torch.save({**checkpoint, "optimizer": legacy}, output / saved.name)
    for name, path in checkpoints(output).items():
        if name != 6:
            path.unlink()
    (output / "model.pt").unlink()
    config = write_config(tmp_path, "third", identity_cache, resume=True, num_epoch=1, save_every_steps=3,
                          keep_checkpoints=0, init_backbone=None, head="softmax", freeze_stages=2,
                          output=str(output))
    launched = run_to_end(train_args(config), tmp_path / "third")
    line = assert_one_line_error(launched, "without their names", "config key 'freeze_stages' is 2 here, 0 in the "
                                 "checkpoint", "resume with --set freeze_stages=0", "init_backbone=")
    assert launched.proc.returncode == 2 and str(saved.name) in line
    assert sorted(checkpoints(output)) == [6] and not (output / "model.pt").exists()


def test_resume_inside_the_head_only_phase_with_head_only_epochs_0_trains_the_backbone_from_there(
        tmp_path, identity_cache):
    saved, config, launched, output = resume_with(tmp_path, identity_cache, dict(head_only_epochs=1),
                                                  dict(head_only_epochs=0), head="softmax", backbone_lr_scale=0.5)
    assert launched.proc.returncode == 0, launched.output
    assert [line["step"] for line in logged_steps(training_log(output))] == [7, 8, 9, 10, 11, 12]
    state = load(saved)["optimizer"]
    expected = momentum_by_name(state["backbone"])
    assert expected and all(name.startswith("head.") for name in expected)  # the head alone trained until step 6
    optimizer = optimizer_for(config)
    optimizer.load_state_dict(state)
    loaded = momentum_by_name(optimizer.state_dict()["backbone"])
    assert sorted(loaded) == sorted(expected) and all(torch.equal(loaded[name], expected[name]) for name in expected)
    before, after = backbone_state(saved), backbone_state(output / "model.pt")
    assert [key for key in differing(before, after, before) if not is_buffer(key)]  # the backbone trained from step 7


@pytest.mark.parametrize("head", ["softmax", "combined"])
def test_resume_with_another_optimizer_is_one_line_naming_the_key(tmp_path, identity_cache, head):
    # SGD's momentum laid onto AdamW (or the reverse) is not a state to continue from: refused, nothing written.
    saved, config, launched, output = resume_with(tmp_path, identity_cache, dict(optimizer="sgd"),
                                                  dict(optimizer="adamw", lr=0.001), head=head)
    line = assert_one_line_error(launched, "written by another optimizer",
                                 "config key 'optimizer' is 'adamw' here, 'sgd' in the checkpoint",
                                 "resume with --set optimizer='sgd'", "init_backbone=")
    assert launched.proc.returncode == 2 and saved.name in line
    assert sorted(checkpoints(output)) == [6] and not (output / "model.pt").exists()
