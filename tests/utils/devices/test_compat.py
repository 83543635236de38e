"""utils/devices/compat.py: each fallback for older torch gives what the newer torch API gives (the
fallback branches are forced here on whatever torch runs the suite; the whole suite also ran on 2.1)."""
import inspect
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from tests.conftest import REPO_ROOT
from utils.devices import compat


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_total_norm_fallback_equals_torch(monkeypatch, norm_type):
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(7, 5, generator=generator), torch.randn(3, generator=generator) * 100, None]
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads if g is not None]), norm_type)
    if hasattr(torch.nn.utils, "get_total_norm"):
        assert torch.allclose(compat.total_norm(grads[:2], norm_type), expected)
    monkeypatch.delattr(torch.nn.utils, "get_total_norm", raising=False)  # torch < 2.6
    assert torch.allclose(compat.total_norm(grads, norm_type), expected)
    assert compat.total_norm([]) == 0 and not torch.isfinite(compat.total_norm([torch.tensor([float("nan")])]))


def test_grad_scaler_fallback_before_torch_2_3(monkeypatch):
    monkeypatch.setattr(compat, "GRAD_SCALER_DEVICE_ARG", False)
    disabled = compat.grad_scaler("cpu", enabled=False)
    assert isinstance(disabled, torch.cuda.amp.GradScaler) and not disabled.is_enabled()
    assert disabled.scale(torch.tensor(3.0)) == 3.0  # a disabled scaler is the identity on any device
    with pytest.raises(RuntimeError, match=r"an enabled GradScaler on 'cpu' needs torch >= 2.3"):
        compat.grad_scaler("cpu", enabled=True)


def test_device_id_and_onnx_kwargs_follow_the_signatures(monkeypatch):
    assert compat.process_group_device_id(torch.device("cpu")) == {}
    has_device_id = "device_id" in inspect.signature(dist.init_process_group).parameters
    assert compat.process_group_device_id(torch.device("cuda", 1)) == (
        {"device_id": torch.device("cuda", 1)} if has_device_id else {})
    monkeypatch.setattr(dist, "init_process_group", lambda backend=None, init_method=None: None)  # torch 2.1's shape
    assert compat.process_group_device_id(torch.device("cuda", 1)) == {}
    monkeypatch.setattr(torch.onnx, "export", lambda model, args, f, dynamo=False: None)
    assert compat.onnx_export_kwargs() == {"dynamo": False}
    monkeypatch.setattr(torch.onnx, "export", lambda model, args, f: None)
    assert compat.onnx_export_kwargs() == {}


@pytest.mark.parametrize("under_torchrun", [True, False])
def test_a_rank_leaves_torchruns_process_group(under_torchrun):
    # A child of this process is in our session and process group, as torch 2.1's torchrun ranks are.
    env = {key: value for key, value in os.environ.items() if key != "TORCHELASTIC_RUN_ID"}
    if under_torchrun:
        env["TORCHELASTIC_RUN_ID"] = "test"
    code = ("import os; from utils.devices import compat; before = os.getsid(0); "
            "compat.own_session_under_torchrun(); print(before == os.getsid(0), os.getsid(0) == os.getpid())")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == (["False", "True"] if under_torchrun else ["True", "False"])
