"""train.py stopped from outside, as it really happens: SIGTERM/SIGINT to the main process or its process
group (one process and torchrun), a second Ctrl-C, kill -9 (also leftovers of a write it interrupted) and
an elastic restart after a rank dies. Real subprocess runs of a tiny config (48 steps on one process),
every one bounded and its whole process group killed afterwards.

The helpers here are shared with tests/test_train_resume.py.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import torch

from tests.conftest import REPO_ROOT, free_port

PYTHON = sys.executable
RUN_TIMEOUT = 200  # seconds for any one subprocess run (a 2-rank run takes 10-40 s on a quiet 2-core machine)
NUM_IMAGES = 96    # 24 identities x 4 images
NUM_EPOCH = 4
PLANNED_1_RANK = NUM_IMAGES // 8 * NUM_EPOCH    # global batch 8: 48 steps
PLANNED_2_RANKS = NUM_IMAGES // 16 * NUM_EPOCH  # global batch 16: 24 steps
TINY = dict(device="cpu", seed=0, network="tiny", embedding_size=64, batch_size=8, num_epoch=NUM_EPOCH, lr=0.1,
            warmup_epoch=1, frequent=1, verbose=0, num_workers=0, val_targets=[], tensorboard=False,
            keep_checkpoints=3, save_every_steps=0)
SYNTHETIC = dict(num_identities=24, images_per_identity=4, num_val_identities=8, num_val_pairs=40)
STEP_LINE = re.compile(r"step (\d+)/(\d+) epoch (\d+) \| loss \S+ \| lr (\S+) \|")
CHECKPOINT_NAME = re.compile(r"^checkpoint_step(\d+)\.pt$")


# ---------------------------------------------------------------- shared helpers

@pytest.fixture(scope="session")
def identity_cache(tmp_path_factory) -> Path:
    """The tiny generated identity set, written once per session so no run pays for generating it."""
    from utils.config.load import load_config
    from utils.data.synthetic import ensure_identity_set

    cache = tmp_path_factory.getbasetemp() / "arcscale_stop_resume_cache"
    config = write_config(cache, "generate", cache)
    ensure_identity_set(load_config(config))
    return cache


def write_config(folder: Path, name: str, cache: Path, **keys) -> str:
    """A tiny config file ``folder/<name>.py`` with output ``folder/out_<name>`` (keys override TINY)."""
    folder.mkdir(parents=True, exist_ok=True)
    values = dict(TINY, output=str(folder / f"out_{name}"))
    values.update(keys)
    lines = ["from easydict import EasyDict as edict", "config = edict()",
             f"config.synthetic = dict({', '.join(f'{k}={v!r}' for k, v in SYNTHETIC.items())}, "
             f"cache_dir={str(cache)!r})"]
    lines += [f"config.{key} = {value!r}" for key, value in values.items()]
    path = folder / f"{name}.py"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


class Launched:
    """A subprocess in its own session (so its whole process group can be signalled), output to files."""

    def __init__(self, args: list[str], log_dir: Path, env: dict | None = None) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:8]
        self.stdout_path, self.stderr_path = log_dir / f"{tag}.stdout", log_dir / f"{tag}.stderr"
        # torchrun starts each rank in a session of its own, out of reach of killpg: the marker finds them.
        self.marker = uuid.uuid4().hex
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", ARCSCALE_TEST_MARKER=self.marker)
        full_env.update(env or {})
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(args, cwd=REPO_ROOT, stdout=out, stderr=err, env=full_env,
                                         start_new_session=True)
        self.pid = self.proc.pid

    def wait(self, timeout: float = RUN_TIMEOUT) -> int:
        """The exit code, waiting at most ``timeout`` seconds."""
        return self.proc.wait(timeout=timeout)

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the process group (as a terminal or a scheduler does)."""
        os.killpg(self.pid, sig)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def kill_group(self) -> None:
        """SIGKILL the group and every process carrying this run's marker; reap the child."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for pid in marked_pids(self.marker):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


def marked_pids(marker: str, local_rank: int | None = None) -> list[int]:
    """Processes started by one Launched (its marker is in their environment), optionally one LOCAL_RANK."""
    wanted = [f"ARCSCALE_TEST_MARKER={marker}".encode()]
    if local_rank is not None:
        wanted.append(f"LOCAL_RANK={local_rank}".encode())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = (Path("/proc") / entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(item in environ for item in wanted):
            found.append(int(entry))
    return found


@contextlib.contextmanager
def launch(args: list[str], log_dir: Path, env: dict | None = None) -> Iterator[Launched]:
    """Start ``args``; whatever happens in the block, the whole process group is killed afterwards."""
    launched = Launched(args, log_dir, env)
    try:
        yield launched
    finally:
        launched.kill_group()


def train_args(config: str, *overrides: str) -> list[str]:
    """``python train.py CONFIG --set ...``."""
    return [PYTHON, "train.py", config, *[arg for key in overrides for arg in ("--set", key)]]


def torchrun_args(config: str, *overrides: str, nproc: int = 2, extra: tuple[str, ...] = ()) -> list[str]:
    """``python -m torch.distributed.run --nproc_per_node=N [extra] train.py CONFIG --set ...`` on a free port."""
    return [PYTHON, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
            f"--master_port={free_port()}", *extra, "train.py", config,
            *[arg for key in overrides for arg in ("--set", key)]]


def run_to_end(args: list[str], log_dir: Path, env: dict | None = None) -> Launched:
    """Run to completion (bounded); returns the finished Launched for rc and output."""
    with launch(args, log_dir, env) as launched:
        launched.wait()
    return launched


def training_log(output: str | Path) -> str:
    """``<output>/training.log`` (rank 0's log), or "" before it exists."""
    path = Path(output) / "training.log"
    return path.read_text(errors="replace") if path.exists() else ""


def logged_steps(log: str) -> list[dict]:
    """Every ``step S/T epoch E | loss L | lr X | ...`` line as {step, total, epoch, lr}."""
    return [dict(step=int(m[1]), total=int(m[2]), epoch=int(m[3]), lr=float(m[4])) for m in STEP_LINE.finditer(log)]


def wait_for_step(launched: Launched, output: str | Path, step: int, timeout: float = 90) -> None:
    """Block until rank 0 has logged optimizer step ``step`` (frequent=1), failing if the run ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = logged_steps(training_log(output))
        if steps and max(s["step"] for s in steps) >= step:
            return
        if launched.proc.poll() is not None:
            pytest.fail(f"the run ended (rc {launched.proc.returncode}) before step {step}:\n{launched.output[-3000:]}")
        time.sleep(0.01)
    pytest.fail(f"no step {step} within {timeout}s:\n{launched.output[-3000:]}")


def checkpoints(output: str | Path) -> dict[int, Path]:
    """{step: path} of the files named like a checkpoint (ours, not the trainer's discovery code)."""
    found = {}
    for name in os.listdir(output):
        match = CHECKPOINT_NAME.match(name)
        if match:
            found[int(match.group(1))] = Path(output) / name
    return dict(sorted(found.items()))


def load(path: str | Path) -> dict:
    """A checkpoint or model.pt, loaded the safe way (weights_only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(expected_file: str | Path, actual_file: str | Path) -> None:
    """Two state_dict files hold the same keys and bit-identical tensors."""
    expected, actual = load(expected_file), load(actual_file)
    assert sorted(expected) == sorted(actual)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), f"{key} differs between {expected_file} and {actual_file}"


def error_lines(launched: Launched) -> list[str]:
    """The stderr lines that start with ``error:``."""
    return [line for line in launched.stderr.splitlines() if line.startswith("error:")]


def assert_one_line_error(launched: Launched, *needles: str) -> str:
    """Exit 2, exactly one line starting with ``error:`` on stderr, holding every needle, and no traceback."""
    assert launched.proc.returncode == 2, (launched.proc.returncode, launched.output[-3000:])
    assert "Traceback" not in launched.output, launched.output[-3000:]
    lines = error_lines(launched)
    assert len(lines) == 1, f"expected one 'error:' line on stderr:\n{launched.output[-3000:]}"
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def assert_no_traceback(launched: Launched) -> None:
    """Neither a traceback nor a KeyboardInterrupt anywhere in the run's output."""
    text = launched.output
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-4000:]


@pytest.fixture(scope="session")
def reference(tmp_path_factory, identity_cache) -> dict:
    """One uninterrupted single-process run of the tiny config: model.pt, logged steps, checkpoints every 5 steps."""
    folder = tmp_path_factory.getbasetemp() / "arcscale_reference_run"
    # Checkpoints at known steps (5, 10, 12, 15, ...) for the resume tests; saving does not change the training.
    config = write_config(folder, "reference", identity_cache, save_every_steps=5, keep_checkpoints=0)
    output = folder / "out_reference"
    if not (output / "model.pt").exists():
        launched = run_to_end(train_args(config), folder)
        assert launched.proc.returncode == 0, launched.output[-3000:]
    steps = logged_steps(training_log(output))
    assert [s["step"] for s in steps] == list(range(1, PLANNED_1_RANK + 1))
    assert {s["total"] for s in steps} == {PLANNED_1_RANK}
    return dict(model=output / "model.pt", steps=steps, output=output)


def stop_point(launched: Launched, output: Path) -> tuple[int, dict]:
    """The step the stopped run reached (last logged) and the checkpoint written at it."""
    steps = logged_steps(training_log(output))
    assert steps, launched.output[-3000:]
    reached = steps[-1]["step"]
    found = checkpoints(output)
    assert found and max(found) == reached, (
        f"newest checkpoint {sorted(found)} is not at the step reached ({reached}):\n{launched.output[-3000:]}")
    return reached, load(found[reached])


def assert_resumed_from(log_part: str, step: int, planned: int) -> None:
    """The resumed part of a log says so, continues at exactly step+1 and ends at the planned total."""
    assert re.search(rf"resum\w* .*step {step}\b", log_part), log_part[-3000:]
    steps = logged_steps(log_part)
    assert steps[0]["step"] == step + 1, (step, steps[:2])
    assert steps[-1]["step"] == planned and steps[-1]["total"] == planned, steps[-1]


# ---------------------------------------------------------------- signals to one process

@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig, target, workers", [(signal.SIGTERM, "main", 0), (signal.SIGINT, "group", 1)],
                         ids=["sigterm-main-process", "sigint-process-group-with-a-worker"])
def test_signal_checkpoints_the_step_reached_and_resume_is_bit_identical(tmp_path, identity_cache, reference,
                                                                         sig, target, workers):
    config = write_config(tmp_path, "stop", identity_cache, num_workers=workers)
    output = tmp_path / "out_stop"
    with launch(train_args(config), tmp_path) as launched:
        wait_for_step(launched, output, 5)
        if target == "group":  # Ctrl-C in a terminal: the DataLoader worker gets it too
            launched.signal_group(sig)
        else:
            os.kill(launched.pid, sig)
        rc = launched.wait()
    assert rc == 0, launched.output[-3000:]
    assert_no_traceback(launched)
    reached, state = stop_point(launched, output)
    assert 5 <= reached < PLANNED_1_RANK
    assert state["step"] == reached and state["epoch"] == reached // 12
    progress = {key: state["progress"][key] for key in ("epoch", "samples_in_epoch", "global_batch")}
    assert progress == {"epoch": reached // 12, "samples_in_epoch": reached % 12 * 8, "global_batch": 8}

    log_before = len(training_log(output))
    resumed = run_to_end(train_args(config, "resume=True"), tmp_path)
    assert resumed.proc.returncode == 0, resumed.output[-3000:]
    assert_resumed_from(training_log(output)[log_before:], reached, PLANNED_1_RANK)
    assert_same_weights(reference["model"], output / "model.pt")


@pytest.mark.timeout(300)
def test_a_second_ctrl_c_stops_at_once_with_one_line(tmp_path, identity_cache):
    config = write_config(tmp_path, "twice", identity_cache)
    output = tmp_path / "out_twice"
    for _ in range(3):  # the second Ctrl-C must land before the graceful stop is done
        shutil.rmtree(output, ignore_errors=True)
        with launch(train_args(config), tmp_path) as launched:
            wait_for_step(launched, output, 5)
            log_before = len(training_log(output))
            launched.signal_group(signal.SIGINT)
            # Two SIGINTs before Python's handler runs count as one: wait until the first one was noticed.
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not re.search(r"sigint|stop", training_log(output)[log_before:],
                                                                 re.I):
                time.sleep(0.002)
            if launched.proc.poll() is not None:
                continue
            launched.signal_group(signal.SIGINT)
            rc = launched.wait()
        break
    else:
        pytest.fail("the graceful stop always finished within 30 ms; could not send a second Ctrl-C in time")
    assert rc != 0, launched.output[-3000:]
    assert_no_traceback(launched)
    # It says so in one line on stderr (the first Ctrl-C's notice goes to the log), not a traceback wall.
    said = [line for line in launched.stderr.splitlines() if re.search(r"second|again|at once|now", line, re.I)]
    assert len(said) == 1, launched.stderr[-3000:]
    for path in checkpoints(output).values():  # whatever it left under a checkpoint name is complete
        assert isinstance(load(path)["step"], int)


# ---------------------------------------------------------------- signals under torchrun

def rank_tracebacks(launched: Launched) -> int:
    """Tracebacks other than torchrun's own SignalException (which it re-raises after forwarding a signal)."""
    text = launched.output
    own = len(re.findall(r"elastic\.multiprocessing\.api\.SignalException: Process \d+ got signal", text))
    return text.count("Traceback (most recent call last)") - own


@pytest.mark.timeout(300)
def test_sigterm_to_torchrun_checkpoints_both_ranks_at_one_step(tmp_path, identity_cache, record_property):
    # Resuming such a checkpoint (on 1 rank) is tests/test_train_resume.py::test_a_two_rank_run_continues_on_one_rank.
    config = write_config(tmp_path, "dist", identity_cache)
    output = tmp_path / "out_dist"
    with launch(torchrun_args(config), tmp_path) as launched:
        wait_for_step(launched, output, 4)
        os.kill(launched.pid, signal.SIGTERM)  # kill -TERM <torchrun pid>: torchrun forwards it to the ranks
        rc = launched.wait()
    record_property("torchrun_returncode_after_sigterm", rc)
    assert not rank_tracebacks(launched), launched.output[-4000:]
    assert "ChildFailedError" not in launched.output, launched.output[-4000:]  # every rank exited 0
    # torchrun re-raises the signal it forwarded: 0, or 1 with only its own SignalException traceback.
    assert rc == 0 or (rc == 1 and "SignalException" in launched.stderr), (rc, launched.output[-3000:])
    reached, state = stop_point(launched, output)
    assert state["world_size"] == 2 and state["progress"]["global_batch"] == 16
    assert state["progress"]["samples_in_epoch"] == reached % 6 * 16


@pytest.mark.timeout(300)
def test_ctrl_c_to_the_torchrun_process_group_checkpoints_once(tmp_path, identity_cache, record_property):
    # A terminal's Ctrl-C goes to torchrun's process group. torch starts each rank in a session of its own,
    # so only torchrun gets it, and forwards it to the ranks once.
    config = write_config(tmp_path, "ctrlc", identity_cache)
    output = tmp_path / "out_ctrlc"
    with launch(torchrun_args(config), tmp_path) as launched:
        wait_for_step(launched, output, 4)
        launched.signal_group(signal.SIGINT)
        rc = launched.wait()
    record_property("torchrun_returncode_after_group_sigint", rc)
    assert not rank_tracebacks(launched), launched.output[-4000:]
    assert "KeyboardInterrupt" not in launched.output and "ChildFailedError" not in launched.output
    reached, state = stop_point(launched, output)
    assert state["world_size"] == 2 and state["step"] == reached


# ---------------------------------------------------------------- kill -9 and elastic restarts

@pytest.mark.timeout(300)
def test_kill_9_then_resume_skips_broken_files_and_matches_the_straight_run(tmp_path, identity_cache, reference):
    config = write_config(tmp_path, "kill", identity_cache, save_every_steps=2)
    output = tmp_path / "out_kill"
    with launch(train_args(config), tmp_path) as launched:
        wait_for_step(launched, output, 6)
        time.sleep(random.uniform(0.0, 0.3))  # a random moment: between steps, in a step or in a write
        launched.signal_group(signal.SIGKILL)
        launched.wait()
    found = checkpoints(output)
    assert found, os.listdir(output)
    for path in found.values():  # a complete file under every checkpoint name, whatever the moment was
        assert load(path)["step"] == int(CHECKPOINT_NAME.match(path.name).group(1))
    newest = max(found)
    # What an interrupted write can leave: temp files, and (on filesystems without atomic rename, or a copy
    # tool killed half-way) a truncated file under a checkpoint name newer than the newest good one.
    truncated = output / f"checkpoint_step{newest + 1:09d}.pt"
    data = found[newest].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    (output / f"checkpoint_step{newest + 2:09d}.pt.tmp.999999").write_bytes(data[: len(data) // 3])
    (output / "model.pt.tmp.999999").write_bytes(b"\x00" * 1000)

    log_before = len(training_log(output))
    resumed = run_to_end(train_args(config, "resume=True"), tmp_path)
    assert resumed.proc.returncode == 0, resumed.output[-3000:]
    assert "Traceback" not in resumed.output
    log_part = training_log(output)[log_before:]
    assert any(truncated.name in line and "WARNING" in line for line in log_part.splitlines()), log_part[-3000:]
    assert_resumed_from(log_part, newest, PLANNED_1_RANK)
    final = checkpoints(output)
    assert load(final[max(final)])["step"] == PLANNED_1_RANK
    assert_same_weights(reference["model"], output / "model.pt")


def worker_pids(parent: int) -> list[int]:
    """DataLoader worker processes (multiprocessing spawn children) of ``parent``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = (Path("/proc") / entry / "stat").read_text()
            cmdline = (Path("/proc") / entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"spawn_main" in cmdline:
            found.append(int(entry))
    return found


@pytest.mark.timeout(300)
def test_a_killed_dataloader_worker_is_a_one_line_error(tmp_path, identity_cache):
    config = write_config(tmp_path, "worker", identity_cache, num_workers=1, save_every_steps=2)
    output = tmp_path / "out_worker"
    with launch(train_args(config), tmp_path) as launched:
        wait_for_step(launched, output, 4)
        workers = worker_pids(launched.pid)
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGKILL)  # e.g. the kernel's OOM killer
        rc = launched.wait()
    assert rc == 2, launched.output[-3000:]
    assert_one_line_error(launched, "worker")
    found = checkpoints(output)
    assert found and load(found[max(found)])["step"] == max(found)  # the last good checkpoint resumes


def kill_worker_mid_write(tmp_path: Path, config: str, target: str, ranks: int = 1) -> tuple[Launched, dict]:
    """Run the config under tests/kill_worker_mid_write.py (rank 0's worker dies while ``target`` is written)."""
    report = tmp_path / f"report_{uuid.uuid4().hex[:6]}.json"
    driver = [os.path.join("tests", "kill_worker_mid_write.py"), target, str(report), config]
    args = [PYTHON, *driver] if ranks == 1 else [*torchrun_args(config, nproc=ranks)[:-2], *driver]
    launched = run_to_end(args, tmp_path)
    assert report.exists(), f"the worker was never killed during {target}:\n{launched.output[-3000:]}"
    return launched, json.loads(report.read_text())


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ranks", [1, 2])
def test_a_worker_killed_during_a_checkpoint_write_leaves_it_whole_and_stops_with_one_line(tmp_path, identity_cache,
                                                                                           ranks):
    config = write_config(tmp_path, "mid_write", identity_cache, num_workers=1, save_every_steps=2)
    output = tmp_path / "out_mid_write"
    launched, report = kill_worker_mid_write(tmp_path, config, "checkpoint_step000000004.pt", ranks)
    # Step 5's batches were delivered before the death (each step fetches the next step's batches before its
    # optimizer step), so step 5 trains; the death is agreed on in its decision all-reduce and the run stops there.
    if ranks == 1:
        assert_one_line_error(launched, f"DataLoader worker (pid {report['worker_pid']})", "checkpoint saved at step 5",
                              "resume=True")
    else:  # torchrun reports the ranks' exit code 2 as its own failure; each rank printed one line
        assert launched.proc.returncode != 0 and "Traceback" not in training_log(output)
        lines = error_lines(launched)
        assert any(f"DataLoader worker (pid {report['worker_pid']})" in line for line in lines), launched.output[-3000:]
        assert all("checkpoint saved at step 5" in line for line in lines), lines
    assert not [name for name in os.listdir(output) if ".tmp." in name], os.listdir(output)
    found = checkpoints(output)
    assert sorted(found) == [2, 4, 5], sorted(found)  # the one being written is whole; then the stop's
    assert load(found[4])["step"] == 4 and load(found[5])["step"] == 5
    assert report["previous"] and all(  # the checkpoints before it are untouched
        hashlib.sha256((output / name).read_bytes()).hexdigest() == digest for name, digest in report["previous"].items())
    planned = PLANNED_1_RANK if ranks == 1 else PLANNED_2_RANKS
    resume = train_args(config, "resume=True") if ranks == 1 else torchrun_args(config, "resume=True", nproc=ranks)
    resumed = run_to_end(resume, tmp_path)
    assert resumed.proc.returncode == 0, resumed.output[-3000:]
    log = training_log(output)
    assert_resumed_from(log[log.rindex("resumed from"):], 5, planned)
    assert load(checkpoints(output)[planned])["step"] == planned


@pytest.mark.timeout(300)
def test_a_worker_killed_during_the_final_model_write_leaves_a_complete_run(tmp_path, identity_cache):
    config = write_config(tmp_path, "final_write", identity_cache, num_workers=1)
    output = tmp_path / "out_final_write"
    launched, report = kill_worker_mid_write(tmp_path, config, f"model.pt@checkpoint_step{PLANNED_1_RANK:09d}.pt")
    assert launched.proc.returncode == 0, launched.output[-3000:]  # every batch was trained on: the result stands
    assert_no_traceback(launched)
    assert report["file"].startswith(str(output / "model.pt"))
    final = load(checkpoints(output)[PLANNED_1_RANK])
    model = load(output / "model.pt")
    assert sorted(model) == sorted(final["backbone"])
    assert all(torch.equal(model[key], final["backbone"][key]) for key in model)
    assert f"DataLoader worker (pid {report['worker_pid']}) is killed" in training_log(output)


def find_rank_pid(launched: Launched, local_rank: int, timeout: float = 60) -> int:
    """The pid of the torchrun worker with LOCAL_RANK=local_rank (the train.py process, not its children)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in marked_pids(launched.marker, local_rank):
            with contextlib.suppress(OSError):
                cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes()
                if b"train.py" in cmdline and b"spawn_main" not in cmdline:
                    return pid
        time.sleep(0.1)
    pytest.fail(f"no process with LOCAL_RANK={local_rank} and marker {launched.marker}")


@pytest.mark.timeout(300)
def test_elastic_restart_after_a_rank_is_killed_resumes_by_itself(tmp_path, identity_cache):
    config = write_config(tmp_path, "elastic", identity_cache, save_every_steps=2, resume="auto")
    output = tmp_path / "out_elastic"
    # torchrun keeps its store across restarts: unless the trainer prefixes its process group's keys per
    # attempt, the restarted ranks read the dead ranks' gloo addresses and fail to connect.
    with launch(torchrun_args(config, extra=("--max-restarts=1",)), tmp_path) as launched:
        wait_for_step(launched, output, 7)
        assert checkpoints(output), os.listdir(output)
        os.kill(find_rank_pid(launched, 1), signal.SIGKILL)
        rc = launched.wait()
    assert rc == 0, launched.output[-4000:]
    log = training_log(output)
    match = re.search(r"resum\w* .*step (\d+)\b", log)
    assert match, log[-3000:]
    resumed_at = int(match.group(1))
    assert_resumed_from(log[match.start():], resumed_at, PLANNED_2_RANKS)
    final = checkpoints(output)
    assert load(final[max(final)])["step"] == PLANNED_2_RANKS
