"""A saved torch optimizer state laid onto this run's parameter groups, parameter by parameter.

torch's ``Optimizer.load_state_dict`` pairs saved and current parameters by position and refuses a state
whose group count or group sizes differ. A resume whose config changes how the parameters are grouped
(``backbone_lr_scale``, ``freeze_stages``: the frozen parameters are left out of the groups) would then
lose the run. Groups built with a ``param_names`` list (one name per parameter; the trainer names them
``backbone.<name>``, ``head.<name>``, ``distill.<name>``) are matched by those names instead: every
parameter keeps its saved state (momentum, Adam's moments and step) whichever group it is in now; a
parameter the checkpoint did not optimise (a stage unfrozen now) starts without state, as it would have
at its first step; the state of a parameter this run does not optimise (frozen now) is left out. A saved
state without names (checkpoints written before they were recorded) is paired by its flattened position
when it holds as many parameters as this run optimises; otherwise it cannot be placed and the caller
gets one line saying so.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from pfc import PartialFCError

# Group entries that say what the group is, not where the optimizer was: this run's values stand. The rest
# (lr included, as torch's load_state_dict restores it; the trainer sets every group's lr before each step
# from its lr_scale) comes from the saved group that held the group's parameters.
OWN_KEYS = ("params", "param_names", "lr_scale", "name")


def group_names(groups: list[dict[str, Any]]) -> list[list[str]] | None:
    """Every group's parameter names, or None when any group has none."""
    names = [group.get("param_names") for group in groups]
    return None if any(not isinstance(item, list) for item in names) else names


def _positions(saved_groups: list[Mapping[str, Any]], current: list[dict[str, Any]]) -> list[list[tuple[int, int]]]:
    """For each current parameter: (saved group index, saved parameter id), by name where both sides have
    names, else by flattened position; (-1, -1) for a parameter the checkpoint did not optimise."""
    saved_names, names = group_names(list(saved_groups)), group_names(current)
    if saved_names is not None and names is not None:
        where = {name: (index, pid) for index, group in enumerate(saved_groups)
                 for name, pid in zip(saved_names[index], group["params"])}
        return [[where.get(name, (-1, -1)) for name in group_list] for group_list in names]
    flat = [(index, pid) for index, group in enumerate(saved_groups) for pid in group["params"]]
    sizes = [len(group["params"]) for group in current]
    if len(flat) != sum(sizes):
        raise PartialFCError(f"the checkpoint's optimizer state holds {len(flat)} parameters in "
                             f"{len(saved_groups)} group(s) without their names, this run optimises {sum(sizes)} in "
                             f"{len(current)}: its state (momentum) cannot be placed")
    spans, start = [], 0
    for size in sizes:
        spans.append(flat[start:start + size])
        start += size
    return spans


def remap_state(saved: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], list[str]]:
    """(``saved`` rewritten in ``optimizer``'s layout, so its ``load_state_dict`` takes it; lines about
    parameters that start without state or whose state is left out). A saved state tensor whose shape
    is not its parameter's is a PartialFCError (one line)."""
    saved_groups = list(saved["param_groups"])
    current = optimizer.param_groups
    positions = _positions(saved_groups, current)
    state, groups, notes, pid = {}, [], [], 0
    used = set()
    names = group_names(current)
    for index, (group, placed) in enumerate(zip(current, positions)):
        source = next((saved_groups[g] for g, _ in placed if g >= 0), saved_groups[min(index, len(saved_groups) - 1)])
        settings = {key: value for key, value in source.items() if key not in OWN_KEYS}
        settings.update({key: group[key] for key in OWN_KEYS if key in group and key != "params"})
        ids = []
        for position, (param, (_, saved_id)) in enumerate(zip(group["params"], placed)):
            entry = saved["state"].get(saved_id) if saved_id != -1 else None
            if entry is not None:
                for key, value in entry.items():
                    if torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) != tuple(param.shape):
                        name = names[index][position] if names else f"parameter {pid}"
                        raise PartialFCError(f"the checkpoint's optimizer state '{key}' of {name} has shape "
                                             f"{list(value.shape)}, the parameter {list(param.shape)}")
                state[pid] = entry
            used.add(saved_id)
            ids.append(pid)
            pid += 1
        groups.append({**settings, "params": ids})
    fresh = [name for index, group_list in enumerate(names or []) for name, (g, _) in zip(group_list, positions[index])
             if g < 0]
    if fresh:
        notes.append(f"{len(fresh)} parameter(s) the checkpoint did not optimise start without optimizer state "
                     f"({', '.join(fresh[:3])}{', ...' if len(fresh) > 3 else ''})")
    dropped = [saved_id for group in saved_groups for saved_id in group["params"]
               if saved_id not in used and saved_id in saved["state"]]
    if dropped:
        notes.append(f"the optimizer state of {len(dropped)} parameter(s) this run does not optimise (frozen now) "
                     f"is left out")
    return {"state": state, "param_groups": groups}, notes
