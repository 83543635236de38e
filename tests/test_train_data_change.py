"""Resume after the data under `rec` was replaced: refused with one line saying what changed (same counts,
another class count), unless resume_data_changed=True says it is intended, which is logged and continues
on the new data (another class count still cannot: the head has a row per class). Real subprocess runs of
the tiny config of tests/test_train_stops.py on RecordIO sets written by the identity-set generator."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from tests.test_train_stops import (assert_one_line_error, checkpoints, identity_cache, load,  # noqa: F401
                                    logged_steps, run_to_end, train_args, training_log, write_config)
from utils.data.synthetic import make_identity_set

NO_GENERATED_SET = dict(num_identities=0, images_per_identity=0, num_val_identities=0, num_val_pairs=0)


def replace_data(folder: Path, new_set: Path) -> None:
    """Put another set's files where the run's data was (the same path, as a user re-packing data does)."""
    shutil.rmtree(folder)
    shutil.copytree(new_set, folder)


def digests(folder: Path) -> dict[str, str]:
    """SHA-256 of the run's checkpoints and model.pt (training.log gets the refused run's lines)."""
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.glob("*.pt"))}


@pytest.mark.timeout(300)
def test_resume_on_replaced_data_is_refused_saying_what_changed_unless_intended(tmp_path, identity_cache):
    sets = {name: Path(make_identity_set(str(tmp_path / name), identities, 4, 0, 0, seed=seed))
            for name, identities, seed in (("first", 24, 1), ("same_counts", 24, 2), ("fewer_classes", 20, 3))}
    data = tmp_path / "data"
    shutil.copytree(sets["first"], data)
    config = write_config(tmp_path, "data", identity_cache, rec=str(data), synthetic=NO_GENERATED_SET, max_steps=2)
    output = tmp_path / "out_data"
    first = run_to_end(train_args(config), tmp_path)
    assert first.proc.returncode == 0, first.output[-3000:]
    recorded = load(checkpoints(output)[2])["data"]
    assert recorded["num_images"] == 96 and recorded["num_classes"] == 24 and recorded["source"] == str(data.resolve())
    kept = digests(output)

    # 96 other images of 24 classes: only the index tells
    replace_data(data, sets["same_counts"])
    refused = run_to_end(train_args(config, "resume=True", "max_steps=4"), tmp_path)
    line = assert_one_line_error(refused, "data changed", str(checkpoints(output)[2]), str(data.resolve()),
                                 "index hash", "same image and class counts", "resume_data_changed=True")
    assert "images 96" not in line and "classes 24" not in line, line
    assert digests(output) == kept  # nothing trained, nothing written

    # 80 images of 20 classes: said as a data change, not as a head that does not fit
    replace_data(data, sets["fewer_classes"])
    for intended in (False, True):
        refused = run_to_end(train_args(config, "resume=True", "max_steps=4", f"resume_data_changed={intended}"),
                             tmp_path)
        line = assert_one_line_error(refused, "data changed", "images 96 -> 80", "classes 24 -> 20", "init_backbone")
        assert "PartialFC" not in line, line
        assert digests(output) == kept

    # intended: logged, trained on the new data, and the new checkpoint describes the new data
    replace_data(data, sets["same_counts"])
    log_before = len(training_log(output))
    allowed = run_to_end(train_args(config, "resume=True", "max_steps=4", "resume_data_changed=True"), tmp_path)
    assert allowed.proc.returncode == 0, allowed.output[-3000:]
    log = training_log(output)[log_before:]
    warned = [line for line in log.splitlines() if "WARNING" in line and "resume_data_changed=True" in line]
    assert len(warned) == 1 and "index hash" in warned[0], log[-3000:]
    assert [s["step"] for s in logged_steps(log)] == [3, 4]
    after = load(checkpoints(output)[4])["data"]
    assert after["index_sha256"] != recorded["index_sha256"] and after["num_classes"] == 24
    # ... so resuming from it on the same data again is no change at all
    again = run_to_end(train_args(config, "resume=True", "max_steps=4"), tmp_path)
    assert again.proc.returncode == 0 and "data changed" not in training_log(output)[log_before + len(log):]
