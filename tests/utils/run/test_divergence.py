"""utils/run/divergence.py: each detector fires on an injected case (and only then), the policies, and an
in-process rollback that puts back the exact state of the snapshot (real Partial FC head, SGD, GradScaler)."""
from __future__ import annotations

import logging
import math
import random

import pytest
import torch

from pfc.optim import StepOutcome
from tests.pfc.test_optim import forward_backward, setup
from utils.config.load import load_config
from utils.run.divergence import Detectors, DivergenceGuard, embedding_similarity, module_tensors
from utils.run.state import TrainingError
from utils.config.rules import BASE_CONFIG


def config(**keys):
    cfg = load_config(BASE_CONFIG)
    cfg.update(keys)
    return cfg


def outcome(loss: float, similarity: float = 0.0, scale: float | None = None) -> StepOutcome:
    finite = math.isfinite(loss)
    shared = [similarity] + ([] if scale is None else [scale])
    return StepOutcome(finite, finite, finite, 1.0, loss, [False, False], loss, shared)


def healthy_losses(steps: int, seed: int = 0) -> list[float]:
    """A loss falling from 20 to about 0.2 with 30% multiplicative noise (small batches late in training)."""
    rng = random.Random(seed)
    return [(0.2 + 20 * math.exp(-step / 40)) * (1 + 0.3 * (rng.random() - 0.5)) for step in range(steps)]


def fired(detectors: Detectors, losses: list[float], **values) -> list[tuple[int, str]]:
    seen = []
    for step, loss in enumerate(losses, 1):
        seen += [(s.step, s.name) for s in detectors.check(step, outcome(loss), values.get("scale"),
                                                            values.get("similarity", 0.0))]
    return seen


def test_a_healthy_noisy_run_fires_nothing():
    detectors = Detectors(config())
    assert fired(detectors, healthy_losses(600)) == []


def test_a_spike_fires_at_its_step_only():
    losses = healthy_losses(200)
    losses[150] = losses[149] * 10  # on the plateau (on the steep part the spread is wide: the rise detector's case)
    assert fired(Detectors(config()), losses) == [(151, "spike")]


def test_a_sustained_rise_fires_after_its_window():
    losses = healthy_losses(60) + [healthy_losses(60)[-1] + 0.3 * step for step in range(1, 40)]
    events = fired(Detectors(config(divergence_rise_window=10)), losses)
    assert [name for _, name in events] and {name for _, name in events} == {"rise"}, events
    first = events[0][0]
    assert 61 + 10 <= first < 61 + 25, events  # the window of steps above the margin, after the EMA's lag


def test_embedding_collapse_fires_after_warmup():
    cfg = config(divergence_warmup_steps=5)
    detectors = Detectors(cfg)
    for step in range(1, 11):
        similarity = 0.99 if step in (3, 9) else 0.1  # step 3: still in warm-up
        names = [s.name for s in detectors.check(step, outcome(20.0), None, similarity)]
        assert names == (["collapse"] if step == 9 else []), (step, names)


def test_embedding_similarity_of_identical_and_orthogonal_rows():
    row = torch.randn(1, 16)
    assert float(embedding_similarity(row.repeat(8, 1) * torch.arange(1, 9).unsqueeze(1))) == pytest.approx(1.0)
    assert float(embedding_similarity(torch.eye(8))) == pytest.approx(0.0, abs=1e-7)
    assert float(embedding_similarity(torch.randn(512, 128))) == pytest.approx(0.0, abs=0.01)


def test_nonfinite_losses_in_a_row_are_one_signal():
    detectors = Detectors(config(max_nonfinite_steps=3))
    events = fired(detectors, [20.0, math.nan, math.nan, 20.0, math.nan, math.nan, math.nan])
    assert events == [(7, "nonfinite")]


def test_a_collapsed_fp16_scale_fires_through_the_optimizers_all_reduce():
    """A real GradScaler whose scale is patched below the floor: the value reaches the detector through
    JointOptimizer.step(shared=...), like the trainer's."""
    backbone, head, scaler, joint = setup(fp16=True, init_scale=2.0 ** -4)
    guard = DivergenceGuard(config(divergence_scale_floor=1.0, divergence_scale_window=3, on_divergence="warn"),
                            (backbone, head, joint, scaler, None))
    signals = []
    guard.act = lambda signal, all_signals, samples: signals.append((signal.step, signal.name, signal.value))
    for step in range(1, 5):
        forward_backward(backbone, head, scaler, step)
        result = joint.step(loss=1.0, shared=guard.shared(torch.tensor(0.1)))
        joint.zero_grad()
        assert result.shared[1] == pytest.approx(2.0 ** -4)  # the scale this step used
        guard.after_step(step, result, step * 12)
    assert signals == [(3, "scale", 2.0 ** -4)]


def state_of(parts) -> dict:
    backbone, head, joint, scaler, _ = parts
    return {"backbone": {k: v.clone() for k, v in module_tensors(backbone).items()},
            "head": {k: v.clone() for k, v in module_tensors(head).items()},
            "optimizer": {k: v["momentum_buffer"].clone() for k, v in joint.backbone_optimizer.state.items()}}


def assert_same(expected: dict, actual: dict) -> None:
    for part in expected:
        assert expected[part].keys() == actual[part].keys()
        for key in expected[part]:
            assert torch.equal(expected[part][key], actual[part][key]), (part, key)


def train_steps(parts, guard, steps, spike_at=None):
    backbone, head, joint, scaler, _ = parts
    for step in steps:
        loss = forward_backward(backbone, head, scaler, step)
        joint.set_lr(0.1 * guard.lr_factor)
        result = joint.step(loss=torch.tensor(loss * (100 if step == spike_at else 1)),
                            shared=guard.shared(torch.tensor(0.1)))
        joint.zero_grad()
        guard.after_step(step, result, step * 12)


def test_rollback_restores_the_snapshot_bit_for_bit_and_lowers_the_lr(caplog):
    backbone, head, scaler, joint = setup()
    parts = (backbone, head, joint, scaler, None)
    guard = DivergenceGuard(config(divergence_warmup_steps=3, snapshot_every_steps=4, divergence_lr_factor=0.5), parts)
    guard.begin(0, 0)
    train_steps(parts, guard, range(1, 5))
    assert guard.snapshot["step"] == 4
    at_snapshot = state_of(parts)
    train_steps(parts, guard, range(5, 7))
    assert not torch.equal(at_snapshot["backbone"]["weight"], backbone.weight)
    with caplog.at_level(logging.WARNING, logger="arcscale.train"):
        train_steps(parts, guard, [7], spike_at=7)
    assert_same(at_snapshot, state_of(parts))
    assert guard.lr_factor == 0.5 and guard.rollbacks == [
        {"step": 7, "signal": "spike", "to_step": 4, "skipped": [48, 84], "lr_factor": 0.5}]
    assert "step 7: training diverges: loss spike" in caplog.text and "back to the state of step 4" in caplog.text
    # the next interval's first healthy step is the next snapshot, and rolling back to it is as exact
    step = 7
    while guard.snapshot["step"] == 4:
        step += 1
        train_steps(parts, guard, [step])
    assert 8 <= guard.snapshot["step"] == step < 16
    at_snapshot = state_of(parts)
    train_steps(parts, guard, [step + 1])
    train_steps(parts, guard, [step + 2], spike_at=step + 2)
    assert_same(at_snapshot, state_of(parts))
    assert guard.lr_factor == 0.25 and len(guard.rollbacks) == 2
    restored = DivergenceGuard(config(), parts)
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict()


@pytest.mark.parametrize("policy", ["stop", "warn", "rollback-limit"])
def test_stop_warn_and_the_rollback_limit(policy, caplog):
    backbone, head, scaler, joint = setup()
    parts = (backbone, head, joint, scaler, None)
    cfg = config(divergence_warmup_steps=3, snapshot_every_steps=2, max_rollbacks=1,
                 on_divergence="rollback" if policy == "rollback-limit" else policy)
    guard = DivergenceGuard(cfg, parts)
    guard.begin(0, 0)
    train_steps(parts, guard, range(1, 6))
    if policy == "warn":
        before = state_of(parts)
        with caplog.at_level(logging.WARNING, logger="arcscale.train"):
            train_steps(parts, guard, [6], spike_at=6)
        assert "step 6: training diverges: loss spike" in caplog.text and "on_divergence=\"warn\"" in caplog.text
        assert guard.lr_factor == 1.0 and not guard.rollbacks and not torch.equal(before["backbone"]["weight"],
                                                                                backbone.weight)
        return
    if policy == "rollback-limit":
        train_steps(parts, guard, [6], spike_at=6)
        assert len(guard.rollbacks) == 1
    with pytest.raises(TrainingError) as error:
        train_steps(parts, guard, [8], spike_at=8)
    text = str(error.value)
    assert text.startswith("step 8: training diverge") and "loss spike" in text and "\n" not in text
    if policy == "rollback-limit":
        assert "max_rollbacks=1 reached (rollbacks 1: step 6 spike -> back to step 4" in text, text


def test_signals_and_step_values_reach_tensorboard(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    backbone, head, scaler, joint = setup()
    parts = (backbone, head, joint, scaler, None)
    guard = DivergenceGuard(config(divergence_warmup_steps=3, on_divergence="warn", frequent=2), parts)
    writer = SummaryWriter(str(tmp_path))
    guard.begin(0, 0, writer)
    train_steps(parts, guard, range(1, 7), spike_at=6)
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, round(e.value)) for e in events.Scalars("divergence/spike")] == [
        (72, round(guard.detectors.recent[-1]))]
    assert [e.step for e in events.Scalars("train/grad_norm")] == [24, 48, 72]
    assert [e.step for e in events.Scalars("train/embedding_similarity")] == [24, 48, 72]
    assert all(e.value == pytest.approx(0.1) for e in events.Scalars("train/embedding_similarity"))
