"""train.py end to end on CPU: single process, gloo ranks, two loopback "nodes", resume, accumulation,
SIGTERM, non-finite losses and bad configs. Everything tiny and bounded by timeouts."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from backbones import get_model
from tests.conftest import REPO_ROOT, free_port
from utils.run.checkpoint import list_checkpoints, load_checkpoint
from utils.data.synthetic import make_identity_set

PYTHON = sys.executable


@pytest.fixture(scope="module")
def identity_set(tmp_path_factory) -> str:
    """64 training images of 8 identities plus verification pairs, written once for the module."""
    out = str(tmp_path_factory.mktemp("ids") / "set")
    return make_identity_set(out, num_identities=8, images_per_identity=8, num_val_identities=4,
                             num_val_pairs=20, seed=3)


def write_config(tmp_path, name: str = "job", **keys) -> str:
    defaults = dict(device="cpu", network="tiny", embedding_size=32, batch_size=8, num_epoch=1, lr=0.05,
                    num_workers=0, frequent=1, verbose=0, tensorboard=False, keep_checkpoints=20,
                    output=str(tmp_path / f"out_{name}"))
    defaults.update(keys)
    lines = ["from easydict import EasyDict as edict", "config = edict()"]
    lines += [f"config.{key} = {value!r}" for key, value in defaults.items()]
    path = tmp_path / f"{name}.py"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def run_subprocess(args: list[str], timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    full_env.update(env or {})
    return subprocess.run(args, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def torchrun(nproc: int, config: str, *extra: str, port: int | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return run_subprocess([PYTHON, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
                           f"--master_port={port or free_port()}", "train.py", config, *extra], timeout=timeout)


def backbone_state(output: str) -> dict:
    return torch.load(os.path.join(output, "model.pt"), weights_only=True)


def training_log(output: str) -> str:
    with open(os.path.join(output, "training.log")) as handle:
        return handle.read()


def run_demo(config: str, tmp_path, max_steps: int, timeout: float) -> tuple[subprocess.CompletedProcess, float, float]:
    """A demo config as the README runs it, cut to ``max_steps``: (result, unseen-pair accuracy before, after)."""
    output = tmp_path / "demo"
    result = run_subprocess([PYTHON, "train.py", config, "--set", f"output={str(output)!r}",
                             "--set", f"synthetic.cache_dir={str(tmp_path / 'cache')!r}",
                             "--set", f"max_steps={max_steps}", "--set", "verbose=0"],
                            timeout=timeout, env={"OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = training_log(str(output))
    before, after = (float(re.search(rf"\[synthetic_unseen\]\[{step}\]Accuracy-Flip: ([0-9.]+)", log).group(1))
                     for step in (0, max_steps))
    return result, before, after


class TinyNet(torch.nn.Module):
    """BatchNorm-free stand-in backbone, so results do not depend on how a batch is split."""

    def __init__(self, num_features: int = 32, nan_at_call: int | None = None, **_: object) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 8, stride=8)
        self.fc = torch.nn.Linear(4 * 14 * 14, num_features)
        self.nan_at_call, self.calls = nan_at_call, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.fc(torch.relu(self.conv(x)).flatten(1))
        if self.nan_at_call is not None and self.calls >= self.nan_at_call:
            out = out * float("nan")
        return out


def test_single_process_run_writes_model_checkpoint_and_logs(tmp_path, identity_set):
    config = write_config(tmp_path, rec=identity_set, val_targets=["synthetic_unseen"])
    assert train.main([config]) == 0
    output = str(tmp_path / "out_job")
    model = get_model("tiny", num_features=32)
    model.load_state_dict(backbone_state(output))  # bare, insightface-style state_dict
    checkpoints = list_checkpoints(output)
    state = load_checkpoint(checkpoints[-1])
    assert state["step"] == 8 and state["epoch"] == 1 and state["head"]["weight"].shape == (8, 32)
    log = training_log(output)
    assert re.search(r"step 8/8 epoch 0 \| loss [0-9.]+ \| lr .* samples/s \| data wait \d+% .* ETA", log)
    assert re.search(r"\[synthetic_unseen\]\[8\]Accuracy-Flip: [0-9.]+\+-[0-9.]+", log)
    assert "global batch 8 (8 x 1 ranks x 1 acc)" in log


@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_resume_mid_epoch_gives_the_same_weights_as_a_straight_run(tmp_path, identity_set, sample_rate):
    # Batch 2 of 8 classes: 64 steps, checkpoints every 4. At sample_rate 0.5 each step draws random
    # negatives (at most 2 positives < 4 sampled rows), so the head's generator must resume too.
    common = dict(rec=identity_set, num_epoch=2, save_every_steps=4, sample_rate=sample_rate, batch_size=2)
    straight = write_config(tmp_path, "straight", **common)
    assert train.main([straight]) == 0
    resumed_out = tmp_path / "out_resumed"
    resumed_out.mkdir()
    shutil.copy(list_checkpoints(str(tmp_path / "out_straight"))[0], resumed_out)  # the step-4 checkpoint
    resumed = write_config(tmp_path, "resumed", resume=True, **common)
    assert train.main([resumed]) == 0
    assert "resumed from" in training_log(str(resumed_out)) and "at step 4 of 64 (epoch 0, 8 samples into it)" in training_log(str(resumed_out))
    expected, actual = backbone_state(str(tmp_path / "out_straight")), backbone_state(str(resumed_out))
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    head_expected = load_checkpoint(list_checkpoints(str(tmp_path / "out_straight"))[-1])["head"]["weight"]
    head_actual = load_checkpoint(list_checkpoints(str(resumed_out))[-1])["head"]["weight"]
    assert torch.equal(head_expected, head_actual)


def test_gradient_accumulation_equals_a_bigger_batch(tmp_path, identity_set, monkeypatch):
    monkeypatch.setattr(train, "get_model", lambda name, **kw: TinyNet(kw["num_features"]))
    big = write_config(tmp_path, "big", rec=identity_set, batch_size=16, gradient_acc=1, max_steps=1, clip_grad_norm=0)
    small = write_config(tmp_path, "small", rec=identity_set, batch_size=8, gradient_acc=2, max_steps=1, clip_grad_norm=0)
    torch.manual_seed(0)
    assert train.main([big]) == 0
    assert train.main([small]) == 0
    expected, actual = backbone_state(str(tmp_path / "out_big")), backbone_state(str(tmp_path / "out_small"))
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)
    assert "global batch 16 (8 x 1 ranks x 2 acc)" in training_log(str(tmp_path / "out_small"))


def test_a_nonfinite_step_is_skipped_and_a_run_of_them_aborts(tmp_path, identity_set, monkeypatch):
    monkeypatch.setattr(train, "get_model", lambda name, **kw: TinyNet(kw["num_features"], nan_at_call=3))
    # the third forward is step 3's (the step numbers in these lines were one low before divergence handling)
    config = write_config(tmp_path, rec=identity_set, max_nonfinite_steps=3, on_divergence="stop")
    assert train.main([config]) == 2
    log = training_log(str(tmp_path / "out_job"))
    assert "step 3: non-finite loss (nan); step skipped (1 in a row)" in log
    assert "error: loss was non-finite for 3 optimizer steps in a row (max_nonfinite_steps=3, last at step 5)" in log


def test_bad_config_key_and_bad_labels_are_one_line_errors(tmp_path, identity_set, capsys):
    config = write_config(tmp_path, rec=identity_set)
    assert train.main([config, "--set", "lrr=0.1"]) == 2
    assert "error: --set: unknown config key 'lrr'; did you mean 'lr'?" in capsys.readouterr().err
    wrong_classes = write_config(tmp_path, "wrong", rec=identity_set, num_classes=9)
    assert train.main([wrong_classes]) == 2
    assert re.search(r"error: .*num_classes.*9.*8", training_log(str(tmp_path / "out_wrong")))


@pytest.mark.timeout(300)
def test_two_ranks_then_resume_on_one_rank(tmp_path, identity_set):
    config = write_config(tmp_path, "dist", rec=identity_set, num_epoch=2, save_every_steps=2)  # 4 steps/epoch at W=2
    result = torchrun(2, config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = str(tmp_path / "out_dist")
    state = load_checkpoint(list_checkpoints(output)[-1])
    assert state["world_size"] == 2 and state["step"] == 8 and state["head"]["weight"].shape == (8, 32)
    assert "global batch 16 (8 x 2 ranks x 1 acc)" in training_log(output)
    # Resume the step-2 checkpoint of the 2-rank run on a single process: head shards are re-split.
    single_out = tmp_path / "out_single"
    single_out.mkdir()
    shutil.copy(list_checkpoints(output)[0], single_out)
    single = write_config(tmp_path, "single", rec=identity_set, num_epoch=2, resume=True, save_every_steps=2)
    assert train.main([single]) == 0
    log = training_log(str(single_out))
    assert "resuming 2-rank checkpoint on 1 ranks" in log
    # Progress is kept in samples: 2 steps of 16 = 32 samples = step 4 of the 1-rank plan (16 steps of 8).
    assert "global batch changed from 16 to 8: checkpoint step 2 becomes step 4 of 16" in log
    lr_two_ranks = float(re.search(r"step 3/8 epoch 0 \| loss \S+ \| lr (\S+)", training_log(output)).group(1))
    lr_resumed = float(re.search(r"step 5/16 epoch 0 \| loss \S+ \| lr (\S+)", log).group(1))
    assert lr_resumed == pytest.approx(lr_two_ranks, rel=1e-5)
    assert lr_resumed == pytest.approx(0.05 * (1 - 2 / 8) ** 2, rel=1e-5)  # poly decay at 1/4 of the run
    final = load_checkpoint(list_checkpoints(str(single_out))[-1])
    assert (final["step"], final["epoch"], final["progress"]["global_batch"]) == (16, 2, 8)
    assert not re.search(r"step (1|2|3|4)/16 ", log)  # nothing before the resume point is trained again


@pytest.mark.timeout(300)
def test_two_nodes_on_loopback(tmp_path, identity_set):
    config = write_config(tmp_path, "nodes", rec=identity_set, max_steps=2)
    port = free_port()
    procs = [subprocess.Popen([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=1", "--nnodes=2",
                               f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}",
                               "train.py", config], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=dict(os.environ, OMP_NUM_THREADS="1")) for node in range(2)]
    try:
        outputs = [proc.communicate(timeout=240)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "world size 2" in training_log(str(tmp_path / "out_nodes"))


@pytest.mark.timeout(300)
def test_sigterm_finishes_the_step_saves_and_exits_zero(tmp_path, identity_set):
    config = write_config(tmp_path, "term", rec=identity_set, num_epoch=1000)
    output = tmp_path / "out_term"
    proc = subprocess.Popen([PYTHON, "train.py", config], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            log_path = output / "training.log"
            if log_path.exists() and re.search(r"step 3/", log_path.read_text()):
                break
            assert proc.poll() is None, proc.stdout.read()[-2000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-2000:]
    log = training_log(str(output))
    saved_at = int(re.search(r"SIGTERM received: checkpoint saved at step (\d+)", log).group(1))
    last_logged = max(int(step) for step in re.findall(r"step (\d+)/", log))
    state = load_checkpoint(list_checkpoints(str(output))[-1])
    assert 3 <= state["step"] == saved_at == last_logged < 8000  # the checkpoint holds the last finished step
    assert "Traceback" not in out


def test_legacy_local_rank_argument_is_accepted():
    args = train.parse_args(["cfg.py", "--local_rank=3"])
    assert args.local_rank == 3 and train.parse_args(["cfg.py", "--local-rank", "1"]).local_rank == 1


@pytest.mark.timeout(600)
def test_demo_config_learns_unseen_identities(tmp_path):
    """The README demo, shortened to 120 steps: verification on unseen identities must clear 0.80."""
    result, start, final = run_demo("configs/demo_cpu.py", tmp_path, max_steps=120, timeout=560)  # ~60 s on a quiet 2-core machine
    assert start < 0.80 <= final, (start, final)
    # The end summary names every output: the run's final checkpoint by name, model.pt with its step.
    for name in ("training.log", "tensorboard", "checkpoint_step000000120.pt", "model.pt  (step 120"):
        assert os.path.join(str(tmp_path / "demo"), name) in result.stdout, name


@pytest.mark.timeout(300)
def test_legacy_torch_distributed_launch(tmp_path, identity_set):
    config = write_config(tmp_path, "legacy", rec=identity_set, max_steps=2)
    result = run_subprocess([PYTHON, "-m", "torch.distributed.launch", "--nproc_per_node=2",
                             f"--master_port={free_port()}", "train.py", config], timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "world size 2" in training_log(str(tmp_path / "out_legacy"))
