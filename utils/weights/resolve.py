"""Where the weights a config or a command line names are: a registered name (``facenet:vggface2``,
fetched into the cache when needed, utils.weights.fetch) or a file path, checked before any data loads,
so that a missing file is said with the key, the path looked at and how to get it."""
from __future__ import annotations

import os
from typing import IO

from utils.run.checkpoint import CheckpointError
from utils.weights.registry import REGISTRY, is_registry_name, lookup

GET_WEIGHTS = ("a registered name such as 'facenet:vggface2' (python tools/weights.py list; docs/weights.md "
               "says where each is published)")


def resolve_weights(value: str, key: str = "init_backbone", log: IO[str] | None = None) -> str:
    """The file ``value`` names: a registry name's cached (or now downloaded) file, or a path (``~``
    expanded). A CheckpointError naming ``key`` (a config key, or an option such as ``--model``), the path
    looked at and how to get the file when it is not there."""
    label = key if key.startswith("-") else f"config key '{key}'"
    entry = lookup(value)
    if entry is not None:
        from utils.weights.fetch import fetch

        return fetch(entry, log)
    if is_registry_name(value) and not os.path.exists(os.path.expanduser(str(value))):
        source = str(value).split(":", 1)[0]
        names = ", ".join(name for name in REGISTRY if name.startswith(source + ":"))
        raise CheckpointError(f"{label}: {value!r} is not a registered name; {source} has {names}")
    path = os.path.expanduser(str(value))
    if os.path.isfile(path):
        return path
    what = "is a folder, not a weights file" if os.path.isdir(path) else "not found"
    scratch = f", or set {key}=None to train from scratch" if key == "init_backbone" else ""
    raise CheckpointError(f"{label}: weights file {value!r} {what} (looked for {os.path.abspath(path)}); give the "
                          f"path of a backbone file you have or {GET_WEIGHTS}{scratch}")


def resolve_init_backbone(value: str, network: str, log: IO[str] | None = None) -> str:
    """``resolve_weights`` for the config key ``init_backbone``; a registered name of another network than
    ``network`` is refused at once (one line), before anything is fetched or any data is read."""
    entry = lookup(value)
    if entry is not None and entry.network != network:
        from utils.weights.load import network_signature

        if network_signature(entry.network) != network_signature(network):  # variants share their weights
            raise CheckpointError(f"config key 'init_backbone': {value} is network '{entry.network}' (embedding "
                                  f"size {entry.embedding_size}), the config's network is '{network}': set "
                                  f"network={entry.network!r}")
    return resolve_weights(value, "init_backbone", log)
