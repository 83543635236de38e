"""train.py with the FaceNet objectives: the triplet loss over P x K batches (1 process and 2 gloo ranks)
and the softmax head initialised from a facenet-style checkpoint's logits; Adam and the step schedule."""
import re

import pytest
import torch

import train
from backbones import get_model
from tests.test_train import identity_set, run_demo, torchrun, training_log, write_config  # noqa: F401  (identity_set: a fixture)
from utils.run.checkpoint import list_checkpoints, load_checkpoint

TRIPLET = dict(loss="triplet", sampler="pk", images_per_identity=4, triplet_mining="semihard", triplet_margin=0.2)


def test_triplet_run_logs_mining_statistics_and_resumes_on_two_ranks(tmp_path, identity_set):  # noqa: F811
    # 64 images, batch 8 x 1 rank: 8 steps/epoch, 2 epochs. Stop after epoch 0 by max_steps, then continue.
    first = write_config(tmp_path, "trip", rec=identity_set, num_epoch=2, max_steps=8, **TRIPLET)
    assert train.main([first]) == 0
    log = training_log(str(tmp_path / "out_trip"))
    stats = re.findall(r"step (\d+) triplets \| active ([0-9.]+) \| d\(a,p\) ([0-9.]+) \| d\(a,n\) ([0-9.]+)", log)
    assert len(stats) == 8
    assert all(0.0 <= float(active) <= 1.0 and 0.0 <= float(ap) <= 4.0 and 0.0 <= float(an) <= 4.0
               for _, active, ap, an in stats)
    state = load_checkpoint(list_checkpoints(str(tmp_path / "out_trip"))[-1])
    assert state["head"] == {} and (state["step"], state["epoch"]) == (8, 1)  # no classifier to save
    # The second epoch on 2 gloo ranks (global batch 8 = 2 x 4): the P x K order carries on.
    second = write_config(tmp_path, "trip", rec=identity_set, num_epoch=2, batch_size=4, resume=True, **TRIPLET)
    result = torchrun(2, second)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    final = load_checkpoint(list_checkpoints(str(tmp_path / "out_trip"))[-1])
    assert (final["step"], final["epoch"], final["world_size"]) == (16, 2, 2)
    losses = [float(v) for v in re.findall(r"step \d+/16 epoch 1 \| loss ([0-9.]+)", training_log(str(tmp_path / "out_trip")))]
    assert len(losses) == 8 and all(0.0 <= value < 1.0 for value in losses)


def test_softmax_head_starts_from_a_facenet_style_classifier(tmp_path, identity_set):  # noqa: F811
    # A released facenet-pytorch file holds the embedding network plus `logits.*` for its classes.
    backbone = get_model("tiny", num_features=32)
    logits_weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(5))
    logits_bias = torch.randn(8, generator=torch.Generator().manual_seed(6))
    release = dict(backbone.state_dict(), **{"logits.weight": logits_weight, "logits.bias": logits_bias})
    path = tmp_path / "release.pt"
    torch.save(release, path)
    config = write_config(tmp_path, "soft", rec=identity_set, head="softmax", optimizer="adam", lr=1e-9,
                          weight_decay=0.0, init_backbone=str(path), max_steps=1, clip_grad_norm=0.0)
    assert train.main([config]) == 0
    state = load_checkpoint(list_checkpoints(str(tmp_path / "out_soft"))[-1])
    # One Adam step of lr 1e-9 moves each value by about 1e-9: the head started from the file's logits.
    torch.testing.assert_close(state["head"]["logits.weight"], logits_weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(state["head"]["logits.bias"], logits_bias, rtol=0, atol=1e-6)
    assert not torch.equal(state["head"]["logits.weight"], logits_weight)  # and it did train
    assert "classifier initialised from logits.weight/logits.bias (8, 32)" in training_log(str(tmp_path / "out_soft"))


def test_step_schedule_decays_at_the_configured_epochs(tmp_path, identity_set):  # noqa: F811
    config = write_config(tmp_path, "steps", rec=identity_set, num_epoch=3, head="softmax", optimizer="adam",
                          lr=0.001, lr_schedule="step", lr_steps=[1, 2], lr_gamma=0.1)
    assert train.main([config]) == 0
    lrs = {int(step): float(lr) for step, lr in
           re.findall(r"step (\d+)/24 epoch \d \| loss \S+ \| lr (\S+)", training_log(str(tmp_path / "out_steps")))}
    assert lrs[8] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-4) and lrs[17] == pytest.approx(1e-5)


@pytest.mark.timeout(600)
def test_triplet_demo_config_learns_unseen_identities(tmp_path):
    """configs/demo_cpu_triplet.py shortened to 75 steps: unseen-pair accuracy must clear 0.85."""
    _, start, final = run_demo("configs/demo_cpu_triplet.py", tmp_path, max_steps=75, timeout=560)  # ~40 s on a quiet 2-core machine
    assert start < 0.8 and final >= 0.85, (start, final)
