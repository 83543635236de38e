"""pfc/optim.py: the head's Adam against torch.optim.Adam, and JointOptimizer running the trainer's exact
sequence (forward, scaler.scale(loss).backward(), set_lr, step, zero_grad) in fp32 and in fp16 with a
real torch.amp.GradScaler on CPU: a finite step equals the previous hand-written path, a non-finite
gradient (backbone, head, or another rank's head shard) skips both and backs the scale off."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import losses
from partial_fc import PartialFC, PartialFCError
from pfc.optim import JointOptimizer, RowOptimizer, build_joint_optimizer
from tests.spawn_helpers import run_ranks
from utils.devices import compat

D, C, IN = 8, 60, 6


def make_head(optimizer="sgd", sample_rate=0.5, pfc_update="sparse", **kwargs):
    head = PartialFC(losses.CombinedMarginLoss(32.0, 1.0, 0.3, 0.0), D, C, sample_rate=sample_rate,
                     pfc_update=pfc_update, seed=2)
    head.configure_optimizer(optimizer, momentum=0.9, weight_decay=5e-4, **kwargs)
    return head


def batch(seed, size=12):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, IN, generator=generator), torch.randint(0, C, (size,), generator=generator)


def setup(optimizer="sgd", fp16=False, clip=0.0, init_scale=2.0 ** 16):
    torch.manual_seed(0)
    backbone = torch.nn.Linear(IN, D)
    head = make_head(optimizer)
    if fp16 and not compat.GRAD_SCALER_DEVICE_ARG:
        pytest.skip("an enabled GradScaler on CPU needs torch >= 2.3")
    scaler = compat.grad_scaler("cpu", enabled=fp16, init_scale=init_scale)
    joint = build_joint_optimizer(optimizer, backbone.parameters(), head, lr=0.1, momentum=0.9, weight_decay=5e-4,
                                  clip_grad_norm=clip, scaler=scaler)
    return backbone, head, scaler, joint


def forward_backward(backbone, head, scaler, seed):
    images, labels = batch(seed)
    loss = head(backbone(images).float(), labels)
    scaler.scale(loss).backward()
    return loss.item()


def previous_step(backbone, head, optimizer, scaler, clip, lr):
    """The hand-written sequence train.py used before JointOptimizer (one rank, finite case)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
        head.unscale_(1.0 / scaler.get_scale())
    grad_norm = torch.nn.utils.clip_grad_norm_(backbone.parameters(), clip if clip > 0 else float("inf"))
    assert head.grads_finite() and bool(torch.isfinite(grad_norm))
    scaler.step(optimizer)
    head.step(lr)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    head.zero_grad()


@pytest.mark.parametrize("optimizer, fp16, clip", [("sgd", False, 0.0), ("sgd", True, 0.0), ("adamw", True, 0.5),
                                                   ("adam", False, 0.5)])
def test_finite_steps_equal_the_previous_hand_written_path(optimizer, fp16, clip):
    backbone, head, scaler, joint = setup(optimizer, fp16, clip)
    old_backbone, old_head, old_scaler = copy.deepcopy(backbone), copy.deepcopy(head), copy.deepcopy(scaler)
    old_optimizer = copy.deepcopy(joint.backbone_optimizer)
    old_optimizer.param_groups[0]["params"] = list(old_backbone.parameters())
    norms = []
    for step in range(3):
        lr = 0.1 / (step + 1)
        loss = forward_backward(backbone, head, scaler, step)
        joint.set_lr(lr)
        outcome = joint.step(loss=loss)
        joint.zero_grad()
        assert outcome.stepped and outcome.loss_finite and outcome.grads_finite
        norms.append(outcome.grad_norm)
        old_loss = forward_backward(old_backbone, old_head, old_scaler, step)
        previous_step(old_backbone, old_head, old_optimizer, old_scaler, clip, lr)
        assert loss == old_loss
    assert joint.param_groups[-1]["lr"] == 0.1 / 3 and all(g["lr"] == 0.1 / 3 for g in joint.param_groups)
    assert torch.equal(head.weight, old_head.weight)
    for name in head.optimizer_state_names():
        assert torch.equal(getattr(head, name), getattr(old_head, name)), name
    for new, old in zip(backbone.parameters(), old_backbone.parameters()):
        assert torch.equal(new, old)
    assert scaler.get_scale() == old_scaler.get_scale()
    if clip:  # the clip was exercised: some step's (unscaled) norm was above it
        assert max(norms) > clip


def test_fp16_overflow_skips_backbone_and_head_and_backs_the_scale_off():
    # A scale of 2^127 overflows fp32 gradients: the real GradScaler path, not a hand-made inf.
    backbone, head, scaler, joint = setup("sgd", fp16=True, init_scale=2.0 ** 127)
    weight, backbone_weight = head.weight.clone(), backbone.weight.detach().clone()
    loss = forward_backward(backbone, head, scaler, 0)
    outcome = joint.step(loss=loss)
    joint.zero_grad()
    assert not outcome.stepped and outcome.loss_finite and not outcome.grads_finite
    assert not math.isfinite(outcome.grad_norm)
    assert torch.equal(head.weight, weight) and torch.equal(backbone.weight, backbone_weight)
    assert scaler.get_scale() == 2.0 ** 126
    assert head.center_grad() is None and backbone.weight.grad is None
    # The next step at the lower scale is finite and moves both.
    scaler.update(2.0 ** 10)
    outcome = joint.step(loss=forward_backward(backbone, head, scaler, 1))
    assert outcome.stepped and not torch.equal(head.weight, weight)
    assert not torch.equal(backbone.weight, backbone_weight)


@pytest.mark.parametrize("fp16", [False, True])
def test_inf_in_the_head_alone_skips_both(fp16):
    backbone, head, scaler, joint = setup("sgd", fp16=fp16)
    weight, backbone_weight, scale = head.weight.clone(), backbone.weight.detach().clone(), scaler.get_scale()
    loss = forward_backward(backbone, head, scaler, 0)
    head.center_grad()[1][0, 0] = float("inf")  # e.g. one overflowing row of this rank's shard
    outcome = joint.step(loss=loss)
    assert not outcome.stepped and not outcome.grads_finite and math.isfinite(outcome.grad_norm)
    assert torch.equal(head.weight, weight) and torch.equal(backbone.weight, backbone_weight)
    assert scaler.get_scale() == (scale / 2 if fp16 else 1.0)
    # A non-finite loss is reported as such (the trainer counts those) and skips too.
    joint.zero_grad()
    outcome = joint.step(loss=forward_backward(backbone, head, scaler, 1) * float("nan"))
    assert not outcome.stepped and not outcome.loss_finite and outcome.grads_finite
    assert torch.equal(head.weight, weight)


class SaturatingScaler(torch.amp.GradScaler):
    """Stands in for torch_npu's scaler on an NPU in saturation mode: an overflow leaves finite (clamped)
    gradients, and only the inf flag the scaler records in ``unscale_`` says so."""

    def unscale_(self, optimizer):
        super().unscale_(optimizer)
        for found in self._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
            found.fill_(1.0)


def test_the_scalers_own_overflow_flag_skips_the_step():
    backbone, head, _, joint = setup("sgd", fp16=True)
    scaler = joint.scaler = SaturatingScaler("cpu", init_scale=2.0 ** 16)
    weight, backbone_weight = head.weight.clone(), backbone.weight.detach().clone()
    outcome = joint.step(loss=forward_backward(backbone, head, scaler, 0))
    assert not outcome.stepped and not outcome.grads_finite and math.isfinite(outcome.grad_norm)
    assert torch.equal(head.weight, weight) and torch.equal(backbone.weight, backbone_weight)
    assert scaler.get_scale() == 2.0 ** 15


def _two_rank_worker(rank, world_size):
    """Rank 1's head shard gets an inf; both ranks must skip (and then both step)."""
    backbone, head, scaler, joint = setup("sgd", fp16=True)
    weight = head.weight.clone()
    loss = forward_backward(backbone, head, scaler, 0)
    if rank == 1:
        head.center_grad()[1][0, 0] = float("inf")
    first = joint.step(loss=loss)
    joint.zero_grad()
    skipped_weight_same = torch.equal(head.weight, weight)
    # The caller's own flags ride in the same all-reduce: rank 1 asks to stop, rank 0 lacks its next batch.
    second = joint.step(loss=forward_backward(backbone, head, scaler, 1), flags=(rank == 1, rank == 0, False))
    return (first.stepped, first.grads_finite, skipped_weight_same, scaler.get_scale(),
            second.stepped, torch.equal(head.weight, weight), second.flags)


@pytest.mark.skipif(not compat.GRAD_SCALER_DEVICE_ARG, reason="an enabled GradScaler on CPU needs torch >= 2.3")
def test_every_rank_takes_the_same_decision(port):
    results = run_ranks(_two_rank_worker, 2, port, timeout=90)
    # Both ranks: first step skipped (rank 1's inf), scale halved; second step taken; both see both flags.
    assert results[0] == results[1] == (False, False, True, 2.0 ** 15, True, False, [True, True, False])


@pytest.mark.parametrize("pfc_update", ["dense", "sparse"])
def test_adam_matches_torch_adam(pfc_update):
    """optimizer="adam": torch.optim.Adam (L2 weight decay added to the gradient). Dense: on the full
    matrix; sparse: on the sampled rows (the other rows keep their values)."""
    torch.manual_seed(0)
    head = make_head("adam", sample_rate=0.25, pfc_update=pfc_update)
    head.configure_optimizer("adam", weight_decay=1e-2, eps=1e-3)  # large decay: its path matters
    weight = torch.nn.Parameter(head.weight.clone())
    reference = torch.optim.Adam([weight], lr=0.01, weight_decay=1e-2, eps=1e-3)
    for step in range(3):
        embeddings, labels = torch.randn(12, D), torch.randint(0, C, (12,))
        head(embeddings, labels).backward()
        index = head.last_index
        head.step(0.01)
        head.zero_grad()
        if pfc_update == "dense":
            rows = weight[index]
            logits = F.linear(F.normalize(embeddings), F.normalize(rows)).clamp(-1, 1)
            target = torch.searchsorted(index, labels)
            loss = F.cross_entropy(head.margin_loss(logits, target), target)
            reference.zero_grad()
            loss.backward()
            reference.step()
        elif step == 0:  # first sparse step: sampled rows = one torch Adam step on those rows only
            rows = torch.nn.Parameter(weight.detach()[index].clone())
            logits = F.linear(F.normalize(embeddings), F.normalize(rows)).clamp(-1, 1)
            target = torch.searchsorted(index, labels)
            F.cross_entropy(head.margin_loss(logits, target), target).backward()
            torch.optim.Adam([rows], lr=0.01, weight_decay=1e-2, eps=1e-3).step()
            untouched = torch.ones(C, dtype=torch.bool)
            untouched[index] = False
            torch.testing.assert_close(head.weight[index], rows.detach(), rtol=1e-5, atol=1e-6)
            assert torch.equal(head.weight[untouched], weight.detach()[untouched])
            assert head.adam_steps[index].eq(1).all() and head.adam_steps[untouched].eq(0).all()
    if pfc_update == "dense":
        torch.testing.assert_close(head.weight, weight.detach(), rtol=1e-4, atol=1e-6)
        moved = (head.weight - make_head().weight).abs().max()
        assert moved > 0.01  # three steps of lr 0.01 actually moved the rows


def test_settings_errors_and_state_dict():
    with pytest.raises(PartialFCError, match=r"optimizer='lamb': expected one of sgd, adam, adamw \(config key "
                                             r"'optimizer'\)"):
        build_joint_optimizer("lamb", [torch.zeros(1, requires_grad=True)], make_head(), lr=0.1)
    with pytest.raises(PartialFCError, match=r"adam eps=0: expected a number > 0"):
        RowOptimizer("adam", eps=0)
    with pytest.raises(PartialFCError, match=r"clip_grad_norm=-1: expected a number >= 0"):
        JointOptimizer(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), make_head(), clip_grad_norm=-1)
    unconfigured = PartialFC(losses.CombinedMarginLoss(32.0, 1.0, 0.3, 0.0), D, C)
    with pytest.raises(PartialFCError, match=r"call head.configure_optimizer\(\) first"):
        JointOptimizer(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), unconfigured)
    backbone, head, scaler, joint = setup("adamw")
    joint.set_lr(0.05)
    joint.step(loss=forward_backward(backbone, head, scaler, 0))
    state = joint.state_dict()
    _, _, _, restored = setup("adamw")
    restored.load_state_dict(state)
    assert restored.head_group["lr"] == 0.05
    assert torch.equal(restored.backbone_optimizer.state_dict()["state"][0]["exp_avg"],
                       joint.backbone_optimizer.state_dict()["state"][0]["exp_avg"])
    _, _, _, legacy = setup("adamw")
    legacy.load_state_dict(joint.backbone_optimizer.state_dict())  # a checkpoint from before JointOptimizer
    assert legacy.backbone_optimizer.state_dict()["state"][0]["step"] == 1
    with pytest.raises(PartialFCError, match=r"checkpoint optimizer is 'adamw', this run uses 'sgd'"):
        setup("sgd")[3].load_state_dict(state)
    with pytest.raises(PartialFCError, match=r"not an optimizer state"):
        legacy.load_state_dict({"weights": 1})


def test_without_a_partial_fc_head_it_is_the_standard_gradscaler_sequence():
    """head=None (a replicated classifier inside the backbone's parameters): finite steps equal torch's
    documented AMP recipe (unscale_, clip, scaler.step, update); an overflow skips and backs off."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(IN, D), torch.nn.Linear(D, C))
    reference_model = copy.deepcopy(model)
    if not compat.GRAD_SCALER_DEVICE_ARG:
        pytest.skip("an enabled GradScaler on CPU needs torch >= 2.3")
    scaler, reference_scaler = (torch.amp.GradScaler("cpu", init_scale=2.0 ** 16) for _ in range(2))
    joint = build_joint_optimizer("adam", model.parameters(), None, lr=0.01, weight_decay=1e-3,
                                  clip_grad_norm=0.5, scaler=scaler)
    reference = torch.optim.Adam(reference_model.parameters(), lr=0.01, weight_decay=1e-3)
    assert len(joint.param_groups) == 1 and joint.state_dict()["head"] == {}
    for step in range(3):
        images, labels = batch(step)
        scaler.scale(F.cross_entropy(model(images), labels)).backward()
        assert joint.step(loss=1.0).stepped
        joint.zero_grad()
        reference_scaler.scale(F.cross_entropy(reference_model(images), labels)).backward()
        reference_scaler.unscale_(reference)
        torch.nn.utils.clip_grad_norm_(reference_model.parameters(), 0.5)
        reference_scaler.step(reference)
        reference_scaler.update()
        reference.zero_grad()
    for new, old in zip(model.parameters(), reference_model.parameters()):
        assert torch.equal(new, old)
    before = [param.detach().clone() for param in model.parameters()]
    scaler.update(2.0 ** 127)
    images, labels = batch(5)
    scaler.scale(F.cross_entropy(model(images * 1e3), labels)).backward()  # first-layer grads ~ 1e3 * 2^127
    outcome = joint.step(loss=1.0)
    assert not outcome.stepped and not outcome.grads_finite and scaler.get_scale() == 2.0 ** 126
    assert all(torch.equal(param, old) for param, old in zip(model.parameters(), before))


@pytest.mark.parametrize("fp16", [False, True])
def test_a_frozen_backbone_steps_the_head_alone(fp16):
    # Fine-tuning's head-only epochs: the backbone gets no gradients (an enabled GradScaler records no inf
    # check for its optimizer, and update() would assert); the head moves, the backbone and its state do not.
    backbone, head, scaler, joint = setup(fp16=fp16, clip=5.0)
    before, head_before = copy.deepcopy(backbone.state_dict()), head.weight.detach().clone()
    scale = scaler.get_scale() if fp16 else None
    for seed in range(3):
        images, labels = batch(seed)
        with torch.no_grad():
            embeddings = backbone(images)
        loss = head(embeddings.requires_grad_(True), labels)
        scaler.scale(loss).backward()
        joint.set_lr(0.1)
        outcome = joint.step(loss=loss.detach())
        joint.zero_grad()
        assert outcome.stepped
    assert all(torch.equal(before[key], value) for key, value in backbone.state_dict().items())
    assert joint.backbone_optimizer.state_dict()["state"] == {}
    assert not torch.equal(head.weight, head_before)
    if fp16:
        assert scaler.get_scale() == scale
    forward_backward(backbone, head, scaler, 5)  # unfrozen: the backbone steps as before
    joint.step(loss=1.0)
    assert not torch.equal(before["weight"], backbone.weight)


def test_lr_scale_per_backbone_group():
    torch.manual_seed(0)
    backbone, extra = torch.nn.Linear(IN, D), torch.nn.Linear(D, D)
    groups = [{"params": list(backbone.parameters()), "lr_scale": 0.1}, {"params": list(extra.parameters()), "lr_scale": 1.0}]
    joint = build_joint_optimizer("sgd", groups, make_head(), lr=0.5)
    joint.set_lr(0.2)
    assert [group["lr"] for group in joint.param_groups] == pytest.approx([0.02, 0.2, 0.2])
    restored = build_joint_optimizer("sgd", [{**group, "lr_scale": 0.5} for group in groups], make_head(), lr=0.5)
    restored.load_state_dict(joint.state_dict())  # the config's scale wins over the checkpoint's
    restored.set_lr(0.2)
    assert restored.param_groups[0]["lr"] == pytest.approx(0.1)
