"""utils/paths.py: output folders and files are checked up front with one-line errors."""
import os

import pytest

from utils.config.paths import OutputPathError, ensure_output_dir, ensure_output_file


def test_output_dir_is_created_nested_and_returned_absolute(tmp_path):
    target = tmp_path / "a" / "b" / "run"
    got = ensure_output_dir(str(target), "config key 'output'")
    assert got == str(target) and target.is_dir()
    assert ensure_output_dir(str(target)) == str(target)  # an existing folder is fine
    unmade = tmp_path / "later"
    assert ensure_output_dir(str(unmade), create=False) == str(unmade) and not unmade.exists()


def test_output_dir_under_a_regular_file_is_one_line(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OutputPathError) as info:
        ensure_output_dir(str(blocker / "sub" / "run"), "config key 'output'")
    message = str(info.value)
    assert "\n" not in message and message.startswith("config key 'output': cannot create ")
    assert f"{blocker} is a file, not a folder" in message
    assert not (tmp_path / "file.txt").is_dir()
    with pytest.raises(OutputPathError, match="exists and is not a folder"):
        ensure_output_dir(str(blocker), "out")
    with pytest.raises(OutputPathError, match="empty path"):
        ensure_output_dir("", "out")


def test_output_file_checks_parent_and_refuses_folders(tmp_path):
    path = tmp_path / "new" / "emb.npy"
    assert ensure_output_file(str(path), "--save") == str(path)
    assert path.parent.is_dir() and not path.exists()
    with pytest.raises(OutputPathError, match=r"--save: .* is a folder, expected a file path"):
        ensure_output_file(str(tmp_path), "--save")
    blocker = tmp_path / "f"
    blocker.write_text("x")
    with pytest.raises(OutputPathError, match=r"--output: cannot create .*f/sub: .*f is a file, not a folder"):
        ensure_output_file(str(blocker / "sub" / "model.onnx"), "--output")


def test_read_only_folder_is_refused(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    # Simulated through os.access: the suite may run as root, which ignores permission bits.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    with pytest.raises(OutputPathError, match=r"out: cannot create .*locked/run: .*locked is not writable"):
        ensure_output_dir(str(locked / "run"), "out")
    with pytest.raises(OutputPathError, match="is a folder that is not writable"):
        ensure_output_dir(str(locked), "out")
    assert not (locked / "run").exists()


@pytest.mark.parametrize("tool", ["make_synthetic", "torch2onnx", "inference"])
def test_tools_refuse_an_output_under_a_file_before_any_work(tmp_path, capsys, tool):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    target = str(blocker / "out" / "x.bin")
    missing = str(tmp_path / "missing_model.pt")  # would fail later: the path check must come first
    if tool == "make_synthetic":
        from tools import make_synthetic as module
        argv = [target, "--identities", "2", "--images-per-identity", "2", "--val-pairs", "0"]
    elif tool == "torch2onnx":
        from tools import torch2onnx as module
        argv = [missing, "--network", "r18", "--output", target]
    else:
        from tools import inference as module
        argv = ["--model", missing, "--network", "r18", "--img", missing, "--save", target]
    assert module.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{blocker} is a file, not a folder" in err
    assert blocker.read_text() == "keep me"
