"""Test driver: train.py, with one DataLoader worker SIGKILLed in the middle of a chosen file write.

    python tests/kill_worker_mid_write.py TARGET REPORT CONFIG [--set key=value ...]

TARGET names the file whose write is interrupted: ``checkpoint_step000000004.pt``, or
``model.pt@checkpoint_step000000048.pt`` (model.pt, once that checkpoint exists). After the first
kilobyte of that file has gone through torch.save's writer, the worker is killed and the write is
held until the death has reached this process (the worker is a zombie and SIGCHLD's Python handler
has had bytecodes to run on); then the write goes on. REPORT receives JSON: the worker's pid, the
file, and the SHA-256 of every checkpoint on disk at that moment. The race a real OOM kill is, made
deterministic.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import train  # noqa: E402


def is_zombie(pid: int) -> bool:
    """Whether ``pid`` has exited and waits to be reaped (its SIGCHLD has been sent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class KillingWriter:
    """A file-like that passes writes through and kills the worker once, after the first kilobyte."""

    def __init__(self, handle: Any, path: str, report: str) -> None:
        self.handle, self.path, self.report, self.written, self.fired = handle, path, report, 0, False

    def write(self, data: Any) -> int:
        written = self.handle.write(data)
        self.written += len(memoryview(data))
        if not self.fired and self.written >= 1024:
            self.fired = True
            self.kill_a_worker()
        return written

    def flush(self) -> None:
        self.handle.flush()

    def kill_a_worker(self) -> None:
        workers = [process.pid for process in multiprocessing.active_children()]
        assert len(workers) == 1, f"expected one DataLoader worker, found {workers}"
        folder = os.path.dirname(self.path)
        previous = {name: hashlib.sha256(Path(folder, name).read_bytes()).hexdigest()
                    for name in sorted(os.listdir(folder)) if name.startswith("checkpoint_step") and name.endswith(".pt")}
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not is_zombie(workers[0]) and time.monotonic() < deadline:
            time.sleep(0.01)
        for _ in range(20):  # bytecodes (and EINTR-able sleeps) for a pending Python signal handler to run on
            time.sleep(0.01)
        Path(self.report).write_text(json.dumps({"worker_pid": workers[0], "file": self.path, "previous": previous}))


def main() -> int:
    target, report, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    name, _, after = target.partition("@")
    real_save = torch.save
    state = {"fired": False}

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
        path = str(getattr(f, "name", f))
        folder = os.path.dirname(path)
        wanted = (os.path.basename(path).startswith(name + ".tmp.")
                  and (not after or os.path.exists(os.path.join(folder, after))))
        if state["fired"] or not wanted:
            return real_save(obj, f, *args, **kwargs)
        state["fired"] = True
        return real_save(obj, KillingWriter(f, path, report), *args, **kwargs)

    torch.save = save
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main())
