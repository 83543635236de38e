"""utils/checkpoint.py: atomic checkpoint files, pruning, validation, RNG round trip."""
import errno
import os
import random

import numpy as np
import pytest
import torch

from utils.run import checkpoint as resume


def test_atomic_save_replaces_and_leaves_no_temp_files(tmp_path):
    path = str(tmp_path / "sub" / "model.pt")
    resume.atomic_save({"a": torch.ones(2)}, path)
    resume.atomic_save({"a": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(2))
    assert os.listdir(tmp_path / "sub") == ["model.pt"]


def test_failed_save_keeps_the_previous_file(tmp_path):
    path = str(tmp_path / "model.pt")
    resume.atomic_save({"a": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        resume.atomic_save({"a": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"a": 1}
    assert os.listdir(tmp_path) == ["model.pt"]


class FullAfterOneKiB:
    """A file whose disk fills up after the first KiB: writes then fail with ENOSPC."""

    def __init__(self, handle):
        self.handle, self.written = handle, 0

    def write(self, data):
        self.written += len(memoryview(data))
        if self.written > 1024:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.handle.write(data)

    def flush(self):
        self.handle.flush()


@pytest.mark.parametrize("how", ["zip-writer-runtime-error", "dev-full"])
def test_torchs_zip_writer_error_becomes_the_oserror_behind_it(tmp_path, monkeypatch, how):
    path = tmp_path / "checkpoint_step000000001.pt"
    resume.atomic_save({"a": 1}, str(path))
    tmp_name = f"{path}.tmp.{os.getpid()}"
    raised = []
    if how == "dev-full":  # a device that is always full: torch.save raises the OSError itself
        os.symlink("/dev/full", tmp_name)
    else:  # the disk fills up inside a write: torch's zip writer raises "unexpected pos" around the OSError
        real_save = torch.save

        def save(obj, handle):
            try:
                return real_save(obj, FullAfterOneKiB(handle))
            except BaseException as exc:
                raised.append(exc)
                raise

        monkeypatch.setattr(resume.torch, "save", save)
    with pytest.raises(OSError) as failed:
        resume.atomic_save({"a": torch.zeros(100_000)}, str(path))
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == tmp_name
    if how != "dev-full":
        assert isinstance(raised[0], RuntimeError) and "unexpected pos" in str(raised[0])
    assert torch.load(path, weights_only=True) == {"a": 1}
    assert os.listdir(tmp_path) == [path.name]


def test_listing_pruning_and_latest_use_step_numbers(tmp_path):
    for step in (5, 100, 20):
        resume.atomic_save({"step": step}, resume.checkpoint_path(str(tmp_path), step))
    (tmp_path / "checkpoint_stepX.pt").write_text("not ours")
    assert resume.latest_checkpoint(str(tmp_path)).endswith("checkpoint_step000000100.pt")
    resume.prune_checkpoints(str(tmp_path), keep=2)
    assert [os.path.basename(p) for p in resume.list_checkpoints(str(tmp_path))] == [
        "checkpoint_step000000020.pt", "checkpoint_step000000100.pt"]
    assert resume.latest_checkpoint(str(tmp_path / "empty")) is None


def test_load_checkpoint_validates(tmp_path):
    with pytest.raises(resume.CheckpointError, match="checkpoint not found"):
        resume.load_checkpoint(str(tmp_path / "missing.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a zip")
    with pytest.raises(resume.CheckpointError, match="garbage.pt: not a readable checkpoint"):
        resume.load_checkpoint(str(garbage))
    foreign = str(tmp_path / "foreign.pt")
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(resume.CheckpointError, match="not an ArcScale training checkpoint"):
        resume.load_checkpoint(foreign)
    partial = str(tmp_path / "partial.pt")
    torch.save({"format": resume.CHECKPOINT_FORMAT, "version": resume.CHECKPOINT_VERSION, "step": 3}, partial)
    with pytest.raises(resume.CheckpointError, match="partial.pt: checkpoint lacks backbone, config, epoch"):
        resume.load_checkpoint(partial)
    ours = str(tmp_path / "ours.pt")
    v1 = {key: {} for key in resume.REQUIRED_KEYS}
    v1.update(format=resume.CHECKPOINT_FORMAT, version=1, step=3, epoch=1, world_size=2,
              sampler={"epoch": 1, "consumed": 24, "seed": 0}, config={"batch_size": 4, "gradient_acc": 1})
    torch.save(v1, ours)
    # A version-1 checkpoint gets its progress from the sampler: 24 samples into epoch 1, global batch 4 x 2.
    assert resume.load_checkpoint(ours)["progress"] == {"epoch": 1, "step": 3, "samples_in_epoch": 24, "global_batch": 8}


def test_pickle_that_runs_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = str(tmp_path / "evil.pt")
    torch.save({"format": resume.CHECKPOINT_FORMAT, "x": Evil()}, path)
    with pytest.raises(resume.CheckpointError, match="evil.pt: not a readable checkpoint"):
        resume.load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_rng_state_round_trip_survives_weights_only(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    path = str(tmp_path / "rng.pt")
    resume.atomic_save(resume.capture_rng_state(), path)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    resume.restore_rng_state(torch.load(path, weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def write_checkpoint(output: str, step: int, epoch: int, samples: int) -> str:
    states = {key: {} for key in ("backbone", "head", "optimizer", "scaler", "sampler")}
    state = resume.build_checkpoint(step=step, epoch=epoch, samples_in_epoch=samples, global_batch=8, world_size=1,
                                    states=states, rng=[], config={}, data={})
    path = resume.checkpoint_path(output, step)
    resume.atomic_save(state, path)
    return path


def test_pruning_orders_by_progress_and_reads_each_file_once(tmp_path, monkeypatch):
    output = str(tmp_path)
    loads = []
    real_load = resume.load_checkpoint
    monkeypatch.setattr(resume, "load_checkpoint", lambda path, *a, **k: loads.append(os.path.basename(path))
                        or real_load(path, *a, **k))
    # step numbers in another global batch's units: step 40 (epoch 0) is behind step 12 (epoch 1)
    write_checkpoint(output, 40, epoch=0, samples=320)
    write_checkpoint(output, 12, epoch=1, samples=0)
    resume.prune_checkpoints(output, keep=2)
    assert sorted(loads) == ["checkpoint_step000000012.pt", "checkpoint_step000000040.pt"]
    newest = write_checkpoint(output, 14, epoch=1, samples=16)
    loads.clear()
    resume.prune_checkpoints(output, keep=2, protect=newest)
    assert loads == ["checkpoint_step000000014.pt"]  # the two known files are not opened again
    assert [os.path.basename(p) for p in resume.list_checkpoints(output)] == [
        "checkpoint_step000000012.pt", "checkpoint_step000000014.pt"]
    write_checkpoint(output, 12, epoch=2, samples=0)  # rewritten in place: read again
    loads.clear()
    path, state = resume.newest_loadable(output)
    assert os.path.basename(path) == "checkpoint_step000000012.pt" and state["progress"]["epoch"] == 2
    assert loads.count("checkpoint_step000000012.pt") == 2  # its new key, then the state handed back
