"""Experiment configs: ``configs/base.py`` defaults, a job config on top, then ``--set`` overrides.

A job config is any Python file that defines ``config`` (an EasyDict or dict), exactly as
arcface_torch's ``configs/*.py``. Keys that base.py does not define are rejected with a
"did you mean" hint so that a typo never silently trains with a default.
"""
from __future__ import annotations

import ast
import copy
import importlib.util
import numbers
import os
import re
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping

from easydict import EasyDict

from utils.paths import OutputPathError, ensure_output_dir

BASE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "base.py")


class ConfigError(ValueError):
    """A bad config file, key or value; the message is one line for the user."""


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
                              f"{_one_line(exc.msg)}") from exc
        raise ConfigError(f"{path}:{exc.lineno}: cannot execute config: SyntaxError: {_one_line(exc.msg)}") from exc
    except Exception as exc:  # a runtime error in the user's file: name the line that raised it
        line = _failing_line(exc, path)
        where = f"{path}:{line}" if line else path
        raise ConfigError(f"{where}: cannot execute config: {type(exc).__name__}: {_one_line(str(exc))}") from exc
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


def _unknown_key_error(source: str, key: str, known: Iterable[str]) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    prefix = key[: len(key) - len(leaf)]
    # Only siblings at the same nesting level are candidates ("synthetic.x" suggests synthetic.*).
    siblings = [k[len(prefix):] for k in known if k.startswith(prefix) and "." not in k[len(prefix):]]
    close = [f"'{prefix}{name}'" for name in suggest_keys(leaf, siblings)]
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return ConfigError(f"{source}: unknown config key '{key}'{hint}")


def _flat_keys(cfg: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in cfg.items():
        keys.append(prefix + key)
        if isinstance(value, Mapping):
            keys.extend(_flat_keys(value, prefix + key + "."))
    return keys


def _merge(base: EasyDict, update: Mapping[str, Any], source: str, known: list[str], prefix: str = "",
           sources: dict[str, str] | None = None) -> None:
    for key, value in update.items():
        if key not in base:
            raise _unknown_key_error(source, prefix + key, known)
        if isinstance(base[key], Mapping) and isinstance(value, Mapping):
            _merge(base[key], value, source, known, prefix + key + ".", sources)
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


def apply_override(cfg: EasyDict, key: str, value: Any) -> None:
    """Set dotted ``key`` in ``cfg``; an unknown key is a ConfigError with a suggestion."""
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
    defaults = _load_module_config(base_path)
    cfg = EasyDict(copy.deepcopy(dict(defaults)))
    job = _load_module_config(path)
    sources: dict[str, str] = {}
    _merge(cfg, job, path, _flat_keys(cfg), sources=sources)
    for text in overrides:
        key, value = parse_override(text)
        apply_override(cfg, key, value)
        sources[key] = "--set"
    validate_config(cfg, defaults, sources, base_path=base_path)
    stem = os.path.splitext(os.path.basename(path))[0]
    cfg.config_name = stem
    cfg.config_path = os.path.abspath(path)
    if not cfg.output:
        cfg.output = os.path.join("work_dirs", stem)
    try:  # checked, not created: the trainer creates it (rank 0) once the run really starts
        ensure_output_dir(cfg.output, f"{sources.get('output', path)}: config key 'output'", create=False)
    except OutputPathError as exc:
        raise ConfigError(str(exc)) from None
    return cfg


# ------------------------------------------------------------------ value rules

@dataclass(frozen=True)
class Rule:
    """What one config key accepts: a kind plus an optional range, choices, length or item kind."""

    kind: str                       # int | float | bool | str | seq | size (int or (h, w))
    low: float | None = None
    high: float | None = None
    low_open: bool = False          # low < value (instead of low <= value)
    high_open: bool = False         # value < high (instead of value <= high)
    choices: tuple = ()
    optional: bool = False          # None is allowed
    length: int | None = None       # exact length of a seq
    item: str | None = None         # kind of every seq item


def _int(low: float | None = None, high: float | None = None, optional: bool = False) -> Rule:
    return Rule("int", low, high, optional=optional)


def _num(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False,
         optional: bool = False) -> Rule:
    return Rule("float", low, high, low_open, high_open, optional=optional)


def _enum(*choices: str) -> Rule:
    return Rule("str", choices=choices)


_PATH = Rule("str", optional=True)

# Keys whose default is None need a line here; other keys get their type from base.py's default and
# are listed only for a range or a set of choices. Lines for keys that base.py lacks are ignored.
RULES: dict[str, Rule] = {
    "output": _PATH, "init_backbone": _PATH, "val_data_dir": _PATH, "synthetic.cache_dir": _PATH,
    "wandb_entity": _PATH, "wandb_run_name": _PATH,
    "seed": _int(0), "device": _enum("auto", "cuda", "npu", "cpu"),
    "log_level": _enum("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "debug", "info", "warning", "error",
                       "critical"),
    "num_classes": _int(1, optional=True), "num_image": _int(1, optional=True),
    "image_size": Rule("size", 1), "num_workers": _int(0),
    "synthetic.num_identities": _int(0), "synthetic.images_per_identity": _int(0),
    "synthetic.num_val_identities": _int(0), "synthetic.num_val_pairs": _int(0),
    "embedding_size": _int(1), "dropout": _num(0, 1, high_open=True),
    "head": _enum("combined", "adaface", "curricularface"),
    "margin_list": Rule("seq", length=3, item="float"), "scale": _num(0, low_open=True),
    "margin_grad": _enum("straight_through", "exact"), "interclass_filtering_threshold": _num(0, 1),
    "sample_rate": _num(0, 1, low_open=True), "pfc_update": _enum("sparse", "dense"),
    "pfc_weight_dtype": _enum("float32", "bfloat16"), "pfc_state_dtype": _enum("float32", "bfloat16", "int8"),
    "optimizer": _enum("sgd", "adamw", "adam"), "lr": _num(0, low_open=True),
    "lr_per_512": _num(0, low_open=True, optional=True), "momentum": _num(0, 1), "weight_decay": _num(0),
    "adam_betas": Rule("seq", 0, 1, high_open=True, length=2, item="float"), "adam_eps": _num(0, low_open=True),
    "batch_size": _int(1), "gradient_acc": _int(1), "num_epoch": _int(1), "warmup_epoch": _num(0),
    "lr_power": _num(0), "clip_grad_norm": _num(0), "max_steps": _int(1, optional=True),
    "max_nonfinite_steps": _int(1), "frequent": _int(1), "verbose": _int(0), "val_targets": Rule("seq", item="str"),
    "val_batch_size": _int(1), "save_every_steps": _int(0), "keep_checkpoints": _int(0),
    "max_bad_records": _num(0, 1), "resume": Rule("bool", choices=("auto",)),
    "lr_schedule": _enum("poly", "step"), "lr_steps": Rule("seq", 0, item="float"), "lr_gamma": _num(0, low_open=True),
    "on_save_error": _enum("stop", "warn"), "triplet_margin": _num(0, low_open=True), "images_per_identity": _int(2),
}

_KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "True or False", "str": "a string",
               "size": "an integer", "seq": "a list or tuple"}
_ITEM_WORDS = {"int": "integers", "float": "numbers", "str": "strings", "bool": "booleans"}


def _is_kind(kind: str, value: Any) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind in ("int", "size"):
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    return isinstance(value, (list, tuple))


def _in_range(rule: Rule, value: float) -> bool:
    if rule.low is not None and (value <= rule.low if rule.low_open else value < rule.low):
        return False
    return rule.high is None or (value < rule.high if rule.high_open else value <= rule.high)


def _range_words(rule: Rule) -> str:
    if rule.low is not None and rule.high is not None:
        return f" in {'(' if rule.low_open else '['}{rule.low:g}, {rule.high:g}{')' if rule.high_open else ']'}"
    if rule.low is not None:
        return f" {'>' if rule.low_open else '>='} {rule.low:g}"
    if rule.high is not None:
        return f" {'<' if rule.high_open else '<='} {rule.high:g}"
    return ""


def describe(rule: Rule) -> str:
    """What ``rule`` accepts, in words (the 'expected ...' part of an error)."""
    if rule.kind == "bool" and rule.choices:
        text = "True, False or " + " or ".join(repr(c) for c in rule.choices)
    elif rule.choices:
        text = "one of " + ", ".join(repr(c) for c in rule.choices if c == c.lower() or c.lower() not in rule.choices)
    elif rule.kind == "seq":
        count = f"{rule.length} " if rule.length else ""
        items = _ITEM_WORDS.get(rule.item, "values") if rule.item else "values"
        text = f"a list or tuple of {count}{items}{_range_words(rule)}"
    elif rule.kind == "size":
        text = f"an integer{_range_words(rule)} or a (height, width) pair of them"
    else:
        text = _KIND_WORDS[rule.kind] + _range_words(rule)
    return text + (" or None" if rule.optional else "")


def check_value(rule: Rule, value: Any) -> str | None:
    """None when ``value`` satisfies ``rule``, else the 'expected ...' words for the error."""
    if value is None:
        return None if rule.optional else describe(rule)
    if rule.kind == "bool" and rule.choices and value in rule.choices and isinstance(value, str):
        return None
    if rule.kind == "size" and isinstance(value, (list, tuple)):
        ok = len(value) == 2 and all(_is_kind("int", v) and _in_range(rule, v) for v in value)
        return None if ok else describe(rule)
    if not _is_kind(rule.kind, value):
        return describe(rule)
    if rule.kind == "seq":
        if rule.length is not None and len(value) != rule.length:
            return describe(rule)
        for item in value:
            if rule.item and not _is_kind(rule.item, item):
                return describe(rule)
            if rule.item in ("int", "float") and not _in_range(rule, item):
                return describe(rule)
        return None
    if rule.choices and rule.kind != "bool" and value not in rule.choices:
        return describe(rule)
    if rule.kind in ("int", "float", "size") and not _in_range(rule, value):
        return describe(rule)
    return None


def _rule_from_default(default: Any) -> Rule | None:
    """The type a key's base.py default implies; None when the default says nothing (None)."""
    if isinstance(default, bool):
        return Rule("bool")
    if isinstance(default, numbers.Integral):
        return Rule("int")
    if isinstance(default, numbers.Real):
        return Rule("float")  # an int is accepted where the default is a float
    if isinstance(default, str):
        return Rule("str")
    if isinstance(default, (list, tuple)):
        kinds = {_rule_from_default(item).kind for item in default if _rule_from_default(item) is not None}
        return Rule("seq", item=kinds.pop() if len(kinds) == 1 else None)
    return None


_CHOICE_LINE = re.compile(r"""^config\.(\w+)\s*=\s*["'](\w+)["']\s*#\s*(.*)$""")
_CHOICE_SEGMENT = re.compile(r"^([A-Za-z_][\w-]*)\s*(\(.*)?$")


def documented_choices(base_path: str = BASE_CONFIG) -> dict[str, tuple[str, ...]]:
    """Allowed values of string keys as base.py documents them: ``config.k = "a"  # a | b (why) | c``.

    Whoever adds an option documents it there; validation then accepts it with no table edit.
    """
    try:
        with open(base_path) as handle:
            lines = handle.read().splitlines()
    except OSError:
        return {}
    found = {}
    for line in lines:
        match = _CHOICE_LINE.match(line.strip())
        if not match or "|" not in match.group(3):
            continue
        segments = [_CHOICE_SEGMENT.match(part.strip()) for part in match.group(3).split("|")]
        if all(segments):
            choices = tuple(segment.group(1) for segment in segments)
            if match.group(2) in choices:  # the default must be one of them, else it is no option list
                found[match.group(1)] = choices
    return found


def validate_config(cfg: Mapping[str, Any], defaults: Mapping[str, Any] | None = None,
                    sources: Mapping[str, str] | None = None, prefix: str = "",
                    base_path: str = BASE_CONFIG) -> None:
    """Check every key's type and range (RULES, else the type of its base.py default); one-line ConfigError.

    String choices are the union of RULES and the options base.py documents in its comments.
    """
    if defaults is None:
        defaults = _load_module_config(base_path)
    sources = sources or {}
    documented = documented_choices(base_path) if not prefix else {}
    for key, default in defaults.items():
        if key not in cfg:
            continue
        name, value = prefix + key, cfg[key]
        if isinstance(default, Mapping):
            if not isinstance(value, Mapping):
                raise _bad_value(name, "a dict of " + ", ".join(map(str, default)), value, sources)
            validate_config(value, default, sources, name + ".", base_path)
            continue
        rule = RULES.get(name) or _rule_from_default(default)
        if rule is None:  # a None default and no table line: nothing to check against
            continue
        if name in documented and rule.kind == "str":
            extra = tuple(c for c in documented[name] if c not in rule.choices)
            rule = replace(rule, choices=rule.choices + extra) if rule.choices else replace(rule, choices=documented[name])
        problem = check_value(rule, value)
        if problem:
            raise _bad_value(name, problem, value, sources)
    if not prefix and cfg.get("fp16") and cfg.get("bf16"):
        raise ConfigError("config keys 'fp16' and 'bf16': both True, expected at most one of them")


def _bad_value(name: str, expected: str, value: Any, sources: Mapping[str, str]) -> ConfigError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    origin = next((sources[k] for k in (name, name.split(".")[0]) if k in sources), None)
    where = f"{origin}: " if origin else ""
    return ConfigError(f"{where}config key '{name}': expected {expected}, got {_one_line(shown)} "
                       f"({type(value).__name__})")


def to_plain(value: Any) -> Any:
    """EasyDict/tuple tree -> plain dict/list tree (safe for ``torch.load(weights_only=True)``)."""
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value
