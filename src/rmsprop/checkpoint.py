"""load_state_dict's checks and migration, all or nothing.

torch checks only the number of groups and parameters. Here a state dict is checked completely —
every group's hyperparameters through the option table, every state tensor against its
parameter, every step counter — and completed (keys a torch checkpoint or an older version lacks
get the values that reproduce its algorithm) before the optimizer is touched. On any problem a
ValueError or TypeError names it and the optimizer is left exactly as it was.

State formats (see :mod:`rmsprop.lowbit`): the optimizer's own ``state_dtype`` and
``int8_min_numel`` win over the checkpoint's, and each parameter's saved state is converted to
the format they give it — an fp32 checkpoint into int8 state (rounded to nearest), int8 into
fp32, bf16 into int8, centered's ``grad_var`` into ``square_avg`` and back — unless it is in that
format already (then it is taken as it is: resume is bit-identical). State in the parameter's
dtype, or cast to it as torch casts floating state, goes through torch's loader as before; the
rest is installed after it (torch's loader would cast it to the parameter's dtype).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype

from . import lowbit
from .options import migrate_group, validate_group

__all__ = ["prepare_state_dict", "check_param_state"]


def prepare_state_dict(
    groups: list[dict[str, Any]], state_dict: Any
) -> tuple[dict[str, Any], dict[Tensor, dict[str, Any]]]:
    """The state dict, checked and completed for an optimizer whose groups are ``groups`` (the
    input is not modified), and the entries to install after torch's loader, by parameter."""
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
    new_groups, new_state, held_back = [], dict(saved_state), {}
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
                checked = check_param_state(entry, param, migrated, where)
                if _torch_casts_it(checked, param, migrated):
                    new_state[pid] = checked
                else:
                    new_state.pop(pid, None)
                    held_back[param] = _on_device(checked, param, migrated)
    return {**state_dict, "param_groups": new_groups, "state": new_state}, held_back


def _torch_casts_it(entry: dict[str, Any], param: Tensor, group: dict[str, Any]) -> bool:
    """torch's loader casts floating state to the parameter's dtype: right for the parameter's
    own format, wrong for any other."""
    if group["state_dtype"] is None:
        return True
    fmt, _ = lowbit.target(group["state_dtype"], group["int8_min_numel"], param)
    return fmt == "same"


def _on_device(entry: dict[str, Any], param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
    """What torch's loader does to the tensors it does not cast: to the parameter's device (the
    step counter too with capturable or fused, as float32, as torch does)."""
    out = {}
    for key, value in entry.items():
        if key == "step" and isinstance(value, Tensor):
            if group["capturable"] or group["fused"]:
                value = value.to(dtype=torch.float32, device=param.device)
        elif isinstance(value, Tensor) and not lowbit.is_dtensor(value):
            value = value.to(device=param.device)
        out[key] = value
    return out


def check_param_state(entry: Any, param: Tensor, group: dict[str, Any], where: str) -> dict[str, Any]:
    """``entry`` if it is a usable RMSprop state for ``param`` under ``group``'s options (its step
    counter converted to a float tensor if it was another number type), converted to the format
    the group gives the parameter where it is in another (see the module docstring); ValueError
    otherwise."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: the state must be a dict, got {type(entry).__name__}")
    second = "grad_var" if "grad_var" in entry else "square_avg"
    if second == "grad_var" and not group["centered"]:
        raise ValueError(f"{where}: the state holds a centered variance (grad_var), but the group is not centered")
    needed = ["step", second]
    if group["momentum"] > 0:
        needed.append("momentum_buffer")
    if group["centered"]:
        needed.append("grad_avg")
    missing = [k for k in needed if k not in entry]
    if missing:
        raise ValueError(f"{where}: the state lacks {missing}, which its saved options need")
    for key in (second, "momentum_buffer", "grad_avg"):
        if key in entry:
            _check_buffer(entry[key], key, param, where, entry.get(key + "_scale"))
    checked = {**entry, "step": _checked_step(entry["step"], where)}
    # int8 blocks follow the row-major order, and a step reads codes and scales as flat arrays:
    # it refuses strided ones. torch's loader takes state of any strides and its steps work, so
    # such codes (a view, a tensor transposed and back) are copied into that layout instead.
    for key in (second, "momentum_buffer", "grad_avg"):
        if key in checked and checked[key].dtype == torch.uint8:
            checked[key] = checked[key].contiguous()  # (a DTensor: its local shard too)
            checked[key + "_scale"] = checked[key + "_scale"].contiguous()
    if group["state_dtype"] is None and lowbit.entry_format(checked) == "float":
        return checked  # torch's own format: torch's loader casts it, as before
    fmt, dtype = lowbit.target(group["state_dtype"], group["int8_min_numel"], param)
    keys = [k for k in lowbit.buffer_keys(fmt, group["centered"], group["momentum"] > 0) if k in checked]
    if _in_format(checked, keys, dtype, second):
        return checked
    return lowbit.from_float(lowbit.to_float(checked, param, group), param, group, checked)


def _in_format(entry: dict[str, Any], keys: list[str], dtype: torch.dtype, second: str) -> bool:
    """Whether the checked entry's buffers are already stored as the target format keeps them."""
    if not keys or keys[0] != second:
        return False
    for key in keys:
        if entry[key].dtype != dtype:
            return False
    extra_scales = [k for k in entry if k.endswith("_scale") and k[: -len("_scale")] not in keys]
    return not extra_scales


def _check_buffer(value: Any, key: str, param: Tensor, where: str, scales: Any = None) -> None:
    if not isinstance(value, Tensor):
        raise ValueError(f"{where}: state['{key}'] is a {type(value).__name__}, not a tensor")
    if value.layout is not torch.strided or value.is_neg() or value.is_conj():
        raise ValueError(
            f"{where}: state['{key}'] must be a dense tensor without a conjugate or negative bit "
            f"(got a {value.layout} tensor{', with such a bit' if value.is_neg() or value.is_conj() else ''})"
        )
    if value.dtype == torch.uint8:
        _check_codes(value, key, param, where, scales)
        return
    if scales is not None:
        raise ValueError(f"{where}: state['{key}_scale'] belongs to int8 codes, but state['{key}'] is {value.dtype}")
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


def _check_codes(codes: Tensor, key: str, param: Tensor, where: str, scales: Any) -> None:
    """int8 state: codes of the parameter's shape and their per-block float32 scales (a
    DTensor's: a (shards, blocks) DTensor whose local row covers the local shard)."""
    if param.is_complex() or not param.is_floating_point():
        raise ValueError(f"{where}: state['{key}'] holds int8 codes, which cannot be state for a {param.dtype} parameter")
    if codes.shape != param.shape:
        raise ValueError(
            f"{where}: state['{key}'] has shape {tuple(codes.shape)}, the parameter has shape {tuple(param.shape)}"
        )
    if not isinstance(scales, Tensor) or scales.dtype != torch.float32:
        got = scales.dtype if isinstance(scales, Tensor) else type(scales).__name__
        raise ValueError(f"{where}: state['{key}'] holds int8 codes: state['{key}_scale'] must be a float32 tensor, got {got}")
    if lowbit.is_dtensor(param) != lowbit.is_dtensor(scales) or lowbit.is_dtensor(param) != lowbit.is_dtensor(codes):
        raise ValueError(
            f"{where}: state['{key}'] is int8 state saved {'with' if lowbit.is_dtensor(scales) else 'without'} sharding "
            f"and the parameter is {'' if lowbit.is_dtensor(param) else 'not '}a DTensor: int8 blocks are cut from "
            "each rank's shard, so int8 state loads only at the sharding it was saved with (save it with "
            "state_dtype=torch.float32 or bfloat16 to reshard)"
        )
    local = codes.to_local() if lowbit.is_dtensor(codes) else codes
    local_scales = scales.to_local() if lowbit.is_dtensor(scales) else scales
    if local_scales.layout is not torch.strided:
        raise ValueError(f"{where}: state['{key}_scale'] must be a dense tensor, got a {local_scales.layout} one")
    if local_scales.numel() and not bool((torch.isfinite(local_scales) & (local_scales >= 0)).all()):
        raise ValueError(f"{where}: state['{key}_scale'] holds a negative or non-finite scale (a corrupted checkpoint?)")
    blocks = lowbit.n_blocks(local.numel())
    ok = local_scales.numel() >= blocks if lowbit.is_dtensor(scales) else tuple(scales.shape) == (blocks,)
    if not ok:
        raise ValueError(
            f"{where}: state['{key}_scale'] has shape {tuple(local_scales.shape)}; the {local.numel()} codes "
            f"{'of this shard ' if lowbit.is_dtensor(codes) else ''}need {blocks} scales (one per block of {lowbit.BLOCK})"
        )


def _checked_step(step: Any, where: str) -> Tensor:
    """A step counter as torch keeps it: a one-element float tensor (float32/64 as saved; other
    dtypes, and the plain numbers of old checkpoints, converted to the default scalar dtype)."""
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
    if not isinstance(step, Tensor):
        # as torch's RMSprop.__setstate__ converts it, on the CPU (_on_device / torch's loader
        # then move it as they move a saved tensor): here, because low-bit entries are installed
        # after torch's loader and its __setstate__ have run
        return torch.tensor(value, dtype=_get_scalar_dtype())
    if step.dtype not in (torch.float32, torch.float64):
        return step.detach().to(_get_scalar_dtype())
    return step
