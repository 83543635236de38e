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
from utils.run.divergence import Detectors, DivergenceGuard, Signal, embedding_similarity, module_tensors
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


def test_a_relapse_fires_on_probation_after_a_rollback_only():
    """After a rollback the smoothed loss may not climb above the restored state's level by the margin during
    divergence_warmup_steps; a fresh run's climb (the demo's early bump at too high an LR) is no relapse."""
    cfg = config(divergence_warmup_steps=5, divergence_relapse_margin=0.05)
    assert [n for _, n in fired(Detectors(cfg), [20.0, 24.0, 25.0, 25.0])] == []  # no probation at the start
    detectors = Detectors(cfg)
    fired(detectors, [20.0, 19.0, 18.0, 17.0, 16.0, 15.0])
    detectors.restart(10.0)
    # 10 -> ema 10.1, 10.3, 10.57 (> 10.5) at the 3rd step after the rollback
    assert fired(detectors, [11.0, 12.0, 13.0, 13.0]) == [(3, "relapse"), (4, "relapse")]
    detectors.restart(10.0)
    assert fired(detectors, [10.4, 10.4, 10.4, 10.4, 10.4]) == []  # within the margin: the lower LR holds
    detectors.restart(10.0)
    assert fired(detectors, [10.0] * 5 + [12.0] * 3) == []  # probation over: a later climb is the rise detector's


def test_a_restored_state_on_a_noisy_plateau_does_not_relapse():
    """The level is the smoothed loss at the snapshot and the probation's smoothing starts there, so 10% batch
    noise late in training (the loss flat) gives no relapse at the default margin, over 50 seeds."""
    for seed in range(50):
        rng = random.Random(seed)
        detectors = Detectors(config())
        losses = [(0.2 + 20 * math.exp(-step / 40)) * (1 + 0.1 * (rng.random() - 0.5)) for step in range(400)]
        assert fired(detectors, losses[:300]) == []
        detectors.restart(detectors.ema)
        assert fired(detectors, losses[300:]) == [], seed


def test_each_relapse_is_another_rollback_with_the_factor_cumulative_and_no_snapshot_on_probation():
    backbone, head, scaler, joint = setup()
    parts = (backbone, head, joint, scaler, None)
    guard = DivergenceGuard(config(divergence_warmup_steps=3, snapshot_every_steps=2, divergence_lr_factor=0.5,
                                   max_rollbacks=3), parts)
    guard.begin(0, 0)
    train_steps(parts, guard, range(1, 5))
    snapshot_step = guard.snapshot["step"]
    assert snapshot_step == 4 and guard.snapshot["level"] == pytest.approx(guard.detectors.ema)
    at_snapshot = state_of(parts)
    train_steps(parts, guard, [5], spike_at=5)
    assert guard.lr_factor == 0.5 and guard.detectors.level == guard.snapshot["level"]
    guard.detectors.level /= 2  # the restored state's loss now reads as twice its level: the lower LR "makes it worse"
    train_steps(parts, guard, [6])
    assert [r["signal"] for r in guard.rollbacks] == ["spike", "relapse"]
    assert guard.lr_factor == 0.25 and guard.snapshot["step"] == snapshot_step  # no copy of a state on probation
    assert_same(at_snapshot, state_of(parts))
    train_steps(parts, guard, range(7, 13))  # probation passed at the true level: copies resume
    assert guard.snapshot["step"] > snapshot_step and len(guard.rollbacks) == 2


def test_the_schedule_rewinds_to_the_snapshot_and_the_rewind_survives_a_checkpoint():
    """After a rollback the LR schedule goes on from the snapshot's point, compressed into the rest of the run:
    a rollback at 30% of a 100-step run to a snapshot at 10% reads the schedule at 10% right after, at its end
    when the run ends; the same after load_state_dict (fractions: another world size reads them alike)."""
    from utils.run.schedule import PolyWarmupLR

    backbone, head, scaler, joint = setup()
    parts = (backbone, head, joint, scaler, None)
    guard = DivergenceGuard(config(divergence_lr_factor=0.1), parts)
    done = {"fraction": 0.0}
    guard.begin(0, 0, progress=lambda: done["fraction"])
    schedule = PolyWarmupLR(1.0, 100, 10)
    assert guard.lr(schedule, 37.0, 100) == schedule.lr(37.0)  # no rollback: the schedule as it is, bit for bit
    done["fraction"] = 0.1
    guard.take_snapshot(10, 640)
    done["fraction"] = 0.3
    guard.rollback(Signal("spike", 30, 99.0, "test"), "test", 1920)
    assert guard.rollbacks[0]["schedule"] == [0.1, 0.3]
    assert guard.lr(schedule, 30.0, 100) == pytest.approx(0.1 * schedule.lr(10.0))
    assert guard.lr(schedule, 65.0, 100) == pytest.approx(0.1 * schedule.lr(55.0))  # half of the rest: half of 90
    assert guard.lr(schedule, 100.0, 100) == 0.0
    resumed = DivergenceGuard(config(divergence_lr_factor=0.1), parts)
    resumed.load_state_dict(guard.state_dict())
    for position in (30.0, 65.0, 100.0):
        assert resumed.lr(schedule, position, 100) == guard.lr(schedule, position, 100)
    half = PolyWarmupLR(1.0, 50, 5)  # the same run on twice the global batch: the same fractions of the run
    assert resumed.lr(half, 32.5, 50) == pytest.approx(guard.lr(schedule, 65.0, 100))
