"""Experiment configs: ``configs/base.py`` defaults, a job config on top, then ``--set`` overrides.

A job config is any Python file that defines ``config`` (an EasyDict or dict), exactly as
arcface_torch's ``configs/*.py``. Keys that base.py does not define are rejected with a
"did you mean" hint so that a typo never silently trains with a default.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any, Iterable, Mapping

from easydict import EasyDict

BASE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "base.py")


class ConfigError(ValueError):
    """A bad config file, key or value; the message is one line for the user."""


def _load_module_config(path: str) -> Mapping[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    name = "arcscale_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a syntax or runtime error in the user's file
        raise ConfigError(f"{path}: cannot execute config: {type(exc).__name__}: {exc}") from exc
    cfg = getattr(module, "config", None)
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{path}: expected a module-level `config` (EasyDict or dict), found {type(cfg).__name__}")
    return cfg


def _unknown_key_error(source: str, key: str, known: Iterable[str]) -> ConfigError:
    known = sorted(known)
    leaf = key.rsplit(".", 1)[-1]
    prefix = key[: len(key) - len(leaf)]
    close = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in known if k.startswith(prefix)], n=1)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
    return ConfigError(f"{source}: unknown config key '{key}'{hint}")


def _flat_keys(cfg: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in cfg.items():
        keys.append(prefix + key)
        if isinstance(value, Mapping):
            keys.extend(_flat_keys(value, prefix + key + "."))
    return keys


def _merge(base: EasyDict, update: Mapping[str, Any], source: str, known: list[str], prefix: str = "") -> None:
    for key, value in update.items():
        if key not in base:
            raise _unknown_key_error(source, prefix + key, known)
        if isinstance(base[key], Mapping) and isinstance(value, Mapping):
            _merge(base[key], value, source, known, prefix + key + ".")
        else:
            base[key] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value in Python literal syntax; a bare word is a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()  # e.g. --set network=r100 or a path
    return key, value


def apply_override(cfg: EasyDict, key: str, value: Any) -> None:
    node = cfg
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, Mapping) or part not in node:
            raise _unknown_key_error("--set", key, _flat_keys(cfg))
        if depth == len(parts) - 1:
            node[part] = EasyDict(value) if isinstance(value, dict) else value
        else:
            node = node[part]


def load_config(path: str, overrides: Iterable[str] = (), base_path: str = BASE_CONFIG) -> EasyDict:
    """Load base.py, merge the job config at ``path``, apply ``key=value`` overrides.

    ``output`` defaults to ``work_dirs/<config file stem>``; ``config_name`` records the stem.
    """
    cfg = EasyDict(_load_module_config(base_path))
    job = _load_module_config(path)
    _merge(cfg, job, path, _flat_keys(cfg))
    for text in overrides:
        apply_override(cfg, *parse_override(text))
    stem = os.path.splitext(os.path.basename(path))[0]
    cfg.config_name = stem
    cfg.config_path = os.path.abspath(path)
    if not cfg.output:
        cfg.output = os.path.join("work_dirs", stem)
    return cfg


def to_plain(value: Any) -> Any:
    """EasyDict/tuple tree -> plain dict/list tree (safe for ``torch.load(weights_only=True)``)."""
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value
