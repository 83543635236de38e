"""test/*.sh (Ascend ModelZoo-style launchers) on CPU with 2 processes, a few steps."""
import datetime
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, free_port

LOG_NAME = re.compile(r"train_0_\d{8}-\d{6}(-\d+)?\.log")  # node rank 0, the launch's time, -2.. when taken


@pytest.mark.timeout(300)
def test_performance_script_runs_on_cpu_and_prints_fps(tmp_path):
    env = dict(os.environ, DEVICE="cpu", NPROC="2", PERF_STEPS="4", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
               OUTPUT_ROOT=str(tmp_path / "output"), PYTHON=sys.executable)
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
                            text=True, env=dict(os.environ, DEVICE="cpu", PYTHON=sys.executable), timeout=60)
    assert result.returncode == 2
    assert "unknown argument 'positional' (expected --data_path=DIR or --key=value)" in result.stderr


def _launch(script, args, tmp_path, timeout=120, **env):
    # PYTHON: the interpreter running these tests (a venv's python need not be the `python` on PATH).
    full_env = {**os.environ, "DEVICE": "cpu", "NPROC": "1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
                "OUTPUT_ROOT": str(tmp_path / "output"), "PYTHON": sys.executable, **env}
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
        work = tmp_path / "output" / "train_full_1p" / folder / "work"
        printed = re.search(rf"output: {re.escape(str(work))}; log: (\S+)\n", result.stdout)  # printed at start
        assert printed, result.stdout
        log = work / "logs" / os.path.basename(printed.group(1))
        assert printed.group(1) == str(log) and LOG_NAME.fullmatch(log.name) and log.is_file()
        failure = re.search(r"training failed with exit code \d+: (.*)", result.stderr)
        assert failure and "error: " in failure.group(1) and str(empty) in failure.group(1), result.stderr
        assert f"full log: {log}" in result.stderr
        assert failure.group(1) in log.read_text()  # the line shown is the log's own error line
        logs.append(log.read_text())
    assert "cfg_b" not in logs[0] and "cfg_a" not in logs[1]  # runs never share a log


@pytest.mark.parametrize("flags, fp16", [
    (["--amp_cfg=True", "--opt_level=O2"], "True"), (["--amp_cfg=True", "--opt_level=O1"], "True"),
    (["--opt_level=O3"], "True"), (["--amp_cfg=True"], "True"), (["--opt_level=O2", "--amp_cfg=True"], "True"),
    (["--amp_cfg=True", "--opt_level=O0"], "False"), (["--opt_level=O0"], "False"), (["--amp_cfg=False"], "False"),
    (["--amp_cfg=False", "--opt_level=O2"], "False"), ([], None)])
def test_apex_flags_and_config_flag_map_to_train_arguments(tmp_path, flags, fp16):
    """apex's two flags are one setting: exactly one `--set fp16=...` (none without them), at the place of
    the first flag, so an explicit --fp16=... after them still wins as train.py applies --set in order."""
    result = _launch("train_full_8p.sh", ["--config=configs/ms1mv3_mbf.py", *flags, "--lr=0.2"], tmp_path,
                     DRY_RUN="1", DEVICE="npu", NPROC="8")
    assert result.returncode == 0, result.stderr
    command = result.stdout.splitlines()[-1]
    assert "--nproc_per_node=8 " in command and f" train.py {REPO_ROOT}/configs/ms1mv3_mbf.py " in command
    assert re.findall(r"--set fp16=\w+", command) == ([f"--set fp16={fp16}"] if fp16 else [])
    assert "--set lr=0.2" in command and "ms1mv3_mbf/work" in command
    if fp16:
        assert command.index("fp16=") < command.index("--set lr=0.2")
    assert not (tmp_path / "output").exists()  # a dry run creates nothing


def test_unknown_opt_level_is_one_line_error(tmp_path):
    result = _launch("train_full_8p.sh", ["--opt_level=O5"], tmp_path, DRY_RUN="1")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "train_full_8p.sh: error: --opt_level=O5: expected O0, O1, O2 or O3\n"


@pytest.mark.timeout(200)
def test_data_path_replaces_the_demo_synthetic_set(insightface_fixtures, tmp_path):
    data = os.path.join(insightface_fixtures, "D")  # 12 images, 3 classes, written by mxnet
    result = _launch("train_full_1p.sh", [f"--data_path={data}", "--batch_size=4", "--max_steps=2",
                                          "--num_workers=0"], tmp_path, timeout=150)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "val_targets=[]" in result.stdout
    logs = list((tmp_path / "output" / "train_full_1p" / "demo_cpu" / "work" / "logs").glob("train_0_*.log"))
    assert len(logs) == 1 and LOG_NAME.fullmatch(logs[0].name)
    log = logs[0].read_text()
    assert re.search(r"\b12 images, 3 classes, world size 1", log), log[-2000:]  # not the demo's 4800 images
    assert (tmp_path / "output" / "train_full_1p" / "demo_cpu" / "work" / "model.pt").is_file()


def _tiny_config(tmp_path):
    """A config that trains in seconds on one CPU process: random tensors, a tiny CNN, no verification."""
    path = tmp_path / "tiny.py"
    path.write_text("from easydict import EasyDict as edict\nconfig = edict()\nconfig.network = 'tiny'\n"
                    "config.embedding_size = 32\nconfig.batch_size = 4\nconfig.num_workers = 0\n"
                    "config.rec = 'random'\nconfig.num_classes = 8\nconfig.num_image = 32\nconfig.val_targets = []\n")
    return str(path)


def _printed_log(result):
    """The log path the launcher printed at start."""
    printed = re.search(r"; log: (\S+)\n", result.stdout)
    assert printed, result.stdout + result.stderr
    return printed.group(1)


@pytest.mark.timeout(200)
def test_a_rerun_keeps_every_log_beside_its_run_and_output_moves_it(tmp_path):
    """Every launch writes a new log in <run folder>/logs/, also when train.py refuses the run; --output=DIR
    takes the log with the run; overwrite=True deletes the previous run's checkpoints, never its logs."""
    run = tmp_path / "elsewhere"
    args = [f"--config={_tiny_config(tmp_path)}", f"--output={run}", "--max_steps=2"]
    first = _launch("train_full_1p.sh", args, tmp_path, timeout=150)
    assert first.returncode == 0, first.stdout + first.stderr
    second = _launch("train_full_1p.sh", args, tmp_path, timeout=150)  # the same config again: refused
    assert second.returncode != 0
    refusal = (f"error: output folder {run} already holds a run (2 checkpoint/model files); continue it with "
               f"resume=True (or \"auto\"), choose another `output`, or set overwrite=True to delete them")
    assert f"training failed with exit code 1: {refusal}\n" in second.stderr
    assert f"full log: {_printed_log(second)}; last lines:" in second.stderr
    third = _launch("train_full_1p.sh", [*args, "--overwrite=True"], tmp_path, timeout=150)
    assert third.returncode == 0, third.stdout + third.stderr

    logs = sorted((run / "logs").iterdir())
    assert [str(p) for p in logs] == sorted(_printed_log(r) for r in (first, second, third))
    assert all(LOG_NAME.fullmatch(p.name) for p in logs) and len(set(logs)) == 3
    first_log, second_log, third_log = (open(_printed_log(r)).read() for r in (first, second, third))
    assert "step 2/2" in first_log and "already holds a run" not in first_log  # the first run's log, intact
    assert refusal in second_log and "step 2/2" not in second_log
    assert "overwrite=True: deleted 2 file(s) of the previous run" in third_log and "step 2/2" in third_log
    assert (run / "model.pt").is_file() and [p.name for p in run.glob("checkpoint_step*.pt")] == [
        "checkpoint_step000000002.pt"]
    assert not (tmp_path / "output").exists()  # nothing of these runs under OUTPUT_ROOT


@pytest.mark.timeout(200)
def test_performance_runs_back_to_back_get_their_own_folders(tmp_path):
    """On one node each performance run trains into a folder of its own (named by its start time, -2 when
    two start in the same second); on several nodes the folder is shared and the run says so."""
    args = [f"--config={_tiny_config(tmp_path)}"]
    runs = [_launch("train_performance_8p.sh", args, tmp_path, timeout=150, PERF_STEPS="2") for _ in range(2)]
    root = tmp_path / "output" / "train_performance_8p"
    folders = sorted(root.iterdir())
    assert len(folders) == 2 and all(re.fullmatch(r"tiny-\d{8}-\d{6}(-\d+)?", f.name) for f in folders), folders
    for result in runs:
        assert result.returncode == 0, result.stdout + result.stderr
        assert re.search(r"Final Performance images/sec : [0-9.]+", result.stdout)
    for folder, log in zip(folders, sorted(_printed_log(r) for r in runs)):
        work = folder / "work"
        assert (work / "model.pt").is_file() and [p.name for p in work.glob("checkpoint_step*.pt")] == [
            "checkpoint_step000000002.pt"]
        assert [str(p) for p in (work / "logs").iterdir()] == [log] and "step 2/2" in open(log).read()

    several = _launch("train_performance_8p.sh", args, tmp_path, DRY_RUN="1", NNODES="2", RUN_NAME="a")
    assert several.returncode == 0, several.stderr
    assert several.stdout.splitlines()[0] == (
        f"train_performance_8p: 2 nodes: reusing {root}/tiny-a/work with overwrite=True (the previous performance "
        "run's checkpoints there are deleted; set RUN_NAME=... to keep runs apart)")
    command = several.stdout.splitlines()[-1]
    assert "--set overwrite=True " in command and f"--set output=\\'{root}/tiny-a/work\\' " in command
    moved = _launch("train_performance_8p.sh", [*args, f"--output={tmp_path / 'mine'}"], tmp_path, DRY_RUN="1")
    assert f"output: {tmp_path / 'mine'}; log: {tmp_path / 'mine'}/logs/train_0_" in moved.stdout  # --output wins
    assert "overwrite=True" not in moved.stdout


@pytest.mark.timeout(200)
def test_launchers_run_the_python_named_by_PYTHON(tmp_path):
    """Tests start the launchers with PYTHON=<the interpreter running pytest>, so a `python` on PATH that is
    another interpreter (or none: pytest started as venv/bin/python without activating the venv) is never used."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text("#!/bin/sh\necho 'not the python running the tests' >&2\nexit 3\n")
    (bin_dir / "python").chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    args = [f"--config={_tiny_config(tmp_path)}", "--max_steps=1"]
    result = _launch("train_full_1p.sh", args, tmp_path, timeout=150, PATH=path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "output" / "train_full_1p" / "tiny" / "work" / "model.pt").is_file()
    # The stand-in is what the launcher finds without PYTHON: the run above did not reach it.
    env = {key: value for key, value in os.environ.items() if key != "PYTHON"}
    bare = subprocess.run(["bash", "test/train_full_1p.sh", *args, "--output=" + str(tmp_path / "bare")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          env={**env, "DEVICE": "cpu", "NPROC": "1", "PATH": path})
    assert bare.returncode == 3
    assert "training failed with exit code 3: not the python running the tests" in bare.stderr


@pytest.mark.timeout(120)
def test_a_name_already_taken_gets_the_next_suffix(tmp_path):
    """Two launches in the same second: the later one's log (and performance folder) gets -2, and what the
    earlier one wrote under that name is left as it was."""
    now = datetime.datetime.now()
    stamps = [(now + datetime.timedelta(seconds=s)).strftime("%Y%m%d-%H%M%S") for s in range(30)]
    run, perf_root = tmp_path / "run", tmp_path / "output" / "train_performance_8p"
    (run / "logs").mkdir(parents=True)
    for stamp in stamps:  # whatever second the launches start in, its name is taken
        (run / "logs" / f"train_0_{stamp}.log").write_text("earlier\n")
        (perf_root / f"tiny-{stamp}").mkdir(parents=True)
    bad_key = "--no_such_key=1"  # train.py refuses it at once: the log is written, nothing trained
    result = _launch("train_full_1p.sh", [f"--config={_tiny_config(tmp_path)}", f"--output={run}", bad_key],
                     tmp_path, timeout=100)
    assert result.returncode != 0
    log = _printed_log(result)
    assert re.fullmatch(rf"{re.escape(str(run))}/logs/train_0_(\d{{8}}-\d{{6}})-2\.log", log), log
    assert "no_such_key" in open(log).read()
    perf = _launch("train_performance_8p.sh", [f"--config={_tiny_config(tmp_path)}", bad_key], tmp_path, timeout=100)
    assert perf.returncode != 0
    assert re.fullmatch(rf"{re.escape(str(perf_root))}/tiny-\d{{8}}-\d{{6}}-2/work/logs/train_0_\d{{8}}-\d{{6}}\.log",
                        _printed_log(perf)), perf.stdout
    assert all((run / "logs" / f"train_0_{stamp}.log").read_text() == "earlier\n" for stamp in stamps)
    assert all(not any((perf_root / f"tiny-{stamp}").iterdir()) for stamp in stamps)
