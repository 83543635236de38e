"""Test driver: train.py, with chosen file writes failing as they do on a full disk.

    python tests/fail_writes.py NAME[,NAME...] REPORT CONFIG [--set key=value ...]

Every write of a file named NAME (e.g. ``checkpoint_step000000004.pt`` or ``model.pt``) goes through
torch.save's real zip writer into a file object whose ``write`` passes the first KiB and then raises
``OSError(ENOSPC)``, which is what a full disk does under it: torch turns that into its own
``RuntimeError: [enforce fail at inline_container.cc] . unexpected pos ...``. REPORT (JSON lines)
receives what torch.save raised each time, so a test can check it saw torch's error and not ours.
"""
from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import train  # noqa: E402


class FullDiskWriter:
    """A file-like that lets 1 KiB through to ``handle``, then fails every write with ENOSPC."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.written = handle, 0

    def write(self, data: Any) -> int:
        size = len(memoryview(data))
        if self.written + size > 1024:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += size
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def main() -> int:
    names, report, argv = sys.argv[1].split(","), sys.argv[2], sys.argv[3:]
    real_save = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
        path = os.path.basename(str(getattr(f, "name", f)))
        if not any(path.startswith(name + ".tmp.") for name in names):
            return real_save(obj, f, *args, **kwargs)
        try:
            return real_save(obj, FullDiskWriter(f), *args, **kwargs)
        except BaseException as exc:
            with open(report, "a") as out:
                out.write(json.dumps({"file": path, "raised": type(exc).__name__, "message": str(exc)}) + "\n")
            raise

    torch.save = save
    return train.main(argv)


if __name__ == "__main__":
    from utils.run.exit import leave

    leave(main())  # as train.py ends (utils/run/exit.py: no abort at exit on 2 ranks)
