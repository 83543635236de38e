"""Experiment configs: ``configs/base.py`` defaults, a job config on top, then ``--set`` overrides.

A job config is any Python file that defines ``config`` (an EasyDict or dict), exactly as
arcface_torch's ``configs/*.py``. Keys that base.py does not define are rejected, all of them in one
message, each with a "did you mean" hint, so that a typo never silently trains with a default; the
arcface_torch keys that mean nothing here (``rules.ARCFACE_ONLY_KEYS``) are dropped and listed in
``cfg.ignored_keys`` for one warning. What each key accepts, and
ConfigError, live in ``utils.config.rules`` (re-exported here).
"""
from __future__ import annotations

import ast
import copy
import importlib.util
import os
from typing import Any, Iterable, Mapping

from easydict import EasyDict

from utils.config.rules import ARCFACE_ONLY_KEYS, BASE_CONFIG, ConfigError, one_line, validate_config
from utils.config.rules import ignored_keys_warning  # noqa: F401
from utils.config.rules import RULES, Rule, check_value, describe, documented_choices  # noqa: F401
from utils.config.paths import OutputPathError, ensure_output_dir

__all__ = ["BASE_CONFIG", "RULES", "ConfigError", "Rule", "apply_override", "check_known_values", "check_value",
           "describe", "documented_choices", "ignored_keys_warning", "load_config", "parse_override",
           "suggest_keys", "suggest_values", "to_plain", "unknown_keys_error", "validate_config"]


def _failing_line(exc: BaseException, path: str) -> int | None:
    """Line number of the deepest traceback frame inside ``path`` (the config file itself)."""
    target = os.path.abspath(path)
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename) == target:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _load_module_config(path: str) -> Mapping[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    name = "arcscale_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:  # SyntaxError's own str() appends "(file, line N)"; say it once, up front
        if exc.filename and os.path.abspath(exc.filename) != os.path.abspath(path):  # in a module it imports
            raise ConfigError(f"{path}: cannot execute config: SyntaxError in {exc.filename}:{exc.lineno}: "
                              f"{one_line(exc.msg)}") from exc
        raise ConfigError(f"{path}:{exc.lineno}: cannot execute config: SyntaxError: {one_line(exc.msg)}") from exc
    except Exception as exc:  # a runtime error in the user's file: name the line that raised it
        line = _failing_line(exc, path)
        where = f"{path}:{line}" if line else path
        raise ConfigError(f"{where}: cannot execute config: {type(exc).__name__}: {one_line(str(exc))}") from exc
    cfg = getattr(module, "config", None)
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{path}: expected a module-level `config` (EasyDict or dict), found {type(cfg).__name__}")
    return cfg


def _edit_distance(first: str, second: str) -> int:
    """Levenshtein distance (insert/delete/substitute, each 1)."""
    previous = list(range(len(second) + 1))
    for i, a in enumerate(first, 1):
        current = [i]
        for j, b in enumerate(second, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a != b)))
        previous = current
    return previous[-1]


def suggest_keys(name: str, known: Iterable[str], limit: int = 2) -> list[str]:
    """Up to ``limit`` known keys a mistyped ``name`` most likely meant, best first.

    Keys sharing the typo's first ``_`` word rank first, closest first, with a key equal to that word
    always shown (``lr_rate`` -> ``lr_power``, ``lr``; never ``sample_rate``); then other keys within
    a small edit distance.
    """
    known = sorted(set(known))
    head = name.split("_", 1)[0]
    same_word = [k for k in known if k.split("_", 1)[0] == head and "_" in name + k]
    same_word.sort(key=lambda k: (_edit_distance(name, k), k))
    if head in same_word[limit - 1:] and limit > 1:  # "lr_rate" most likely meant plain "lr": keep it shown
        same_word.remove(head)
        same_word.insert(limit - 1, head)
    threshold = max(2, len(name) // 3)
    close = sorted((k for k in known if k not in same_word and _edit_distance(name, k) <= threshold),
                   key=lambda k: (_edit_distance(name, k), k))
    return (same_word + close)[:limit]


def _suggestions(key: str, known: Iterable[str]) -> list[str]:
    """Did-you-mean candidates for dotted ``key``, by edit distance over all known keys: keys at another
    nesting level whose last part is closer than any sibling's (``num_identities`` ->
    ``synthetic.num_identities``; the same name elsewhere is the only candidate), then its siblings at the
    same level (``suggest_keys``)."""
    known = list(known)
    leaf = key.rsplit(".", 1)[-1]
    prefix = key[: len(key) - len(leaf)]
    siblings = [k[len(prefix):] for k in known if k.startswith(prefix) and "." not in k[len(prefix):]]
    close = [prefix + name for name in suggest_keys(leaf, siblings)]
    best_sibling = min((_edit_distance(key, name) for name in close), default=max(2, len(leaf) // 3) + 1)
    elsewhere = {k: _edit_distance(leaf, k.rsplit(".", 1)[-1]) for k in known
                 if k.rsplit(".", 1)[0] + "." != prefix and "." in k + prefix}
    nearer = sorted((k for k, d in elsewhere.items() if d < best_sibling), key=lambda k: (elsewhere[k], k))
    if nearer and elsewhere[nearer[0]] == 0:
        return nearer[:1]
    return (nearer + close)[:2]


def _did_you_mean(key: str, known: Iterable[str]) -> str:
    close = " or ".join(f"'{name}'" for name in _suggestions(key, known))
    return f"did you mean {close}?" if close else ""


def unknown_keys_error(unknown: list[tuple[str, str]], known: Iterable[str]) -> ConfigError:
    """One ConfigError naming every unknown ``(source, key)``, each with its did-you-mean."""
    known = list(known)
    parts = []
    for source in dict.fromkeys(source for source, _ in unknown):  # sources in order of appearance
        keys = [key for where, key in unknown if where == source]
        if len(keys) == 1:
            hint = _did_you_mean(keys[0], known)
            parts.append(f"{source}: unknown config key '{keys[0]}'" + (f"; {hint}" if hint else ""))
            continue
        listed = []
        for key in keys:
            hint = _did_you_mean(key, known)
            listed.append(f"'{key}'" + (f" ({hint})" if hint else ""))
        parts.append(f"{source}: {len(keys)} unknown config keys: {', '.join(listed)}")
    return ConfigError("; ".join(parts))


def _flat_keys(cfg: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in cfg.items():
        keys.append(prefix + key)
        if isinstance(value, Mapping):
            keys.extend(_flat_keys(value, prefix + key + "."))
    return keys


def _merge(base: EasyDict, update: Mapping[str, Any], source: str, unknown: list[tuple[str, str]],
           prefix: str = "", sources: dict[str, str] | None = None) -> None:
    for key, value in update.items():
        if key not in base:
            unknown.append((source, prefix + key))
        elif isinstance(base[key], Mapping) and isinstance(value, Mapping):
            _merge(base[key], value, source, unknown, prefix + key + ".", sources)
        else:
            base[key] = value
            if sources is not None:
                sources[prefix + key] = source


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


def _is_known(cfg: Mapping[str, Any], key: str) -> bool:
    node = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def apply_override(cfg: EasyDict, key: str, value: Any) -> None:
    """Set dotted ``key`` in ``cfg``; an unknown key is a ConfigError with a suggestion."""
    if not _is_known(cfg, key):
        raise unknown_keys_error([("--set", key)], _flat_keys(cfg))
    parts = key.split(".")
    node = cfg
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = EasyDict(value) if isinstance(value, dict) else value


def suggest_values(value: str, known: Iterable[str], limit: int = 2) -> list[str]:
    """Up to ``limit`` of ``known`` closest to a mistyped ``value`` (case ignored): those at the smallest
    edit distance, when it is small for the word's length (``r5O`` -> ``r50``)."""
    distances = {name: _edit_distance(str(value).lower(), name.lower()) for name in known}
    if not distances:
        return []
    best = min(distances.values())
    if best > max(1, len(str(value)) // 3):
        return []
    return sorted(name for name, distance in distances.items() if distance == best)[:limit]


def check_known_values(cfg: Mapping[str, Any], known_values: Mapping[str, Iterable[str]],
                       sources: Mapping[str, str] | None = None) -> None:
    """One-line ConfigError when a key's value is not among the names a registry outside this package
    knows (``{"network": backbones.MODEL_NAMES}``: the caller passes them, so a typo is found with the
    config, before any data loads, and gets a "did you mean")."""
    for key, names in known_values.items():
        names = tuple(names)
        value = cfg.get(key)
        if value in names:
            continue
        where = f"{sources[key]}: " if sources and key in sources else ""
        close = suggest_values(value, names)
        hint = f"; did you mean {' or '.join(repr(name) for name in close)}?" if close else ""
        raise ConfigError(f"{where}config key '{key}': unknown {key} {one_line(repr(value))}{hint} "
                          f"(expected one of {', '.join(names)})")


def load_config(path: str, overrides: Iterable[str] = (), base_path: str = BASE_CONFIG,
                known_values: Mapping[str, Iterable[str]] | None = None) -> EasyDict:
    """Load base.py, merge the job config at ``path``, apply ``key=value`` overrides.

    ``output`` defaults to ``work_dirs/<config file stem>``; ``config_name`` records the stem.
    ``known_values`` maps keys to the only names they accept, from registries this package may not
    import (train.py passes ``{"network": MODEL_NAMES}``).
    """
    defaults = _load_module_config(base_path)
    cfg = EasyDict(copy.deepcopy(dict(defaults)))
    job = dict(_load_module_config(path))
    ignored = [key for key in ARCFACE_ONLY_KEYS if key in job and key not in cfg]
    for key in ignored:
        del job[key]
    sources: dict[str, str] = {}
    unknown: list[tuple[str, str]] = []
    _merge(cfg, job, path, unknown, sources=sources)
    for text in overrides:
        key, value = parse_override(text)
        if key in ARCFACE_ONLY_KEYS and key not in cfg:
            ignored.append(key)
        elif not _is_known(cfg, key):
            unknown.append(("--set", key))
        else:
            apply_override(cfg, key, value)
            sources[key] = "--set"
    if unknown:  # every one of them, in one message: a copied config is fixed in one edit
        raise unknown_keys_error(unknown, _flat_keys(cfg))
    validate_config(cfg, defaults, sources, base_path=base_path)
    check_known_values(cfg, known_values or {}, {key: sources.get(key, path) for key in (known_values or {})})
    stem = os.path.splitext(os.path.basename(path))[0]
    cfg.ignored_keys = list(dict.fromkeys(ignored))  # said once by the caller: ignored_keys_warning
    cfg.config_name = stem
    cfg.config_path = os.path.abspath(path)
    if not cfg.output:
        cfg.output = os.path.join("work_dirs", stem)
    try:  # checked, not created: the trainer creates it (rank 0) once the run really starts
        ensure_output_dir(cfg.output, f"{sources.get('output', path)}: config key 'output'", create=False)
    except OutputPathError as exc:
        raise ConfigError(str(exc)) from None
    return cfg


def to_plain(value: Any) -> Any:
    """EasyDict/tuple tree -> plain dict/list tree (safe for ``torch.load(weights_only=True)``)."""
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value
