"""Where the weights a config or a command line names are: a file path, checked before any data loads,
so that a missing file is said with the key, the path looked at and how to get it."""
from __future__ import annotations

import os

from utils.run.checkpoint import CheckpointError

GET_WEIGHTS = "docs/weights.md lists released weights and where to get them"


def resolve_weights(value: str, key: str = "init_backbone") -> str:
    """The file ``value`` names (``~`` expanded); a CheckpointError naming ``key``, the path looked at and
    how to get the file when it is not there (``key`` a config key, or an option such as ``--model``)."""
    path = os.path.expanduser(str(value))
    if os.path.isfile(path):
        return path
    what = "is a folder, not a weights file" if os.path.isdir(path) else "not found"
    scratch = f", or set {key}=None to train from scratch" if key == "init_backbone" else ""
    label = key if key.startswith("-") else f"config key '{key}'"
    raise CheckpointError(f"{label}: weights file {value!r} {what} (looked for {os.path.abspath(path)}); give the "
                          f"path of a backbone file you have ({GET_WEIGHTS}){scratch}")
