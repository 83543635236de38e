"""train.py on small data, where defaults made for millions of images used to act silently: one corrupt
image in a small set, epochs of one step that drop a third of the data, a mistyped network name found
only after the data loaded. Real subprocess runs of the tiny config of tests/test_train_stops.py."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from backbones import MODEL_NAMES
from tests.test_train_stops import (assert_one_line_error, identity_cache, logged_steps, run_to_end,  # noqa: F401
                                    torchrun_args, train_args, training_log, write_config)


def test_a_network_typo_is_refused_with_the_config_before_any_data_is_read(tmp_path, identity_cache):  # noqa: F811
    config = write_config(tmp_path, "typo", identity_cache)
    # The data named is missing too: the network is checked first, so that is not what the user hears about.
    launched = run_to_end(train_args(config, "network=r5O", f"rec={tmp_path / 'no_such_folder'}"), tmp_path)
    line = assert_one_line_error(launched)
    assert line == ("error: --set: config key 'network': unknown network 'r5O'; did you mean 'r50'? (expected one "
                    f"of {', '.join(MODEL_NAMES)})")
    assert not (tmp_path / "out_typo").exists()


def _small_folder(root: Path, identities: int = 2, images: int = 10, broken: int = 1) -> Path:
    """``identities`` x ``images`` aligned 112x112 faces (flat colours), the first ``broken`` of them unreadable."""
    for identity in range(identities):
        os.makedirs(root / f"id{identity}")
        for i in range(images):
            cv2.imwrite(str(root / f"id{identity}" / f"{i}.jpg"), np.full((112, 112, 3), 30 * identity + 9 * i, np.uint8))
    for i in range(broken):
        (root / "id0" / f"{i}.jpg").write_bytes(b"\xff\xd8 not a whole jpeg")
    return root


@pytest.mark.timeout(240)
def test_one_bad_image_in_a_small_set_trains_on_and_a_count_of_zero_stops(tmp_path, identity_cache):  # noqa: F811
    folder = _small_folder(tmp_path / "faces")
    # 20 images: the default max_bad_records=0.001 allowed 0.02 records, so this one bad image stopped the run.
    keys = dict(rec=str(folder), synthetic=dict(num_identities=0), batch_size=2, num_epoch=1, warmup_epoch=0)
    config = write_config(tmp_path, "small", identity_cache, **keys)
    launched = run_to_end(train_args(config), tmp_path)
    assert launched.proc.returncode == 0, launched.output[-3000:]
    log = training_log(tmp_path / "out_small")
    assert [step["step"] for step in logged_steps(log)] == list(range(1, 11))  # 20 images, batch 2: all 10 steps
    assert (tmp_path / "out_small" / "model.pt").is_file()
    assert "1 corrupt record(s) were skipped during training" in log
    assert "optimizer step(s)" not in log and "drop_last leaves" not in log  # 10 steps, nothing dropped: no warning

    strict = write_config(tmp_path, "strict", identity_cache, max_bad_records=0, **keys)
    launched = run_to_end(train_args(strict), tmp_path)
    line = assert_one_line_error(launched)
    assert line.startswith(f"error: 1 corrupt samples skipped in {folder} (5.0000% of 20), above the limit of 0 "
                           f"(config key 'max_bad_records'=0: none tolerated); list them with"), line
    assert not (tmp_path / "out_strict" / "model.pt").exists()


@pytest.mark.timeout(240)
def test_an_epoch_of_one_step_is_warned_by_rank_0_alone(tmp_path, identity_cache):  # noqa: F811
    # 96 images on 2 ranks at batch_size 32: global batch 64, one step an epoch, 32 images never trained.
    config = write_config(tmp_path, "one_step", identity_cache, batch_size=32, num_epoch=2)
    launched = run_to_end(torchrun_args(config, nproc=2), tmp_path)
    assert launched.proc.returncode == 0, launched.output[-3000:]
    steps = logged_steps(training_log(tmp_path / "out_one_step"))
    assert [(step["step"], step["total"]) for step in steps] == [(1, 2), (2, 2)]  # what the warning describes
    expected = ["an epoch of 96 images is 1 optimizer step(s) (global batch 64 = batch_size 32 x 2 rank(s) x "
                "gradient_acc 1), fewer than 10: the LR schedule, warmup and logging move in steps; lower batch_size "
                "(e.g. batch_size=4) or gradient_acc, or add data",
                "drop_last leaves 32 of 96 images (33%) out of every epoch (whole global batches of 64 only); set "
                "batch_size (e.g. batch_size=4) or gradient_acc so that global batches cover the data"]
    for text in expected:
        assert [line for line in launched.stdout.splitlines() if line.endswith(text)] == \
            [line for line in launched.stdout.splitlines() if f"[rank 0] WARNING {text}" in line], launched.stdout
        assert sum(line.endswith(f"[rank 0] WARNING {text}") for line in launched.stdout.splitlines()) == 1
        assert f"WARNING {text}\n" in training_log(tmp_path / "out_one_step")
    assert "[rank 1] WARNING" not in launched.output, launched.output[-3000:]
