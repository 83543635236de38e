"""test/*.sh (Ascend ModelZoo-style launchers) on CPU with 2 processes, a few steps."""
import os
import re
import subprocess

import pytest

from tests.conftest import REPO_ROOT, free_port


@pytest.mark.timeout(300)
def test_performance_script_runs_on_cpu_and_prints_fps(tmp_path):
    env = dict(os.environ, DEVICE="cpu", NPROC="2", PERF_STEPS="4", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", "test/train_performance_8p.sh", f"--synthetic.cache_dir={str(tmp_path)!r}",
                             "--synthetic.num_identities=16", "--synthetic.num_val_identities=4",
                             "--synthetic.num_val_pairs=20", "--batch_size=8"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout + result.stderr
    log_line = re.search(r"log: (\S+)", result.stdout)
    assert log_line and os.path.isfile(log_line.group(1))
    assert re.search(r"Final Performance images/sec : [0-9.]+", result.stdout)
    assert "world size 2" in open(log_line.group(1)).read()


def test_launcher_rejects_unknown_arguments():
    result = subprocess.run(["bash", "test/train_full_1p.sh", "positional"], cwd=REPO_ROOT, capture_output=True,
                            text=True, env=dict(os.environ, DEVICE="cpu"), timeout=60)
    assert result.returncode == 2
    assert "unknown argument 'positional' (expected --data_path=DIR or --key=value)" in result.stderr
