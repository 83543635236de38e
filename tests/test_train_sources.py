"""train.py on several sources (rec as a list) of the mxnet-written packs in tests/fixtures/insightface, as it
really runs: bad source lists stop before training with one line, a 2-rank gloo run over the union resumes
exactly (same steps, sampler position and weights as the uninterrupted run), its checkpoints record every
source, and resuming on another source list is refused saying what changed unless resume_data_changed=True.
Real subprocess runs of the tiny config of tests/test_train_stops.py."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.test_train_stops import (assert_one_line_error, assert_same_weights, checkpoints, identity_cache,  # noqa: F401
                                    load, logged_steps, run_to_end, torchrun_args, train_args, training_log,
                                    write_config)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "insightface"
A, D = str(FIXTURES / "A"), str(FIXTURES / "D")
NO_GENERATED_SET = dict(num_identities=0, images_per_identity=0, num_val_identities=0, num_val_pairs=0)
STEPS = 6  # global batch 16 (2 ranks x 8): 492 images give 30 steps an epoch; max_steps keeps the run short


def sources_config(folder: Path, name: str, cache: Path, rec, **keys) -> str:
    values = dict(synthetic=NO_GENERATED_SET, num_epoch=1, max_steps=STEPS, warmup_epoch=0)
    values.update(keys)
    return write_config(folder, name, cache, rec=rec, **values)


@pytest.mark.timeout(300)
def test_a_bad_source_list_stops_before_training_with_one_line(tmp_path, identity_cache):  # noqa: F811
    shards = tmp_path / "shards"
    shards.mkdir()
    for number in (0, 2):  # shard 1 is missing
        for ext in ("rec", "idx"):
            shutil.copy(Path(D) / f"train.{ext}", shards / f"train_{number}.{ext}")
    config = sources_config(tmp_path, "bad", identity_cache, [A, str(shards)])
    refused = run_to_end(train_args(config), tmp_path)
    assert_one_line_error(refused, str(shards / "train_1.rec"), "missing")
    assert not checkpoints(tmp_path / "out_bad")


def head_rows(state: dict) -> int:
    return int(state["head"]["weight"].shape[0])


@pytest.mark.timeout(600)
def test_a_two_rank_multi_source_run_resumes_exactly_and_refuses_another_list(tmp_path, identity_cache):  # noqa: F811
    # The uninterrupted 2-rank run over A + D (492 images, 43 classes), a checkpoint every 2 steps.
    config = sources_config(tmp_path, "ref", identity_cache, [A, D], save_every_steps=2, keep_checkpoints=0)
    reference = tmp_path / "out_ref"
    straight = run_to_end(torchrun_args(config), tmp_path)
    assert straight.proc.returncode == 0, straight.output[-3000:]
    ref_steps = logged_steps(training_log(reference))
    assert [s["step"] for s in ref_steps] == list(range(1, STEPS + 1))
    final = load(checkpoints(reference)[STEPS])
    assert head_rows(final) == 43 and final["data"]["num_classes"] == 43 and final["data"]["num_images"] == 492
    recorded = final["data"]["sources"]
    assert [(s["path"], s["num_images"], s["num_classes"]) for s in recorded] == [(A, 480, 40), (D, 12, 3)]
    assert all(len(s["index_sha256"]) == 64 for s in recorded)
    assert "0..39" in training_log(reference) and "40..42" in training_log(reference)  # the start-up table

    # Resume the step-2 checkpoint on 2 ranks: the same steps, LRs, sampler position and final weights.
    config = sources_config(tmp_path, "resumed", identity_cache, [A, D], save_every_steps=2, keep_checkpoints=0)
    output = tmp_path / "out_resumed"
    output.mkdir()
    shutil.copy2(checkpoints(reference)[2], output)
    resumed = run_to_end(torchrun_args(config, "resume=True"), tmp_path)
    assert resumed.proc.returncode == 0, resumed.output[-3000:]
    steps = logged_steps(training_log(output))
    assert [(s["step"], s["lr"]) for s in steps] == [(s["step"], s["lr"]) for s in ref_steps[2:]]
    mine, theirs = load(checkpoints(output)[STEPS]), final
    assert mine["sampler"] == theirs["sampler"] and mine["progress"] == theirs["progress"]
    assert_same_weights(reference / "model.pt", output / "model.pt")
    for key in ("weight",):
        assert (mine["head"][key] == theirs["head"][key]).all()

    # Another list (one rank now: the 2-rank step 6 is 1-rank step 12): the classes still add up to 43 (D before
    # A), refused saying so unless intended.
    reordered = sources_config(tmp_path, "reordered", identity_cache, [D, A], save_every_steps=2, keep_checkpoints=0,
                               max_steps=2 * STEPS + 2, output=str(output))
    refused = run_to_end(train_args(reordered, "resume=True"), tmp_path)
    assert_one_line_error(refused, "data changed", "sources reordered", "resume_data_changed=True")
    # A source dropped: the head has a row per class of the union, so never.
    dropped = sources_config(tmp_path, "dropped", identity_cache, [A], save_every_steps=2, keep_checkpoints=0,
                             max_steps=2 * STEPS + 2, output=str(output))
    for intended in (False, True):
        refused = run_to_end(train_args(dropped, "resume=True", f"resume_data_changed={intended}"), tmp_path)
        assert_one_line_error(refused, "data changed", f"source removed: {D} (12 images, 3 classes)", "classes 43 -> 40")
    assert sorted(checkpoints(output)) == [2, 4, 6]  # nothing written by the refused runs
    allowed = run_to_end(train_args(reordered, "resume=True", "resume_data_changed=True"), tmp_path)
    assert allowed.proc.returncode == 0, allowed.output[-3000:]
    assert [s["step"] for s in logged_steps(training_log(output))][-2:] == [2 * STEPS + 1, 2 * STEPS + 2]
    assert [s["path"] for s in load(checkpoints(output)[2 * STEPS + 2])["data"]["sources"]] == [D, A]


@pytest.mark.timeout(300)
def test_rec_weights_train_an_epoch_of_the_union_size_and_are_recorded(tmp_path, identity_cache):  # noqa: F811
    config = sources_config(tmp_path, "weighted", identity_cache, [A, D], rec_weights=[1, 1], max_steps=None,
                            batch_size=82)  # 492 images: 6 steps of 82 an epoch, whatever the weights
    launched = run_to_end(train_args(config), tmp_path)
    assert launched.proc.returncode == 0, launched.output[-3000:]
    output = tmp_path / "out_weighted"
    steps = logged_steps(training_log(output))
    assert [s["step"] for s in steps] == list(range(1, 7)) and steps[-1]["total"] == 6
    state = load(checkpoints(output)[6])
    assert [s["share"] for s in state["data"]["sources"]] == [0.5, 0.5]
    assert state["progress"]["epoch"] == 1 and state["sampler"]["consumed"] == 492  # one whole epoch of the union
    assert "50.00%" in training_log(output)  # the start-up table's share column
    # another weight on resume is a data change, said per source
    changed = sources_config(tmp_path, "reweighted", identity_cache, [A, D], rec_weights=[3, 1], batch_size=82,
                             output=str(output), max_steps=None, num_epoch=2)
    refused = run_to_end(train_args(changed, "resume=True"), tmp_path)
    assert_one_line_error(refused, f"source {A}: sampling share 0.5000 -> 0.7500", "resume_data_changed=True")


@pytest.mark.timeout(300)
def test_a_triplet_run_over_weighted_sources_trains_and_checkpoints(tmp_path, identity_cache):  # noqa: F811
    # The mxnet-written pack A (480 images, 40 identities) and a generated set of 8 identities x 3 images (fewer
    # than K = 4: drawn with replacement), half of the samples each: P = 2 identities x K = 4 per step.
    from utils.data.synthetic import make_identity_set

    small = make_identity_set(str(tmp_path / "small"), 8, 3, 0, 0, seed=1, image_size=112)
    config = sources_config(tmp_path, "triplet", identity_cache, [A, small], rec_weights=[1, 1], max_steps=4,
                            save_every_steps=2, keep_checkpoints=0, loss="triplet", sampler="pk",
                            images_per_identity=4, triplet_mining="semihard", triplet_margin=0.2)
    launched = run_to_end(train_args(config), tmp_path)
    assert launched.proc.returncode == 0, launched.output[-3000:]
    output = tmp_path / "out_triplet"
    log = training_log(output)
    assert [s["step"] for s in logged_steps(log)] == [1, 2, 3, 4] and "504 images, 48 classes" in log
    assert "63 steps/epoch" in log  # an epoch is the union's 504 samples, as without weights
    assert len(re.findall(r"step \d+ triplets \| active", log)) == 4
    assert sorted(checkpoints(output)) == [2, 4]
    state = load(checkpoints(output)[4])
    assert state["head"] == {} and state["sampler"] == {"epoch": 0, "seed": 0, "consumed": 32,
                                                        "images_per_identity": 4}
    assert [(s["num_images"], s["num_classes"], s["share"]) for s in state["data"]["sources"]] == \
        [(480, 40, 0.5), (24, 8, 0.5)]
    earlier = load(checkpoints(output)[2])["backbone"]
    assert any(not (earlier[key] == value).all() for key, value in state["backbone"].items())  # it trained
    assert (output / "model.pt").is_file()
