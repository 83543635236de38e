"""Config value rules: what each key accepts (the RULES table, else its base.py default's type) and the check.

``validate_config`` walks a merged config against base.py's defaults and raises a one-line ConfigError
naming the key, what it expected and where the bad value came from. The loader (``utils.config.load``)
builds on this module, so ConfigError is defined here.
"""
from __future__ import annotations

import numbers
import os
import re
from dataclasses import dataclass, replace
from typing import Any, Mapping

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # utils/config/rules.py
BASE_CONFIG = os.path.join(REPO_ROOT, "configs", "base.py")


class ConfigError(ValueError):
    """A bad config file, key or value; the message is one line for the user."""


def one_line(text: str, limit: int = 300) -> str:
    """``text`` with its whitespace collapsed to single spaces, cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Rule:
    """What one config key accepts: a kind plus an optional range, choices, length or item kind."""

    kind: str                       # int | float | bool | str | seq | size (int or (h, w)) | limit (fraction or count) | sources (str or list of str)
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
    "rec": Rule("sources"), "rec_weights": Rule("seq", 0, low_open=True, item="float", optional=True),
    "rec_identity_map": _PATH,
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
    "max_bad_records": Rule("limit"), "resume": Rule("bool", choices=("auto",)),
    "lr_schedule": _enum("poly", "step"), "lr_steps": Rule("seq", 0, item="float"), "lr_gamma": _num(0, low_open=True),
    "on_save_error": _enum("stop", "warn"), "triplet_margin": _num(0, low_open=True), "images_per_identity": _int(2),
    "collective_timeout_s": _num(0, low_open=True), "kd_weight": _num(0), "kd_loss": _enum("cosine", "l2", "relation"),
    "on_divergence": _enum("rollback", "stop", "warn"), "max_rollbacks": _int(0), "snapshot_every_steps": _int(1),
    "divergence_lr_factor": _num(0, 1, low_open=True), "divergence_warmup_steps": _int(1),
    "divergence_spike_factor": _num(0, low_open=True), "divergence_rise_margin": _num(0, low_open=True),
    "divergence_rise_window": _int(1), "divergence_scale_floor": _num(0), "divergence_scale_window": _int(1),
    "divergence_collapse_threshold": _num(0, 1, low_open=True), "divergence_relapse_margin": _num(0, low_open=True),
    "head_only_epochs": _int(0), "backbone_lr_scale": _num(0), "freeze_stages": _int(0),
}
TEACHER_KEYS = ("network", "weights")  # config key 'teacher': dict(network=..., weights=...)

# Keys of arcface_torch's configs/base.py that mean nothing here (W&B details ArcScale does not use: its
# W&B key comes from WANDB_API_KEY, runs are named by wandb_run_name). A copied arcface_torch config is
# accepted with one warning naming those it set; every other arcface_torch key is a key of base.py.
ARCFACE_ONLY_KEYS: dict[str, str] = {
    "wandb_key": "the W&B API key (ArcScale reads WANDB_API_KEY from the environment)",
    "suffix_run_name": "a W&B run-name suffix (ArcScale: wandb_run_name)",
    "wandb_log_all": "W&B gradient/parameter logging",
    "save_artifacts": "W&B model artifacts",
    "wandb_resume": "resuming a W&B run",
}


def ignored_keys_warning(keys: list[str] | tuple[str, ...], source: str = "") -> str | None:
    """The one warning for arcface_torch-only keys a config set (None when it set none)."""
    if not keys:
        return None
    where = f"{source}: " if source else ""
    return (f"{where}ignored arcface_torch config key{'s' if len(keys) > 1 else ''} "
            f"{', '.join(repr(key) for key in keys)}: no meaning in ArcScale (W&B details it does not use; "
            f"its W&B key comes from WANDB_API_KEY)")


_KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "True or False", "str": "a string",
               "size": "an integer", "seq": "a list or tuple", "sources": "a string or a non-empty list of strings",
               "limit": "a fraction of the data below 1 (e.g. 0.001) or a whole number of records (e.g. 10)"}
_ITEM_WORDS = {"int": "integers", "float": "numbers", "str": "strings", "bool": "booleans"}


def _is_kind(kind: str, value: Any) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind in ("int", "size"):
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind == "limit":  # below 1 a fraction, from 1 on a count of records: 2.5 records means nothing
        return _is_kind("float", value) and value >= 0 and (value < 1 or float(value).is_integer())
    if kind == "str":
        return isinstance(value, str)
    if kind == "sources":
        return isinstance(value, str) or (isinstance(value, (list, tuple)) and len(value) > 0
                                          and all(isinstance(item, str) and item for item in value))
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


def validate_config(cfg: Mapping[str, Any], defaults: Mapping[str, Any],
                    sources: Mapping[str, str] | None = None, prefix: str = "",
                    base_path: str = BASE_CONFIG) -> None:
    """Check every key's type and range (RULES, else the type of its base.py default); one-line ConfigError.

    ``defaults`` is base.py's ``config``; string choices are the union of RULES and the options base.py
    documents in its comments.
    """
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
    if not prefix:
        check_teacher_value(cfg.get("teacher"), sources)
    if not prefix and cfg.get("fp16") and cfg.get("bf16"):
        raise ConfigError("config keys 'fp16' and 'bf16': both True, expected at most one of them")
    if not prefix and cfg.get("fp16_grad_compression") and cfg.get("bf16"):
        # bf16 gradients are not loss-scaled: small ones underflow in fp16 (smallest subnormal 6e-8).
        raise ConfigError("config keys 'fp16_grad_compression' and 'bf16': both True; fp16 buckets would flush "
                          "small unscaled bf16-run gradients to zero: use fp16_grad_compression with fp16 "
                          "(loss-scaled) or fp32 training only")


def check_teacher_value(value: Any, sources: Mapping[str, str] | None = None) -> None:
    """``teacher``: None, or a dict of exactly ``network`` and ``weights``, both non-empty strings."""
    if value is None:
        return
    expected = "None or dict(network=<network name>, weights=<backbone file or released name>)"
    if not isinstance(value, Mapping):
        raise _bad_value("teacher", expected, value, sources or {})
    unknown = sorted(set(map(str, value)) - set(TEACHER_KEYS))
    if unknown:
        where = f"{(sources or {})['teacher']}: " if "teacher" in (sources or {}) else ""
        raise ConfigError(f"{where}config key 'teacher.{unknown[0]}': unknown key, expected {expected}")
    for key in TEACHER_KEYS:
        if not isinstance(value.get(key), str) or not value.get(key):
            raise _bad_value(f"teacher.{key}", f"a non-empty string ({expected})", value.get(key), sources or {})


def _bad_value(name: str, expected: str, value: Any, sources: Mapping[str, str]) -> ConfigError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    origin = next((sources[k] for k in (name, name.split(".")[0]) if k in sources), None)
    where = f"{origin}: " if origin else ""
    return ConfigError(f"{where}config key '{name}': expected {expected}, got {one_line(shown)} "
                       f"({type(value).__name__})")
