"""utils/run/resume_review.py in real runs: resume=True on a finished run writes nothing, a max_steps below
the checkpoint's progress is one line, and changed keys are logged with their effect on the LR curve."""
from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest

from tests.test_train_stops import (PLANNED_1_RANK, assert_one_line_error, checkpoints, identity_cache,  # noqa: F401
                                    load, logged_steps, reference, run_to_end, train_args, training_log,
                                    write_config)


def folder_digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every checkpoint and model.pt in ``folder``."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.suffix == ".pt"}


def copy_of_reference(reference: dict, tmp_path: Path, name: str, keep_until: int | None = None) -> Path:
    """The reference run's folder as ``tmp_path/out_<name>``; with keep_until, cut back to that step."""
    output = tmp_path / f"out_{name}"
    shutil.copytree(reference["output"], output)
    if keep_until is not None:
        for step, path in checkpoints(output).items():
            if step > keep_until:
                path.unlink()
        (output / "model.pt").unlink()
    return output


@pytest.mark.timeout(300)
def test_resume_on_a_finished_run_writes_nothing(tmp_path, identity_cache, reference):  # noqa: F811
    output = copy_of_reference(reference, tmp_path, "done")
    before = folder_digest(output)
    config = write_config(tmp_path, "done", identity_cache, resume=True)
    launched = run_to_end(train_args(config), tmp_path)
    assert launched.proc.returncode == 0, launched.output[-3000:]
    assert f"this run already finished at step {PLANNED_1_RANK}" in launched.output
    assert folder_digest(output) == before
    part = training_log(output).split("this run already finished")[-1]
    assert "saved checkpoint" not in part and not logged_steps(part)


@pytest.mark.timeout(300)
def test_resume_on_a_finished_run_restores_a_missing_model_file(tmp_path, identity_cache, reference):  # noqa: F811
    output = copy_of_reference(reference, tmp_path, "nomodel")
    (output / "model.pt").unlink()  # stopped between the final checkpoint and model.pt
    config = write_config(tmp_path, "nomodel", identity_cache, resume=True)
    launched = run_to_end(train_args(config), tmp_path)
    assert launched.proc.returncode == 0, launched.output[-3000:]
    assert "model.pt was older than that checkpoint and is rewritten" in launched.output
    assert (output / "model.pt").read_bytes() == Path(reference["model"]).read_bytes() or all(
        (load(output / "model.pt")[k] == load(reference["model"])[k]).all() for k in load(reference["model"]))


@pytest.mark.timeout(300)
def test_max_steps_below_the_checkpoint_is_one_line_and_writes_nothing(tmp_path, identity_cache, reference):  # noqa: F811
    output = copy_of_reference(reference, tmp_path, "below", keep_until=30)
    before = folder_digest(output)
    config = write_config(tmp_path, "below", identity_cache, resume=True, max_steps=20)
    launched = run_to_end(train_args(config), tmp_path)
    assert_one_line_error(launched, "max_steps=20 is below the progress of", "checkpoint_step000000030.pt",
                          "step 30")
    assert folder_digest(output) == before


@pytest.mark.timeout(300)
def test_changed_keys_on_resume_are_logged_with_the_lr_they_give(tmp_path, identity_cache, reference):  # noqa: F811
    copy_of_reference(reference, tmp_path, "changed", keep_until=25)
    config = write_config(tmp_path, "changed", identity_cache, resume=True, lr=0.2, frequent=2, save_every_steps=5,
                          keep_checkpoints=0)  # as the reference, but for lr and frequent
    launched = run_to_end(train_args(config), tmp_path)
    assert launched.proc.returncode == 0, launched.output[-3000:]
    log = training_log(tmp_path / "out_changed")
    match = re.search(r"resume: 2 config key\(s\) differ from checkpoint_step000000025\.pt: frequent 1 -> 2, "
                      r"lr 0\.1 -> 0\.2; LR schedule over 48 -> 48 steps, LR at the resume point (\S+) -> (\S+)", log)
    assert match, log[-3000:]
    old_lr, new_lr = float(match[1]), float(match[2])
    assert old_lr == pytest.approx(reference["steps"][25]["lr"], rel=1e-5)  # what step 26 had in the reference
    assert new_lr == pytest.approx(2 * old_lr, rel=1e-5)
    resumed = [s for s in logged_steps(log.split("resumed from")[-1])]
    assert resumed[0]["step"] == 26 and resumed[0]["lr"] == pytest.approx(new_lr, rel=1e-5)
