"""ONNX export of a backbone (mbf) with onnxruntime verification, metadata and the CLI."""
import contextlib
import copy
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from backbones import get_model
from tools.torch2onnx import ExportError, main, sample_inputs, verify_onnx

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def calibrated_mbf():
    """mbf with BatchNorm statistics taken from data, so outputs have trained-like magnitudes (untrained
    running statistics make the embedding ~1e-6 and any comparison meaningless)."""
    torch.manual_seed(0)
    model = get_model("mbf")
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None
            module.reset_running_stats()
    model.train()
    with torch.no_grad():
        for batch in sample_inputs(seed=5).values():
            model(batch)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export through the CLI's main() (in-process: a subprocess would pay torch's import again)."""
    model = calibrated_mbf()
    directory = tmp_path_factory.mktemp("onnx")
    torch.save(model.state_dict(), directory / "model.pt")
    path = str(directory / "mbf.onnx")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([str(directory / "model.pt"), "--network", "mbf", "--output", path])
    assert code == 0
    return model, path, directory, stdout.getvalue()


def test_export_matches_pytorch_and_has_metadata(exported):
    import onnx
    import onnxruntime

    model, path, _, _ = exported
    proto = onnx.load(path)
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    assert metadata["input_color"] == "RGB" and metadata["input_mean"] == "127.5" and metadata["input_std"] == "127.5"
    assert metadata["embedding_size"] == "512" and metadata["arcscale.network"] == "mbf"
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["data"]
    assert [o.name for o in session.get_outputs()] == ["embedding"]
    for batch in (1, 5):  # dynamic batch
        x = torch.randn(batch, 3, 112, 112).clamp(-1, 1)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {"data": x.numpy()})[0]
        assert got.shape == (batch, 512)
        assert np.abs(got - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())


def test_verify_detects_a_mismatch(exported):
    model, path, _, _ = exported
    report = verify_onnx(model, path)
    for kind in ("random", "real-looking"):
        assert report[kind]["scale"] > 1.0  # a meaningful comparison
        assert report[kind]["raw"] < 1e-4 * report[kind]["scale"] and report[kind]["normalized"] < 1e-4
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).mul_(1.5)  # the first convolution
    with pytest.raises(ExportError, match=r"mbf\.onnx: onnxruntime differs from PyTorch on the random batch"):
        verify_onnx(other, path)


def test_cli(exported, capsys):
    _, path, directory, stdout = exported
    assert "input 'data'" in stdout and "output 'embedding'" in stdout
    assert "max abs diff onnxruntime vs PyTorch (random input)" in stdout
    assert "max abs diff onnxruntime vs PyTorch (real-looking input)" in stdout
    assert "verified: outputs match within 0.0001" in stdout
    done = subprocess.run([sys.executable, "tools/torch2onnx.py", "--help"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "--network" in done.stdout
    assert main([str(directory / "missing.pt"), "--network", "mbf"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {directory / 'missing.pt'}: checkpoint file not found"
    assert main([path, "--network", "mbf"]) == 2
    assert "already an ONNX model; pass a PyTorch checkpoint" in capsys.readouterr().err


def test_cli_reads_network_and_embedding_size_from_a_training_checkpoint(tmp_path, capsys):
    import onnxruntime

    from utils.run.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, atomic_save
    torch.manual_seed(2)
    tiny = get_model("tiny", num_features=24).eval()
    path = tmp_path / "checkpoint_step000000005.pt"
    atomic_save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": 5, "epoch": 0,
                 "backbone": tiny.state_dict(), "config": {"network": "tiny", "embedding_size": 24}}, str(path))
    assert main([str(path), "--output", str(tmp_path / "t.onnx")]) == 0  # no --network, no --embedding-size
    assert "exported tiny to" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(tmp_path / "t.onnx"), providers=["CPUExecutionProvider"])
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        expected = tiny(x).numpy()
    got = session.run(None, {"data": x.numpy()})[0]
    assert got.shape == (2, 24) and np.abs(got - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())
    assert main([str(path), "--network", "r18", "--output", str(tmp_path / "u.onnx"), "--no-verify"]) == 2
    assert "the file looks like network 'tiny' with embedding size 24" in capsys.readouterr().err
    assert not (tmp_path / "u.onnx").exists()
