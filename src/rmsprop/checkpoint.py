"""load_state_dict's checks and migration, all or nothing.

torch checks only the number of groups and parameters. Here a state dict is checked completely —
every group's hyperparameters through the option table, every state tensor against its
parameter, every step counter — and completed (keys a torch checkpoint or an older version lacks
get the values that reproduce its algorithm) before the optimizer is touched. On any problem a
ValueError or TypeError names it and the optimizer is left exactly as it was.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype

from .options import migrate_group, validate_group

__all__ = ["prepare_state_dict", "check_param_state"]


def prepare_state_dict(groups: list[dict[str, Any]], state_dict: Any) -> dict[str, Any]:
    """The state dict, checked and completed for an optimizer whose groups are ``groups``; the
    input is not modified."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    saved_groups = state_dict.get("param_groups")
    saved_state = state_dict.get("state")
    if not isinstance(saved_groups, list) or not isinstance(saved_state, dict):
        raise ValueError("state_dict must have a 'param_groups' list and a 'state' dict")
    if len(groups) != len(saved_groups):
        raise ValueError(
            f"loaded state dict has {len(saved_groups)} parameter groups, the optimizer has {len(groups)}"
        )
    new_groups, new_state = [], dict(saved_state)
    for gi, (group, saved) in enumerate(zip(groups, saved_groups, strict=True)):
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
            raise ValueError(f"loaded param group {gi} must be a dict with a 'params' list")
        if len(group["params"]) != len(saved["params"]):
            raise ValueError(
                f"group {gi}: the loaded state dict has {len(saved['params'])} parameters, "
                f"the optimizer has {len(group['params'])}"
            )
        migrated = validate_group(migrate_group(saved, group), where=f"loaded param group {gi}")
        new_groups.append(migrated)
        for param, pid in zip(group["params"], saved["params"], strict=True):
            if pid not in saved_state:
                continue
            entry = saved_state[pid]
            where = f"group {gi}, parameter id {pid}"
            if not isinstance(entry, dict):  # (a falsy 0 or [] too: torch would store it as the state)
                raise ValueError(f"{where}: the state must be a dict, got {type(entry).__name__}")
            if entry:  # {}: no state yet, as for a parameter never stepped
                new_state[pid] = check_param_state(entry, param, migrated, where)
    return {**state_dict, "param_groups": new_groups, "state": new_state}


def check_param_state(entry: Any, param: Tensor, group: dict[str, Any], where: str) -> dict[str, Any]:
    """``entry`` if it is a usable RMSprop state for ``param`` under ``group``'s options (its step
    counter converted to a float tensor if it was another number type); ValueError otherwise."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: the state must be a dict, got {type(entry).__name__}")
    needed = ["step", "square_avg"]
    if group["momentum"] > 0:
        needed.append("momentum_buffer")
    if group["centered"]:
        needed.append("grad_avg")
    missing = [k for k in needed if k not in entry]
    if missing:
        raise ValueError(f"{where}: the state lacks {missing}, which its saved options need")
    for key in ("square_avg", "momentum_buffer", "grad_avg"):
        if key in entry:
            _check_buffer(entry[key], key, param, where)
    return {**entry, "step": _checked_step(entry["step"], where)}


def _check_buffer(value: Any, key: str, param: Tensor, where: str) -> None:
    if not isinstance(value, Tensor):
        raise ValueError(f"{where}: state['{key}'] is a {type(value).__name__}, not a tensor")
    if value.layout is not torch.strided or value.is_neg() or value.is_conj():
        raise ValueError(
            f"{where}: state['{key}'] must be a dense tensor without a conjugate or negative bit "
            f"(got a {value.layout} tensor{', with such a bit' if value.is_neg() or value.is_conj() else ''})"
        )
    if value.shape != param.shape:
        raise ValueError(
            f"{where}: state['{key}'] has shape {tuple(value.shape)}, the parameter has shape {tuple(param.shape)}"
        )
    same_kind = (
        value.is_complex() == param.is_complex() and value.is_floating_point() == param.is_floating_point()
    )
    if not same_kind:
        raise ValueError(
            f"{where}: state['{key}'] has dtype {value.dtype}, which cannot hold state for a {param.dtype} parameter"
        )
    if param.is_complex() and value.dtype != param.dtype:
        raise ValueError(
            f"{where}: state['{key}'] has dtype {value.dtype}, the parameter {param.dtype} "
            "(torch does not cast complex state)"
        )


def _checked_step(step: Any, where: str) -> Any:
    """A step counter as torch keeps it: a one-element float tensor (float32/64 as saved; other
    dtypes converted to the default scalar dtype) or a plain number (old checkpoints)."""
    if isinstance(step, Tensor):
        if step.numel() != 1 or step.is_complex() or step.dtype == torch.bool:
            raise ValueError(
                f"{where}: state['step'] must be a one-element real tensor, got {step.dtype} {tuple(step.shape)}"
            )
        value = float(step.detach().reshape(()).item())
    elif isinstance(step, numbers.Real) and not isinstance(step, bool):
        value = float(step)
    else:
        raise ValueError(f"{where}: state['step'] must be a number or a tensor, got {step!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: state['step'] must be a finite count >= 0, got {value}")
    if isinstance(step, Tensor) and step.dtype not in (torch.float32, torch.float64):
        return step.detach().to(_get_scalar_dtype())
    return step
