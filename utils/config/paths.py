"""Output-path checks: one clear line before any work starts, instead of an OSError at the end.

    from utils.config.paths import OutputPathError, ensure_output_dir, ensure_output_file
    out = ensure_output_dir(cfg.output, "config key 'output'")     # creates it
    path = ensure_output_file(args.save, "--save")                   # creates its parent folder

Both return the absolute path. A parent that is a regular file, a folder that is not writable, or an
output file that is a folder ends in ``OutputPathError`` naming ``what`` and the offending path.
"""
from __future__ import annotations

import os


class OutputPathError(ValueError):
    """An output file or folder that cannot be created or written; the message is one line."""


def _nearest_existing(path: str) -> str:
    """Longest existing prefix of ``path`` (a file or a folder); '/' at worst."""
    current = path
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def _check_creatable_dir(path: str, what: str) -> None:
    """Raise unless ``path`` is a writable folder or can be created as one."""
    if os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputPathError(f"{what}: {path} is a folder that is not writable (permission denied)")
        return
    if os.path.exists(path):
        raise OutputPathError(f"{what}: {path} exists and is not a folder, expected a folder (or a new path)")
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        raise OutputPathError(f"{what}: cannot create {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what}: cannot create {path}: {existing} is not writable (permission denied)")


def ensure_output_dir(path: str | os.PathLike, what: str = "output folder", create: bool = True) -> str:
    """Check (and by default create) an output folder; return its absolute path."""
    if path is None or os.fspath(path) == "":
        raise OutputPathError(f"{what}: empty path, expected a folder to write into")
    full = os.path.abspath(os.fspath(path))
    _check_creatable_dir(full, what)
    if create and not os.path.isdir(full):
        try:
            os.makedirs(full, exist_ok=True)
        except OSError as exc:  # a race or a filesystem refusal the checks above could not see
            raise OutputPathError(f"{what}: cannot create {full}: {exc.strerror or exc}") from exc
    return full


def ensure_output_file(path: str | os.PathLike, what: str = "output file", create_parent: bool = True) -> str:
    """Check an output file path (its parent is created by default); return its absolute path."""
    if path is None or os.fspath(path) == "":
        raise OutputPathError(f"{what}: empty path, expected a file to write")
    full = os.path.abspath(os.fspath(path))
    if os.path.isdir(full):
        raise OutputPathError(f"{what}: {full} is a folder, expected a file path")
    if os.path.exists(full) and not os.access(full, os.W_OK):
        # os.replace over a read-only file would succeed; refusing keeps a protected file protected.
        raise OutputPathError(f"{what}: {full} exists and is not writable (permission denied)")
    ensure_output_dir(os.path.dirname(full), what, create=create_parent)
    return full
