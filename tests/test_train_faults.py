"""train.py when a rank stalls, memory runs out, or start-up is slow: a rank stopped with SIGSTOP under
torchrun, a real allocation failure under an address-space limit, the first step's peak memory and the
DataLoader workers' start. Real subprocess runs of the tiny config of tests/test_train_stops.py, each
bounded and its processes killed afterwards."""
from __future__ import annotations

import hashlib
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.test_train_stops import (PYTHON, checkpoints, find_rank_pid, identity_cache, launch, load,  # noqa: F401
                                    logged_steps, run_to_end, torchrun_args, train_args, training_log,
                                    wait_for_step, write_config)


def file_hashes(folder: Path) -> dict[str, str]:
    """{name: SHA-256} of every file in ``folder`` (training.log aside: it is the run's diary, not its state)."""
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.iterdir()) if path.is_file() and path.name != "training.log"}


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------- a stalled rank

@pytest.mark.timeout(300)
def test_a_stalled_rank_is_named_and_the_run_stops_with_its_checkpoints_untouched(tmp_path, identity_cache):
    timeout_s = 20
    config = write_config(tmp_path, "stall", identity_cache, num_epoch=40, save_every_steps=2,
                          collective_timeout_s=timeout_s)
    output = tmp_path / "out_stall"
    with launch(torchrun_args(config), tmp_path) as launched:
        rank1 = find_rank_pid(launched, 1)
        wait_for_step(launched, output, 3)
        os.kill(rank1, signal.SIGSTOP)  # alive but not running: no exit for torchrun to notice
        stopped_at = time.monotonic()
        while not re.search(r"has waited \d+ s for rank 1", training_log(output)):
            assert launched.proc.poll() is None, launched.output[-3000:]
            assert time.monotonic() - stopped_at < 60, training_log(output)[-3000:]
            time.sleep(0.2)
        state = file_hashes(output)  # rank 0 is waiting now: nothing may change from here on
        rc = launched.wait(timeout=150)
    assert rc != 0, launched.output[-3000:]
    log = training_log(output)
    warning = re.search(r"step (\d+) has waited (\d+) s for rank 1 \(no sign of life for \d+ s\); the run stops at "
                        rf"collective_timeout_s={timeout_s} s", log)
    assert warning and 5 <= int(warning.group(2)) < timeout_s, log[-3000:]
    lines = error_lines(launched.stderr)
    assert len(lines) == 1, launched.output[-3000:]
    assert re.match(rf"error: step {warning.group(1)}: rank 1 \(no sign of life for \d+ s\) did not arrive within "
                    rf"collective_timeout_s={timeout_s} s; stopped without writing anything", lines[0]), lines[0]
    assert lines[0] in log  # training.log tells it too
    # Rank 0 left with exit 2 (torchrun's summary), without a traceback of its own or gloo's timeout text.
    assert re.search(r"exitcode\s*:\s*2", launched.output), launched.output[-3000:]
    assert "Timed out waiting" not in launched.output and 'File "/' not in launched.stderr.split("error:")[0]
    # Checkpoint state untouched: the same files, bit for bit, and the newest loads.
    assert file_hashes(output) == state
    newest = checkpoints(output)
    assert load(newest[max(newest)])["step"] == max(newest) <= int(warning.group(1))


# ---------------------------------------------------------------- out of memory

# Address space this far above what the trainer has mapped once torch, cv2 and numpy are imported: ample for
# the tiny network at batch 8, far too little for batch 4800 (its first float copy of the batch alone is
# 689 MiB, the activations several GiB).
HEADROOM = 1536 << 20
LIMITED = """
import re, resource, runpy, sys
import cv2, numpy, torch
mapped = int(re.search(r"VmSize:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
resource.setrlimit(resource.RLIMIT_AS, (mapped + {headroom}, mapped + {headroom}))
sys.argv = {argv!r}
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.timeout(200)
def test_out_of_memory_is_one_line_with_the_step_the_size_and_what_to_lower(tmp_path, identity_cache):
    config = write_config(tmp_path, "oom", identity_cache, rec="random", num_image=9600, num_classes=100,
                          batch_size=4800, save_every_steps=1)
    output = tmp_path / "out_oom"
    argv = ["train.py", config]
    launched = run_to_end([PYTHON, "-c", LIMITED.format(headroom=HEADROOM, argv=argv)], tmp_path)
    assert launched.proc.returncode == 2, launched.output[-3000:]
    assert "Traceback" not in launched.output and "DefaultCPUAllocator" not in launched.output, launched.output[-3000:]
    lines = error_lines(launched.stderr)
    assert len(lines) == 1, launched.stderr[-3000:]
    match = re.fullmatch(r"error: out of host memory \(RAM\) at step 1: tried to allocate ([0-9.]+) (MiB|GiB); lower "
                         r"batch_size \(now 4800; raise gradient_acc, now 1, to keep the global batch\), sample_rate "
                         r"\(now 1\), or the head's storage: pfc_weight_dtype \(now float32\) and pfc_state_dtype "
                         r"\(now float32\) = bfloat16 or, for the state, int8", lines[0])
    assert match, lines[0]
    assert float(match.group(1)) * (2**30 if match.group(2) == "GiB" else 2**20) >= 100 << 20  # a batch-sized ask
    # Nothing was trained, so nothing was saved; training.log says why it ended.
    assert not checkpoints(output) and not (output / "model.pt").exists()
    assert lines[0] in training_log(output)


@pytest.mark.parametrize("message, said", [
    ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB of which 1.02 GiB "
     "is free.", "out of GPU memory at step 1: tried to allocate 2.00 GiB"),
    ("NPU out of memory. Tried to allocate 260.00 MiB (NPU 0; 28.50 GiB total capacity; 10.24 GiB already "
     "allocated; 149.57 MiB free)", "out of NPU memory at step 1: tried to allocate 260.0 MiB"),
], ids=["cuda", "npu"])
def test_accelerator_out_of_memory_messages_become_one_line(tmp_path, identity_cache, monkeypatch, capsys, message,
                                                            said):
    import train
    from backbones.tiny import TinyFaceNet

    def out_of_memory(self, x):
        raise torch.OutOfMemoryError(message)  # what torch.cuda's and torch_npu's caching allocators raise

    monkeypatch.setattr(TinyFaceNet, "forward", out_of_memory)
    config = write_config(tmp_path, "accel", identity_cache, head="softmax")
    assert train.main([config]) == 2
    lines = error_lines(capsys.readouterr().err)
    # A replicated softmax head has no Partial FC keys to lower.
    assert lines == [f"error: {said}; lower batch_size (now 8; raise gradient_acc, now 1, to keep the global batch)"]
    assert not checkpoints(tmp_path / "out_accel")


def test_out_of_memory_in_verification_names_val_batch_size(tmp_path, identity_cache, monkeypatch, capsys):
    import eval.verification
    import train

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 1073741824 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(eval.verification, "embed_images", out_of_memory)
    config = write_config(tmp_path, "val", identity_cache, val_targets=["synthetic_unseen"], max_steps=2)
    assert train.main([config]) == 2
    assert error_lines(capsys.readouterr().err) == [
        "error: out of host memory (RAM) at step 2's verification: tried to allocate 1.00 GiB; lower val_batch_size "
        "(now 256)"]
    assert sorted(checkpoints(tmp_path / "out_val")) == [2]  # the final checkpoint came first: nothing lost


# ---------------------------------------------------------------- what start-up tells

def ram_bytes() -> int:
    """The machine's RAM as the kernel reports it (or this cgroup's limit when lower)."""
    total = int(re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1)) * 1024
    for limit_file in (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")):
        if limit_file.exists() and limit_file.read_text().strip().isdigit():
            total = min(total, int(limit_file.read_text()))
    return total


def gib(number: str, unit: str) -> float:
    return float(number) / (1024 if unit == "MiB" else 1)


@pytest.mark.timeout(200)
def test_the_first_steps_peak_memory_is_logged_against_the_ram(tmp_path, identity_cache):
    config = write_config(tmp_path, "mem", identity_cache, max_steps=3)
    launched = run_to_end(train_args(config), tmp_path)
    assert launched.proc.returncode == 0, launched.output[-3000:]
    log = training_log(tmp_path / "out_mem")
    reports = re.findall(r"step (\d+) \(this run's first\): peak ([0-9.]+) (MiB|GiB) resident \(this process\) of "
                         r"([0-9.]+) GiB RAM: ([0-9.]+) (MiB|GiB) headroom", log)
    assert len(reports) == 1, log[-3000:]  # once, after the first step
    step, peak, unit, total, headroom, headroom_unit = reports[0]
    assert step == "1"
    assert float(total) == pytest.approx(ram_bytes() / 2**30, abs=0.006)
    # A trainer's resident set: above the interpreter with torch (~0.2 GiB), far below the RAM; the
    # headroom is what is left.
    assert 0.15 < gib(peak, unit) < float(total)
    assert gib(headroom, headroom_unit) == pytest.approx(float(total) - gib(peak, unit), abs=0.01)
    # The status line's figure (peak RSS too) is never below it: the peak only grows.
    later = [float(m) for m in re.findall(r"\| mem ([0-9.]+) GiB \|", log)]
    assert later and min(later[1:] or later) >= round(gib(peak, unit), 2) - 0.01
    assert "DataLoader worker" not in log  # num_workers=0: no worker processes to start


@pytest.mark.timeout(200)
def test_dataloader_worker_start_is_logged_once_with_its_duration(tmp_path, identity_cache):
    config = write_config(tmp_path, "workers", identity_cache, num_workers=2, num_epoch=2)
    launched = run_to_end(train_args(config), tmp_path)
    assert launched.proc.returncode == 0, launched.output[-3000:]
    log = training_log(tmp_path / "out_workers")
    stamp = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)"
    starting = re.findall(stamp + r" \[rank 0\] INFO starting 2 DataLoader worker process\(es\) \(num_workers=2 per "
                                  r"rank\)", log)
    started = re.findall(stamp + r" \[rank 0\] INFO DataLoader workers started: first batch after ([0-9.]+) s", log)
    # Persistent workers start once, although the run has two epochs.
    assert len(starting) == 1 and len(started) == 1, log[-3000:]
    assert {s["epoch"] for s in logged_steps(log)} == {0, 1}
    first_step = re.search(stamp + r" \[rank 0\] INFO step 1/", log)
    assert log.index(started[0][0] + " [rank 0] INFO DataLoader") < first_step.start()
    # The duration is the time between the two lines (whole seconds in the log) and a worker's start
    # (a new interpreter importing torch) is not instant.
    parse = lambda text: time.mktime(time.strptime(text, "%Y-%m-%d %H:%M:%S"))  # noqa: E731
    took = float(started[0][1])
    assert 0.2 < took <= parse(started[0][0]) - parse(starting[0]) + 1


@pytest.mark.timeout(200)
def test_a_rank_that_never_joins_is_one_line_after_the_timeout(tmp_path, identity_cache):
    from tests.conftest import free_port

    # Rank 0 of 2 launched by hand (as a scheduler's script would), rank 1 never: rank 0 hosts the
    # rendezvous store and waits collective_timeout_s plus the process group's grace.
    config = write_config(tmp_path, "alone", identity_cache, collective_timeout_s=1)
    port = str(free_port())
    env = dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    began = time.monotonic()
    launched = run_to_end(train_args(config), tmp_path, env=env)
    took = time.monotonic() - began
    assert launched.proc.returncode == 2 and "Traceback" not in launched.output, launched.output[-3000:]
    lines = error_lines(launched.stderr)
    assert len(lines) == 1 and lines[0].startswith(
        f"error: rank 0 of 2 could not join the gloo process group at 127.0.0.1:{port}") and lines[0].endswith(
        "(not all ranks joined within 61 s: are all ranks/nodes started? config key 'collective_timeout_s' sets the "
        "wait)"), lines  # torch's words in between
    assert 61 <= took < 120
    assert not (tmp_path / "out_alone").exists()  # nothing was started



def test_a_dataloader_worker_out_of_memory_is_said_as_such_not_as_a_dead_worker(tmp_path):
    from utils.run.steps import fetch_step
    from utils.config.load import load_config
    from utils.devices.device import DeviceContext
    from utils.run.failures import failure_line
    from utils.run.stop import WorkerDeaths
    from utils.run.watchdog import StepWatch

    cfg = load_config(write_config(tmp_path, "worker_oom", tmp_path, num_workers=2))
    watch = StepWatch(DeviceContext("cpu", torch.device("cpu"), 0, 0, 1, "gloo"), cfg.collective_timeout_s)

    def batches(message: str):
        raise RuntimeError(message)
        yield  # a generator, as the loader's iterator

    # How torch re-raises a worker's exception in the main process.
    worker_oom = ("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                  "RuntimeError: [enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                  "memory: you tried to allocate 185794560 bytes. Error code 12 (Cannot allocate memory)")
    with pytest.raises(RuntimeError) as raised:
        fetch_step(batches(worker_oom), 1, WorkerDeaths(), watch, 1)
    assert failure_line(raised.value, cfg, watch) == (
        "out of host memory (RAM) at step 1 (loading its batches): tried to allocate 177.2 MiB; lower batch_size "
        "(now 8; raise gradient_acc, now 1, to keep the global batch), or num_workers (now 2; each worker holds "
        "batches in flight)")
    # A worker that died is still the dead-worker stop (checkpoint, then one line), not an exception.
    died = "DataLoader worker (pid 4242) is killed by signal: Killed."
    assert fetch_step(batches(died), 1, WorkerDeaths(), watch, 2) == (None, died, 0.0)
