"""train.py when training diverges, as it really runs: a loss spike injected at a chosen step
(tests/divergence_driver.py) on 1 process and on 2 gloo ranks under torchrun; the rollback's state compared
bit for bit with the checkpoint of the step it returns to; the rollback history and LR factor through a
resume on another world size; ``stop`` and ``max_rollbacks`` as one error line; the demo staying quiet."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.test_train_stops import (PYTHON, assert_one_line_error, checkpoints, identity_cache, launch,  # noqa: F401
                                    load, logged_steps, run_to_end, torchrun_args, training_log, write_config)
from tests.conftest import REPO_ROOT

DRIVER = str(Path(REPO_ROOT) / "tests" / "divergence_driver.py")
# 12 steps of 8 on one rank (6 of 16 on two); detectors warm after 3 steps; a snapshot every 4 steps.
KEYS = dict(num_epoch=1, save_every_steps=1, keep_checkpoints=0, divergence_warmup_steps=3, snapshot_every_steps=4,
            divergence_lr_factor=0.1)


def driver_args(config: str, spikes: str, dump: Path, *overrides: str, ranks: int = 1) -> list[str]:
    sets = [arg for key in overrides for arg in ("--set", key)]
    if ranks == 1:
        return [PYTHON, DRIVER, spikes, str(dump), config, *sets]
    args = torchrun_args(config, *overrides, nproc=ranks)
    at = args.index("train.py")
    return args[:at] + [DRIVER, spikes, str(dump)] + args[at + 1:]


def expected_lr(config: str, world_size: int, epoch: int, samples: int, factor: float) -> float:
    """The scheduled LR at ``samples`` into ``epoch`` times ``factor`` (the LR curve is a function of progress)."""
    from utils.config.load import load_config
    from utils.run.plan import make_plan, make_schedule

    cfg = load_config(config)
    plan = make_plan(cfg, 96, world_size)
    return make_schedule(cfg, plan).lr(plan.position(epoch, samples)) * factor


def rewound_lr(config: str, world_size: int, done: float, rewind: list, factor: float) -> float:
    """The LR when ``done`` of the run is done after a rollback's ``rewind`` (schedule fraction restored, fraction
    done at the rollback): the schedule goes on from the snapshot's point, compressed into the rest of the run."""
    from utils.config.load import load_config
    from utils.run.plan import make_plan, make_schedule

    cfg = load_config(config)
    plan = make_plan(cfg, 96, world_size)
    restored, at = rewind
    return make_schedule(cfg, plan).lr(plan.total_steps * (restored + (done - at) * (1 - restored) / (1 - at))) * factor


def assert_equal_states(expected, actual, where: str) -> None:
    if isinstance(expected, torch.Tensor):
        assert torch.equal(expected, actual), where
    elif isinstance(expected, dict):
        assert expected.keys() == actual.keys(), where
        for key in expected:
            assert_equal_states(expected[key], actual[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), where
        for index, (a, b) in enumerate(zip(expected, actual)):
            assert_equal_states(a, b, f"{where}/{index}")
    else:
        assert expected == actual, where


@pytest.fixture(scope="module")
def one_rank_rollback(tmp_path_factory, identity_cache):  # noqa: F811
    """A 1-rank run with a spike at step 8: rolled back once, checkpoints at every step."""
    folder = tmp_path_factory.mktemp("rollback1")
    config = write_config(folder, "rb", identity_cache, **KEYS)
    launched = run_to_end(driver_args(config, "8", folder / "dump"), folder)
    assert launched.proc.returncode == 0, launched.output[-3000:]
    return dict(config=config, output=folder / "out_rb", dump=folder / "dump", launched=launched)


def check_rollback(output: Path, dump: Path, ranks: int, global_batch: int, last_step: int = 12) -> dict:
    log = training_log(output)
    assert "step 8: training diverges: loss spike" in log and "rollback 1 of max_rollbacks=3" in log, log[-3000:]
    final = load(checkpoints(output)[max(checkpoints(output))])
    (rollback,) = final["divergence"]["rollbacks"]
    to_step = rollback["to_step"]
    assert rollback["step"] == 8 and rollback["signal"] == "spike" and 4 <= to_step < 8, rollback
    assert rollback["skipped"] == [to_step * global_batch, 8 * global_batch]
    assert final["divergence"]["lr_factor"] == pytest.approx(0.1)
    assert max(checkpoints(output)) == last_step  # the run still ends where planned: the data moved on
    # What every rank held right after the rollback equals the checkpoint written at the step it returned to.
    saved = load(checkpoints(output)[to_step])
    for rank in range(ranks):
        state = torch.load(dump / f"rank{rank}_rollback1.pt", map_location="cpu", weights_only=True)
        at_snapshot = torch.load(dump / f"rank{rank}_snapshot_step{to_step}.pt", map_location="cpu", weights_only=True)
        assert state["step"] == to_step
        assert_equal_states(at_snapshot, state, f"rank {rank}")  # its own BatchNorm statistics included
        if rank == 0:  # the checkpoint holds rank 0's buffers, and the head's rows and momentum gathered from the shards
            for part in ("backbone", "head", "optimizer", "scaler"):
                assert_equal_states(saved[part], state[part], f"rank {rank} {part}")
        else:
            assert_equal_states({key: value for key, value in saved["backbone"].items() if "running" not in key},
                                {key: value for key, value in state["backbone"].items() if "running" not in key},
                                f"rank {rank} backbone parameters")
            assert_equal_states(saved["optimizer"], state["optimizer"], f"rank {rank} optimizer")
    # The schedule goes on from the snapshot's point, at a tenth (the optimizer holds it, the log says it).
    assert final["divergence"]["rewind"] == rollback["schedule"] == [to_step / last_step, 8 / last_step]
    step9 = load(checkpoints(output)[9])["optimizer"]["backbone"]["param_groups"][0]["lr"]
    return dict(final=final, to_step=to_step, lr9=step9, log=log)


@pytest.mark.timeout(300)
def test_a_rollback_on_one_rank_restores_the_checkpointed_state_bit_for_bit(one_rank_rollback):
    run = one_rank_rollback
    result = check_rollback(run["output"], run["dump"], 1, 8)
    # step 9 runs at the LR of the step rolled back to, times 0.1
    assert result["lr9"] == pytest.approx(expected_lr(run["config"], 1, 0, result["to_step"] * 8, 0.1), rel=1e-6)
    assert [s["lr"] for s in logged_steps(result["log"]) if s["step"] == 9][0] == pytest.approx(result["lr9"], rel=1e-5)


@pytest.mark.timeout(300)
def test_a_rollback_on_two_ranks_restores_the_checkpointed_state_bit_for_bit(tmp_path, identity_cache):  # noqa: F811
    config = write_config(tmp_path, "rb2", identity_cache, **dict(KEYS, num_epoch=2))  # 12 steps of 16
    launched = run_to_end(driver_args(config, "8", tmp_path / "dump", ranks=2), tmp_path)
    assert launched.proc.returncode == 0, launched.output[-3000:]
    result = check_rollback(tmp_path / "out_rb2", tmp_path / "dump", 2, 16)
    # epochs of 6 steps: step 9 runs at the LR of the step rolled back to, times 0.1
    epoch, step_in_epoch = divmod(result["to_step"], 6)
    assert result["lr9"] == pytest.approx(expected_lr(config, 2, epoch, step_in_epoch * 16, 0.1), rel=1e-6)


@pytest.mark.timeout(300)
def test_the_rollbacks_and_lr_factor_survive_a_resume_on_two_ranks(tmp_path, identity_cache,  # noqa: F811
                                                                    one_rank_rollback):
    run = one_rank_rollback
    output = tmp_path / "out_grow"
    output.mkdir()
    source = checkpoints(run["output"])[10]  # two steps after the rollback at step 8
    shutil.copy2(source, output)
    config = write_config(tmp_path, "grow", identity_cache, **KEYS)
    resumed = run_to_end(torchrun_args(config, "resume=True"), tmp_path)
    assert resumed.proc.returncode == 0, resumed.output[-3000:]
    before = load(source)["divergence"]
    final = load(checkpoints(output)[6])  # step 10 of 8 = step 5 of 16; one step of 16 was left
    assert final["world_size"] == 2 and final["progress"]["global_batch"] == 16
    assert final["divergence"]["rollbacks"] == before["rollbacks"] and len(before["rollbacks"]) == 1
    assert final["divergence"]["lr_factor"] == before["lr_factor"] == pytest.approx(0.1)
    assert final["divergence"]["rewind"] == before["rewind"] == before["rollbacks"][0]["schedule"]
    # 80 samples done: the 2-rank run's one remaining step (of 16) runs at a tenth of the rewound schedule's LR
    lr = final["optimizer"]["backbone"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(rewound_lr(config, 2, 5 / 6, before["rewind"], 0.1), rel=1e-6)
    assert "divergence history from the checkpoint: 1 rollback(s), lr x0.1 in force, samples skipped: [" \
        in training_log(output)


@pytest.mark.timeout(300)
def test_on_divergence_stop_is_one_error_line_naming_the_step_and_signal(tmp_path, identity_cache):  # noqa: F811
    config = write_config(tmp_path, "stop", identity_cache, **dict(KEYS, on_divergence="stop"))
    launched = run_to_end(driver_args(config, "8", tmp_path / "dump"), tmp_path)
    assert_one_line_error(launched, "step 8: training diverged: loss spike", "on_divergence=\"stop\"")
    assert max(checkpoints(tmp_path / "out_stop")) == 7  # the diverged state is not saved
    assert not (tmp_path / "dump").exists() or not list((tmp_path / "dump").iterdir())


@pytest.mark.timeout(300)
def test_max_rollbacks_stops_with_one_line_listing_each_rollback(tmp_path, identity_cache):  # noqa: F811
    config = write_config(tmp_path, "limit", identity_cache, **dict(KEYS, max_rollbacks=1))
    launched = run_to_end(driver_args(config, "6,10", tmp_path / "dump"), tmp_path)
    line = assert_one_line_error(launched, "step 10: training diverged again: loss spike", "max_rollbacks=1 reached",
                                 "rollbacks 1: step 6 spike -> back to step ", "lower lr")
    assert re.search(r"back to step (\d), samples \[(\d+), 48\) skipped, lr x0.1\)", line), line
    assert line.count("->") == 1


@pytest.mark.timeout(900)
def test_the_demo_stays_quiet_under_on_divergence_stop(tmp_path):
    """The README's demo, its schedule compressed to 60 steps (warm-up, peak LR, decay to a low loss): no detector
    fires, so ``stop`` lets it finish (the full 450-step demo is checked the same way in docs/benchmarks.md)."""
    output = tmp_path / "demo"
    args = [PYTHON, "train.py", "configs/demo_cpu.py", *[arg for key in (
        "max_steps=60", "on_divergence='stop'", f"output='{output}'", "val_targets=[]", "tensorboard=False",
        "frequent=5") for arg in ("--set", key)]]
    with launch(args, tmp_path) as launched:
        launched.wait(timeout=840)
    assert launched.proc.returncode == 0, launched.output[-3000:]
    log = training_log(output)
    assert "training diverg" not in log and [s["step"] for s in logged_steps(log)][-1] == 60, log[-3000:]
