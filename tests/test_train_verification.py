"""The verification numbers train.py prints are those of the model it saves: during training (checkpoint of
the same step) and at the end (model.pt), on one rank and on two (where each rank keeps its own BatchNorm
running statistics for training, but evaluates with rank 0's, the ones that are saved). Real subprocess runs
of the tiny config of tests/test_train_stops.py, checked against ``python -m eval.verification``."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.test_train_stops import (PYTHON, checkpoints, identity_cache, run_to_end, torchrun_args,  # noqa: F401
                                    train_args, training_log, write_config)

TARGET = "synthetic_unseen"
VERIFY_EVERY, STEPS = 6, 12


def printed(log: str, step: int) -> tuple[str, str]:
    """(XNorm, Accuracy-Flip) as the run logged them for ``step``."""
    xnorm = re.search(rf"\[{TARGET}\]\[{step}\]XNorm: (\S+)", log)
    accuracy = re.search(rf"\[{TARGET}\]\[{step}\]Accuracy-Flip: (\S+)", log)
    assert xnorm and accuracy, log[-3000:]
    return xnorm.group(1), accuracy.group(1)


def evaluated(model: Path, data_dir: str) -> tuple[str, str]:
    """(XNorm, Accuracy-Flip) of ``python -m eval.verification`` on a saved file, on its own."""
    result = subprocess.run([PYTHON, "-m", "eval.verification", "--model", str(model), "--data-dir", data_dir,
                             "--targets", TARGET, "--device", "cpu", "--no-progress"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    xnorm = re.search(rf"\[{TARGET}\]XNorm: (\S+)", result.stdout)
    accuracy = re.search(rf"\[{TARGET}\]Accuracy-Flip: (\S+)", result.stdout)
    assert xnorm and accuracy, result.stdout
    return xnorm.group(1), accuracy.group(1)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("ranks", [1, 2])
def test_printed_verification_is_that_of_the_saved_model(tmp_path, identity_cache, ranks):
    config = write_config(tmp_path, f"verify{ranks}", identity_cache, val_targets=[TARGET], verbose=VERIFY_EVERY,
                          save_every_steps=VERIFY_EVERY, keep_checkpoints=0, max_steps=STEPS)
    output = tmp_path / f"out_verify{ranks}"
    args = train_args(config) if ranks == 1 else torchrun_args(config, nproc=ranks)
    launched = run_to_end(args, tmp_path)
    assert launched.proc.returncode == 0, launched.output[-3000:]
    log = training_log(output)
    data_dir = str(Path(re.search(rf"verification target {TARGET}: \d+ pairs from (\S+)", log).group(1)).parent)
    # Mid-run: the step-6 numbers are those of the step-6 checkpoint's backbone.
    assert printed(log, VERIFY_EVERY) == evaluated(checkpoints(output)[VERIFY_EVERY], data_dir)
    # At the end: the logged numbers and the summary table are those of model.pt.
    xnorm, accuracy = evaluated(output / "model.pt", data_dir)
    assert printed(log, STEPS) == (xnorm, accuracy)
    summary = re.search(rf"{TARGET}/accuracy_flip\s+(\S+)", launched.stdout)
    assert summary and summary.group(1) == accuracy.split("+-")[0], launched.stdout[-2000:]


@pytest.mark.timeout(300)
def test_tensorboard_gets_the_verification_score_histograms(tmp_path, identity_cache):
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from eval.verification import read_bin

    config = write_config(tmp_path, "histograms", identity_cache, val_targets=[TARGET], verbose=2, max_steps=4,
                          tensorboard=True, keep_checkpoints=0)
    output = tmp_path / "out_histograms"
    launched = run_to_end(train_args(config), tmp_path)
    assert launched.proc.returncode == 0, launched.output[-3000:]
    log = training_log(output)
    _, issame = read_bin(re.search(rf"verification target {TARGET}: \d+ pairs from (\S+)", log).group(1))
    events = EventAccumulator(str(output / "tensorboard"), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    scalar_steps = [event.step for event in events.Scalars(f"{TARGET}/accuracy_flip")]
    for kind, count in (("genuine", int(issame.sum())), ("impostor", int((~issame).sum()))):
        histograms = events.Histograms(f"{TARGET}/scores_{kind}")
        # one histogram per verification (steps 2 and 4), at the scalars' x-axis, holding every pair's cosine
        assert [event.step for event in histograms] == scalar_steps and len(scalar_steps) == 2
        for event in histograms:
            assert event.histogram_value.num == count
            assert -1.0 <= event.histogram_value.min <= event.histogram_value.max <= 1.0 + 1e-6
    assert np.isfinite(events.Histograms(f"{TARGET}/scores_genuine")[-1].histogram_value.sum)
