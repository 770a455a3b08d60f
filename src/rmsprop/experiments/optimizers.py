"""The optimizers `rmsprop compare` puts side by side, and their effective per-parameter lr."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..optimizer import RMSprop
from ..presets import from_preset

Factory = Callable[[list[torch.Tensor], float], torch.optim.Optimizer]

OPTIMIZERS: dict[str, Factory] = {
    "SGD": lambda ps, lr: torch.optim.SGD(ps, lr=lr),
    "SGD+momentum": lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9),
    "Adagrad": lambda ps, lr: torch.optim.Adagrad(ps, lr=lr),
    "Adam": lambda ps, lr: torch.optim.Adam(ps, lr=lr),
    "RMSprop (torch)": lambda ps, lr: from_preset("torch", ps, lr=lr),
    "RMSprop (seed)": lambda ps, lr: from_preset("seed", ps, lr=lr),
    "RMSprop centered": lambda ps, lr: RMSprop(ps, lr=lr, centered=True),
    "RMSprop momentum": lambda ps, lr: RMSprop(ps, lr=lr, momentum=0.9),
}
# The optimizers of the default study (`rmsprop compare` without --optimizers).
DEFAULT_OPTIMIZERS = tuple(OPTIMIZERS)
# The state-format study (`rmsprop compare --state-formats`): RMSprop momentum, whose two buffers
# (square_avg, momentum_buffer) are what low-bit state shrinks, with each format. "int8" keeps
# tensors below int8_min_numel (4096 elements) in float32, which on these small models is most
# of them; "all tensors" quantizes every tensor, the worst case for accuracy.
STATE_FORMATS: dict[str, Factory] = {
    "RMSprop momentum, bf16 state": lambda ps, lr: RMSprop(ps, lr=lr, momentum=0.9, state_dtype=torch.bfloat16),
    "RMSprop momentum, int8 state": lambda ps, lr: RMSprop(ps, lr=lr, momentum=0.9, state_dtype="int8"),
    "RMSprop momentum, int8 state, all tensors": lambda ps, lr: RMSprop(
        ps, lr=lr, momentum=0.9, state_dtype="int8", int8_min_numel=0
    ),
}
OPTIMIZERS.update(STATE_FORMATS)
STATE_FORMAT_STUDY = ("RMSprop momentum", *STATE_FORMATS)
# The RMSProp the general claims judge: plain RMSProp in torch's form. The others are variants,
# each judged on its own row, never folded into a best-of.
RMSPROP = "RMSprop (torch)"
RMSPROP_VARIANTS = ("RMSprop (torch)", "RMSprop (seed)", "RMSprop centered", "RMSprop momentum")
# What the general claims compare: the default of a quick run, which skips the variants.
QUICK_OPTIMIZERS = ("SGD", "SGD+momentum", "Adagrad", "Adam", RMSPROP)
DESCRIPTIONS = {
    "SGD": "torch.optim.SGD",
    "SGD+momentum": "torch.optim.SGD, heavy-ball momentum",
    "Adagrad": "torch.optim.Adagrad",
    "Adam": "torch.optim.Adam",
    "RMSprop (torch)": "rmsprop.RMSprop, preset 'torch' (torch.optim.RMSprop's defaults)",
    "RMSprop (seed)": "rmsprop.RMSprop, preset 'seed' (the seed document's alpha and eps inside the root)",
    "RMSprop centered": "rmsprop.RMSprop(centered=True): divides by the gradient's variance estimate",
    "RMSprop momentum": "rmsprop.RMSprop(momentum=0.9)",
    "RMSprop momentum, bf16 state": "rmsprop.RMSprop(momentum=0.9, state_dtype=torch.bfloat16)",
    "RMSprop momentum, int8 state": "rmsprop.RMSprop(momentum=0.9, state_dtype='int8'): tensors under 4096 elements keep float32 state",
    "RMSprop momentum, int8 state, all tensors": "rmsprop.RMSprop(momentum=0.9, state_dtype='int8', int8_min_numel=0)",
}
# The hyperparameters worth stating (whatever else a param group holds are switches left off).
_SHOWN = (
    "momentum",
    "nesterov",
    "betas",
    "alpha",
    "eps",
    "eps_in_sqrt",
    "centered",
    "lr_decay",
    "initial_accumulator_value",
    "weight_decay",
)


def settings(name: str) -> dict:
    """Every hyperparameter but the lr, read from the optimizer itself as the study builds it."""
    group = OPTIMIZERS[name]([torch.zeros(1, requires_grad=True)], 0.1).param_groups[0]
    shown = {k: group[k] for k in _SHOWN if k in group}
    if group.get("state_dtype") is not None:  # the state format, where it is not the default
        shown["state_dtype"] = str(group["state_dtype"])
        if group["state_dtype"] == "int8":
            shown["int8_min_numel"] = group["int8_min_numel"]
    return shown


def hyperparameters(names: list[str]) -> dict[str, str]:
    """:func:`settings` of each optimizer, as the report states them ("alpha=0.99, eps=1e-08")."""
    return {name: ", ".join(f"{k}={v}" for k, v in settings(name).items()) for name in names}


def effective_lr(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> torch.Tensor:
    """Per-element step size lr / denominator each optimizer applies to the gradient now
    (momentum aside): lr for SGD, lr / (sqrt(sum g^2) + eps) for Adagrad, lr / (sqrt(v) + eps)
    or lr / sqrt(v + eps) for RMSProp, lr / (sqrt(v / (1 - beta2^t)) + eps) for Adam."""
    wanted = {id(p) for p in params}  # identity: `in` on a list of tensors compares values
    out = []
    for group in opt.param_groups:
        lr = float(group["lr"])
        for p in group["params"]:
            if id(p) not in wanted:
                continue
            state = opt.state.get(p, {})
            if isinstance(opt, torch.optim.Adagrad) and "sum" in state:
                d = state["sum"].sqrt() + group["eps"]
            elif isinstance(opt, torch.optim.Adam) and "exp_avg_sq" in state:
                beta2 = group["betas"][1]
                d = (state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))).sqrt() + group["eps"]
            elif isinstance(opt, RMSprop) and "square_avg" in state:
                v = state["square_avg"]
                d = (v + group["eps"]).sqrt() if group["eps_in_sqrt"] else v.sqrt() + group["eps"]
            else:
                d = torch.ones_like(p)
            out.append((lr / d).flatten())
    return torch.cat(out) if out else torch.zeros(0)
