"""test/*.sh (Ascend ModelZoo-style launchers) on CPU with 2 processes, a few steps."""
import os
import re
import subprocess

import pytest

from tests.conftest import REPO_ROOT, free_port


@pytest.mark.timeout(300)
def test_performance_script_runs_on_cpu_and_prints_fps(tmp_path):
    env = dict(os.environ, DEVICE="cpu", NPROC="2", PERF_STEPS="4", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
               OUTPUT_ROOT=str(tmp_path / "output"))
    result = subprocess.run(["bash", "test/train_performance_8p.sh", "--socket_ifname=lo",
                             f"--synthetic.cache_dir={str(tmp_path)!r}",
                             "--synthetic.num_identities=16", "--synthetic.num_val_identities=4",
                             "--synthetic.num_val_pairs=20", "--batch_size=8"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout + result.stderr
    log_line = re.search(r"log: (\S+)", result.stdout)
    assert log_line and os.path.isfile(log_line.group(1))
    assert re.search(r"Final Performance images/sec : [0-9.]+", result.stdout)
    log = open(log_line.group(1)).read()
    assert "world size 2" in log
    # The start-up line names what the run chose, and the interface flag reached gloo (see the next test).
    assert "device cpu, backend gloo, world size 2 (2 per node), GLOO_SOCKET_IFNAME=lo" in log


@pytest.mark.timeout(150)
def test_socket_ifname_reaches_the_process_group(tmp_path):
    result = _launch("train_full_8p.sh", ["--socket_ifname=arcscale_nic0", "--max_steps=1"], tmp_path, NPROC="2")
    assert result.returncode != 0
    failure = re.search(r"training failed with exit code \d+: (.*)", result.stderr)
    # gloo was asked for that interface: one line naming the rendezvous and the setting, no traceback.
    assert failure and re.match(r"error: rank [01] of 2 could not join the gloo process group at 127\.0\.0\.1:\d+, "
                                r"GLOO_SOCKET_IFNAME=arcscale_nic0: \w+: .*arcscale_nic0", failure.group(1)), result.stderr
    result = _launch("train_full_8p.sh", ["--hccl_if_ip="], tmp_path, DRY_RUN="1")
    assert result.returncode == 2 and "--hccl_if_ip= needs this node's IP address" in result.stderr


@pytest.mark.timeout(150)
@pytest.mark.parametrize("package", ["ascend-toolkit", "nnae"])
def test_cann_set_env_is_sourced_despite_unset_variables(tmp_path, monkeypatch, package):
    """CANN's set_env.sh (the toolkit's, or nnae's where only the runtime is installed) appends to unset
    variables and may end non-zero; the launcher runs under set -eu. What it exports reaches train.py,
    and a torch_npu that cannot load its libraries is named, not taken for "no NPU"."""
    site = tmp_path / "cann_python"
    (site / "torch_npu").mkdir(parents=True)
    (site / "torch_npu" / "__init__.py").write_text(
        "raise ImportError('libhccl.so: cannot open shared object file: No such file or directory')\n")
    cann = tmp_path / "Ascend"
    (cann / package).mkdir(parents=True)
    (cann / package / "set_env.sh").write_text(f"export PYTHONPATH={site}:$PYTHONPATH\n"
                                               "export ASCEND_OPP_PATH=$ARCSCALE_UNSET_VARIABLE/opp\n"
                                               "[ -n \"$ARCSCALE_UNSET_VARIABLE\" ]\n")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.delenv("ARCSCALE_UNSET_VARIABLE", raising=False)
    result = _launch("train_full_1p.sh", ["--config=configs/demo_cpu.py"], tmp_path, DEVICE="npu", CANN_HOME=str(cann))
    assert f"env_npu.sh: sourced {cann}/{package}/set_env.sh" in result.stdout, result.stdout + result.stderr
    failure = re.search(r"training failed with exit code \d+: (.*)", result.stderr)
    assert failure and failure.group(1) == ("error: device='npu' requested but torch_npu is installed but failed to "
                                            "import: ImportError: libhccl.so: cannot open shared object file: No such "
                                            "file or directory"), result.stderr


def test_launcher_rejects_unknown_arguments():
    result = subprocess.run(["bash", "test/train_full_1p.sh", "positional"], cwd=REPO_ROOT, capture_output=True,
                            text=True, env=dict(os.environ, DEVICE="cpu"), timeout=60)
    assert result.returncode == 2
    assert "unknown argument 'positional' (expected --data_path=DIR or --key=value)" in result.stderr


def _launch(script, args, tmp_path, timeout=120, **env):
    full_env = {**os.environ, "DEVICE": "cpu", "NPROC": "1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
                "OUTPUT_ROOT": str(tmp_path / "output"), **env}
    return subprocess.run(["bash", f"test/{script}", *args], cwd=REPO_ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def _config(path, network="tiny"):
    path.write_text(f"from easydict import EasyDict as edict\nconfig = edict()\nconfig.network = {network!r}\n"
                    "config.embedding_size = 32\nconfig.batch_size = 4\nconfig.num_workers = 0\n")
    return str(path)


def test_missing_data_path_or_config_is_one_line_error(tmp_path):
    result = _launch("train_full_8p.sh", ["--data_path=/nonexistent"], tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("train_full_8p.sh: error: --data_path=/nonexistent is not a folder, expected a folder "
                             "with train.rec/train.idx or root/<identity>/<image> files\n")
    result = _launch("train_full_1p.sh", ["--config=configs/nope.py"], tmp_path)
    assert result.returncode == 2
    assert "error: config file 'configs/nope.py' not found" in result.stderr
    assert not (tmp_path / "output").exists()  # nothing started


@pytest.mark.timeout(200)
def test_failure_prints_error_line_and_log_path_and_configs_get_own_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    first = _launch("train_full_1p.sh", [f"--config={_config(tmp_path / 'cfg_a.py')}", f"--data_path={empty}"],
                    tmp_path, timeout=150)
    second = _launch("train_full_1p.sh", [f"--data_path={empty}"], tmp_path, timeout=150,
                     CONFIG=_config(tmp_path / "cfg_b.py"), RUN_NAME="try2")
    logs = []
    for result, folder in ((first, "cfg_a"), (second, "cfg_b-try2")):
        assert result.returncode != 0, result.stdout + result.stderr
        out_dir = tmp_path / "output" / "train_full_1p" / folder
        log = out_dir / "train_0.log"
        assert f"output: {out_dir / 'work'}; log: {log}" in result.stdout  # printed at start
        failure = re.search(r"training failed with exit code \d+: (.*)", result.stderr)
        assert failure and "error: " in failure.group(1) and str(empty) in failure.group(1), result.stderr
        assert f"full log: {log}" in result.stderr
        assert failure.group(1) in log.read_text()  # the line shown is the log's own error line
        logs.append(log.read_text())
    assert "cfg_b" not in logs[0] and "cfg_a" not in logs[1]  # runs never share a log


def test_apex_flags_and_config_flag_map_to_train_arguments(tmp_path):
    result = _launch("train_full_8p.sh", ["--config=configs/ms1mv3_mbf.py", "--amp_cfg=True", "--opt_level=O0",
                                          "--lr=0.2"], tmp_path, DRY_RUN="1", DEVICE="npu", NPROC="8")
    assert result.returncode == 0, result.stderr
    command = result.stdout.splitlines()[-1]
    assert "--nproc_per_node=8 " in command and f" train.py {REPO_ROOT}/configs/ms1mv3_mbf.py " in command
    # Order matters: the later --opt_level=O0 wins over --amp_cfg=True, as train.py applies --set in order.
    assert command.index("fp16=True") < command.index("fp16=False") and "--set lr=0.2" in command
    assert "ms1mv3_mbf/work" in command
    result = _launch("train_full_8p.sh", ["--opt_level=O5"], tmp_path, DRY_RUN="1")
    assert result.returncode == 2 and "--opt_level=O5: expected O0, O1, O2 or O3" in result.stderr


@pytest.mark.timeout(200)
def test_data_path_replaces_the_demo_synthetic_set(insightface_fixtures, tmp_path):
    data = os.path.join(insightface_fixtures, "D")  # 12 images, 3 classes, written by mxnet
    result = _launch("train_full_1p.sh", [f"--data_path={data}", "--batch_size=4", "--max_steps=2",
                                          "--num_workers=0"], tmp_path, timeout=150)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "val_targets=[]" in result.stdout
    log = (tmp_path / "output" / "train_full_1p" / "demo_cpu" / "train_0.log").read_text()
    assert re.search(r"\b12 images, 3 classes, world size 1", log), log[-2000:]  # not the demo's 4800 images
    assert (tmp_path / "output" / "train_full_1p" / "demo_cpu" / "work" / "model.pt").is_file()
