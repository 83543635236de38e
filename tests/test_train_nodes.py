"""train.py on two "nodes" on loopback (two torchrun agents, one rank each) as the nodes of a cluster really
differ: no shared filesystem (each node gets its own `output` / `val_data_dir` through --set) and elastic
restarts where one node's worker dies. Real subprocess runs of the tiny config of tests/test_train_stops.py,
every one bounded and its process groups killed afterwards."""
from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import free_port
from tests.test_train_stops import (PLANNED_2_RANKS, PYTHON, Launched, assert_resumed_from,  # noqa: F401
                                    checkpoints, find_rank_pid, identity_cache, launch, load, logged_steps,
                                    training_log, wait_for_step, write_config)


def node_args(config: str, node: int, port: int, *overrides: str, extra: tuple[str, ...] = ()) -> list[str]:
    """torchrun for node ``node`` of 2 (one rank each) on 127.0.0.1, then train.py CONFIG --set ..."""
    return [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=1", "--nnodes=2", f"--node_rank={node}",
            "--master_addr=127.0.0.1", f"--master_port={port}", *extra, "train.py", config,
            *[arg for key in overrides for arg in ("--set", key)]]


@contextlib.contextmanager
def two_nodes(config: str, log_dir: Path, per_node: tuple[tuple[str, ...], tuple[str, ...]],
              extra: tuple[str, ...] = (), env: dict | None = None) -> Iterator[list[Launched]]:
    """Both nodes started; whatever happens in the block, both are killed afterwards."""
    port = free_port()
    with launch(node_args(config, 0, port, *per_node[0], extra=extra), log_dir / "node0", env) as node0, \
            launch(node_args(config, 1, port, *per_node[1], extra=extra), log_dir / "node1", env) as node1:
        yield [node0, node1]


def run_two_nodes(config: str, log_dir: Path, per_node, timeout: float = 240) -> list[Launched]:
    with two_nodes(config, log_dir, per_node) as nodes:
        for node in nodes:
            node.wait(timeout)
    return nodes


def one_error_line(node: Launched) -> str:
    """The worker's one ``error:`` line and exit code 2, no traceback from it (torchrun then prints its own
    failure report, a ChildFailedError traceback naming the worker's exit code)."""
    worker_part = node.stderr.split("failed (exitcode")[0]
    assert "Traceback" not in worker_part and re.search(r"exitcode\s*: 2\b", node.stderr), node.output[-3000:]
    lines = [line for line in worker_part.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, node.output[-3000:]
    return lines[0]


@pytest.mark.timeout(600)
def test_without_a_shared_filesystem_a_resume_stops_with_one_line_and_verification_agrees(tmp_path,
                                                                                           identity_cache):
    # Each node its own `output` and `val_data_dir`, as on nodes with local disks only.
    bin_file = glob.glob(str(identity_cache / "**" / "synthetic_unseen.bin"), recursive=True)[0]
    val = [tmp_path / "val_node0", tmp_path / "val_node1"]
    for folder in val:
        folder.mkdir()
    shutil.copy(bin_file, val[0])  # only node 0 has the verification set
    out = [tmp_path / "out_node0", tmp_path / "out_node1"]
    config = write_config(tmp_path, "nodes", identity_cache, max_steps=2, save_every_steps=2,
                          val_targets=["synthetic_unseen"], verify_at_start=False)
    per_node = tuple((f"output={str(out[n])!r}", f"val_data_dir={str(val[n])!r}") for n in range(2))

    # A fresh run trains: every rank leaves out the target node 1 cannot see (no rank waits in its
    # all-gathers), and rank 0 warns at once that node 1 does not see its output folder.
    nodes = run_two_nodes(config, tmp_path / "fresh", per_node)
    assert [node.proc.returncode for node in nodes] == [0, 0], nodes[0].output[-3000:] + nodes[1].output[-3000:]
    log = training_log(out[0])
    assert logged_steps(log)[-1]["step"] == 2
    assert re.search(r"WARNING.*verification target 'synthetic_unseen': \S+val_node0/synthetic_unseen.bin is not "
                     r"visible on rank\(s\) 1 \(node\(s\) 1\); training goes on without it", log), log[-3000:]
    assert "Accuracy" not in log  # left out on every rank
    assert re.search(rf"WARNING.*output {re.escape(str(out[0]))} is not visible on rank\(s\) 1 \(node\(s\) 1\)", log)
    assert list(checkpoints(out[0])) == [2] and not out[1].exists()  # rank 0 alone writes

    # Resuming it: rank 0 chooses its newest checkpoint, node 1 has no such file: both stop with one line.
    per_node = tuple(options + ("resume=True", "max_steps=4") for options in per_node)
    chosen = out[0] / "checkpoint_step000000002.pt"
    for other_file, expected in ((None, "is not visible on rank 1 (node 1)"),
                                 (b"not a checkpoint", "on rank 1 (node 1) is not the file rank 0 chose")):
        if other_file is not None:
            out[1].mkdir(exist_ok=True)
            (out[1] / chosen.name).write_bytes(other_file)  # the same name, another file
        log_before = len(training_log(out[0]))
        nodes = run_two_nodes(config, tmp_path / "resume", per_node)
        for node in nodes:
            assert node.proc.returncode != 0
            line = one_error_line(node)
            assert line.startswith(f"error: checkpoint {chosen} {expected}"), line
            assert line.endswith("output must be on a filesystem every node sees"), line
        assert not logged_steps(training_log(out[0])[log_before:])  # nothing trained

    # With the same file on both (as on a shared filesystem) both nodes resume at step 2 and agree to step 4.
    shutil.copy(chosen, out[1] / chosen.name)
    log_before = len(training_log(out[0]))
    nodes = run_two_nodes(config, tmp_path / "resume", per_node)
    assert [node.proc.returncode for node in nodes] == [0, 0], nodes[0].output[-3000:] + nodes[1].output[-3000:]
    assert_resumed_from(training_log(out[0])[log_before:], 2, 4)
    assert load(checkpoints(out[0])[4])["step"] == 4


def wait_for_text(launched: Launched, pattern: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, launched.stderr):
        if time.monotonic() > deadline or launched.proc.poll() is not None:
            pytest.fail(f"no {pattern!r} from torchrun:\n{launched.output[-3000:]}")
        time.sleep(0.05)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_a_worker_killed_on_one_node_restarts_both_and_the_run_resumes(tmp_path, identity_cache, rendezvous):
    """static (--master_addr/--master_port): both agents see their worker fail and both count a restart.
    c10d: the other node's worker is paused meanwhile, so its agent restarts it for the membership change
    and counts nothing: TORCHELASTIC_RESTART_COUNT is 1 on one node and 0 on the other."""
    # resume=False: the restarted attempt must know by itself, on both nodes, that it continues this run
    config = write_config(tmp_path, "elastic", identity_cache, save_every_steps=2)
    output = tmp_path / "out_elastic"
    extra = ("--max-restarts=1",)
    if rendezvous == "c10d":
        extra += ("--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}")
    with two_nodes(config, tmp_path, ((), ()), extra=extra, env={"LOGLEVEL": "INFO"}) as nodes:
        wait_for_step(nodes[0], output, 5)
        assert checkpoints(output), os.listdir(output)
        survivor = find_rank_pid(nodes[0], 0)
        if rendezvous == "c10d":
            os.kill(survivor, signal.SIGSTOP)
        os.kill(find_rank_pid(nodes[1], 0), signal.SIGKILL)
        if rendezvous == "c10d":
            wait_for_text(nodes[0], r"new nodes from group_rank=\d+; will restart worker group")
            os.kill(survivor, signal.SIGCONT)
        rcs = [node.wait(240) for node in nodes]
    assert rcs == [0, 0], nodes[0].output[-3000:] + nodes[1].output[-3000:]
    counts = [re.findall(r"restart_count=(\d+)", node.stderr)[-1] for node in nodes]
    assert counts == (["1", "1"] if rendezvous == "static" else ["0", "1"]), counts  # what each agent told its worker
    log = training_log(output)
    match = re.search(r"resumed from .* at step (\d+)\b", log)
    assert match, log[-3000:]
    assert "elastic restart 1: continuing from the newest checkpoint" in log
    assert_resumed_from(log[match.start():], int(match.group(1)), PLANNED_2_RANKS)
    final = checkpoints(output)
    assert load(final[max(final)])["step"] == PLANNED_2_RANKS
