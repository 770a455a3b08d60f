"""The table of options: one declaration per hyperparameter and switch of :class:`rmsprop.RMSprop`.

Everything else is derived from :data:`OPTIONS`: the constructor's defaults, the checks that run
where a value enters (constructor, ``add_param_group``, ``load_state_dict``), the value a
checkpoint without a key gets, the :class:`~rmsprop.rule.Rule` the backends read, the native
kernel's struct and the custom op's schema (both in ``backends/fused_cpu``).

Adding a switch touches: this table (``rule=True`` if the update reads it), the math of each
backend (``backends/single.py``, ``backends/foreach.py``, the C kernel's ``rms_call`` field and
loop, the Triton kernel and ``backends/fused_triton/loader.IMPLEMENTED``) and
:mod:`rmsprop.reference`; the tests pick it up from ``tests/cases.py``. The native
loader refuses a kernel whose struct does not match the table, so a forgotten C field cannot
reach a step.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

__all__ = [
    "Option",
    "OPTIONS",
    "BY_NAME",
    "DEFAULTS",
    "RULE_OPTIONS",
    "OP_OPTIONS",
    "OP_SCHEMA_ARGS",
    "STATE_DTYPES",
    "KEEP",
    "REQUIRED",
    "normalize",
    "validate_group",
    "migrate_group",
]

# A checkpoint lacking the key keeps the value the optimizer was built with (used for `fused`:
# torch's checkpoints say nothing about the kernel).
KEEP = object()
# A checkpoint lacking the key is refused (torch's checkpoints always have it).
REQUIRED = object()


@dataclass(frozen=True)
class Option:
    """One hyperparameter or switch.

    ``kind``: ``"lr"`` (a real number or a one-element tensor), ``"number"`` (a real number;
    numpy scalars accepted and stored as Python numbers), ``"count"`` (an integer >= 0),
    ``"flag"`` (True/False), ``"tristate"`` (None/True/False) or ``"state_dtype"`` (None,
    ``torch.float32``, ``torch.bfloat16`` or ``"int8"``; the strings ``"float32"`` and
    ``"bfloat16"`` are accepted and stored as the dtypes). ``lower``/``upper`` bound a number
    (inclusive); numbers are always finite. ``torch``: an argument of ``torch.optim.RMSprop`` (in
    its order). ``missing``: the value a checkpoint without the key gets (torch's
    ``__setstate__`` value for torch's keys, the value that reproduces the old algorithm for
    ours). ``own_on_load``: ``load_state_dict`` keeps the optimizer's own value whatever the
    checkpoint says (a storage choice, not part of the algorithm: the state is converted to it).
    ``rule``: part of the update's :class:`~rmsprop.rule.Rule`, read by every backend.
    """

    name: str
    default: Any
    kind: str
    doc: str
    torch: bool = False
    missing: Any = REQUIRED
    rule: bool = False
    lower: float | None = None
    upper: float | None = None
    own_on_load: bool = False

    def check(self, value: Any) -> Any:
        """The value, normalized (numpy scalars to Python numbers); TypeError or ValueError
        naming the option when it is not acceptable."""
        if self.kind == "state_dtype":
            return _state_dtype(value)
        if self.kind == "count":
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{self.name} must be an integer >= 0, got {value!r} ({type(value).__name__})")
            if value < 0:
                raise ValueError(f"Invalid {self.name}: {value} ({self.name} must be >= 0)")
            return int(value)
        if self.kind == "tristate":
            if value is None:
                return None
            return _flag(self.name, value, "None, True or False")
        if self.kind == "flag":
            return _flag(self.name, value)
        if self.kind == "lr" and isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(value.shape)}")
            if not value.is_floating_point():
                raise TypeError(f"Tensor lr must be a floating-point tensor, got {value.dtype}")
            if value.device.type == "meta":
                raise ValueError("Tensor lr must hold a value (it is on the meta device)")
            if value.device.type != "cpu":
                return value  # reading it would synchronise the device (capturable training)
            number = float(value.detach().reshape(()).item())
        else:
            number = _number(self.name, value)
            value = value if type(value) in (int, float) else number
        what = _WHAT.get(self.name, f"{self.name} value")
        if math.isnan(number) or math.isinf(number):
            raise ValueError(f"Invalid {what}: {value} ({self.name} must be a finite number)")
        if self.lower is not None and number < self.lower:
            raise ValueError(f"Invalid {what}: {value} ({self.name} must be >= {self.lower:g})")
        if self.upper is not None and number > self.upper:
            raise ValueError(f"Invalid {what}: {value} ({self.name} must be <= {self.upper:g})")
        return value


# torch's messages begin "Invalid learning rate: ...", "Invalid momentum value: ..."; code that
# matches them keeps working.
_WHAT = {"lr": "learning rate", "eps": "epsilon value", "alpha": "alpha value"}


def _flag(name: str, value: Any, allowed: str = "True or False") -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")


# The state formats: None keeps torch's (the parameter's dtype), the others are this library's.
STATE_DTYPES: tuple[Any, ...] = (None, torch.float32, torch.bfloat16, "int8")
_STATE_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": "int8"}


def _state_dtype(value: Any) -> Any:
    if isinstance(value, str) and value in _STATE_DTYPE_NAMES:
        return _STATE_DTYPE_NAMES[value]
    if value is None or (isinstance(value, torch.dtype) and value in STATE_DTYPES):
        return value
    int8 = isinstance(value, torch.dtype) and value in (torch.int8, torch.uint8)
    hint = ' (8-bit state is state_dtype="int8": blockwise codes with a scale per block)' if int8 else ""
    raise (TypeError if not isinstance(value, (str, torch.dtype)) else ValueError)(
        f"state_dtype must be None, torch.float32, torch.bfloat16 or \"int8\", got {value!r}{hint}"
    )


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a number, not a tensor (only lr may be a tensor)")
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range
        raise ValueError(f"Invalid {name} value: {value} ({name} must be a finite number)") from None


OPTIONS: tuple[Option, ...] = (
    # torch.optim.RMSprop's arguments, in its order
    Option("lr", 1e-2, "lr", "learning rate η (float or 1-element tensor)", torch=True, lower=0.0),
    Option("alpha", 0.99, "number", "smoothing constant ρ of the averages", torch=True, rule=True,
           lower=0.0, upper=1.0),
    Option("eps", 1e-8, "number", "ε, added to the denominator", torch=True, rule=True, lower=0.0),
    Option("weight_decay", 0, "number", "λ: coupled L2, or decoupled with decoupled_weight_decay",
           torch=True, rule=True, lower=0.0),
    Option("momentum", 0, "number", "momentum factor μ", torch=True, missing=0, rule=True, lower=0.0),
    Option("centered", False, "flag", "divide by the standard deviation √(E[g²] − E[g]²)", torch=True,
           missing=False, rule=True),
    Option("capturable", False, "flag", "state and step counters on the parameters' device (CUDA graphs)",
           torch=True, missing=False),
    Option("foreach", None, "tristate", "torch's multi-tensor path (True), per-tensor path (False)",
           torch=True, missing=None),
    Option("maximize", False, "flag", "maximize the objective instead of minimizing", torch=True,
           missing=False, rule=True),
    Option("differentiable", False, "flag", "keep autograd history through the update", torch=True,
           missing=False),
    # this library's extensions (keyword-only)
    Option("fused", None, "tristate", "the fused kernel: None where it applies, True always, False never",
           missing=KEEP),
    Option("eps_in_sqrt", False, "flag", "√(v + ε) instead of √v + ε", missing=False, rule=True),
    Option("nesterov", False, "flag", "Nesterov momentum (needs momentum > 0)", missing=False, rule=True),
    Option("decoupled_weight_decay", False, "flag", "θ ← θ(1 − ηλ) instead of g ← g + λθ", missing=False,
           rule=True),
    Option("lr_in_momentum", False, "flag", "the momentum buffer holds lr-scaled steps (TF)", missing=False,
           rule=True),
    Option("initial_square_avg", 0.0, "number", "the starting value v₀ of E[g²]", missing=0.0, lower=0.0),
    Option("bias_correction", False, "flag", "divide the averages by 1 − ρᵗ (optax)", missing=False,
           rule=True),
    Option("state_dtype", None, "state_dtype",
           "storage of square_avg, grad_avg, momentum_buffer: None (the parameter's dtype, as torch), "
           "torch.float32, torch.bfloat16 (stochastic rounding) or \"int8\" (blockwise 8-bit codes)",
           missing=KEEP, rule=True, own_on_load=True),
    Option("int8_min_numel", 4096, "count",
           "with state_dtype=\"int8\", tensors of fewer elements keep float32 state (float64 for float64)",
           missing=KEEP, own_on_load=True),
    # Read before dispatch (functional.prepare), not by the dense update: not part of the Rule.
    Option("lazy_sparse", False, "flag", "a sparse gradient updates only its rows (TF's SparseApplyRMSProp)",
           missing=False),
)  # fmt: skip

BY_NAME: Mapping[str, Option] = MappingProxyType({o.name: o for o in OPTIONS})
DEFAULTS: Mapping[str, Any] = MappingProxyType({o.name: o.default for o in OPTIONS})
RULE_OPTIONS: tuple[Option, ...] = tuple(o for o in OPTIONS if o.rule)
# The Rule fields the compiled custom ops take as arguments: the update's numbers and switches
# (a group with a state_dtype never reaches an op: it runs the low-bit paths eagerly).
OP_OPTIONS: tuple[Option, ...] = tuple(o for o in RULE_OPTIONS if o.kind in ("number", "flag"))
OP_SCHEMA_ARGS = ", ".join(f"{'float' if o.kind == 'number' else 'bool'} {o.name}" for o in OP_OPTIONS)


@dataclass(frozen=True)
class Constraint:
    """A rule between options: ``holds(group)`` or ``error(message)`` is raised."""

    holds: Callable[[Mapping[str, Any]], bool]
    message: str
    error: type[Exception] = ValueError


CONSTRAINTS: tuple[Constraint, ...] = (
    Constraint(lambda g: not g["nesterov"] or g["momentum"] > 0, "nesterov=True requires momentum > 0"),
    Constraint(
        lambda g: not g["bias_correction"] or g["alpha"] < 1,
        "bias_correction=True requires alpha < 1 (the correction 1 - alpha^t would be 0)",
    ),
    Constraint(lambda g: not (g["fused"] and g["foreach"]), "fused=True and foreach=True cannot both be set",
               RuntimeError),
    Constraint(lambda g: not (g["fused"] and g["differentiable"]),
               "fused=True does not support differentiable=True", RuntimeError),
    Constraint(lambda g: g["state_dtype"] is None or not g["differentiable"],
               "differentiable=True does not support a state_dtype (rounding the state is not differentiable)"),
    Constraint(lambda g: g["state_dtype"] is None or not g["lazy_sparse"],
               "lazy_sparse=True does not support a state_dtype (lazy rows update the state row by row; "
               "low-bit blocks are cut across rows)"),
    # Lazy rows: a row's average holds only the steps that touched it, so the per-step factor
    # 1 - alpha^t (t the parameter's step) would correct it for steps it never saw.
    Constraint(lambda g: not (g["lazy_sparse"] and g["bias_correction"]),
               "lazy_sparse=True cannot be combined with bias_correction=True: a row updated only on the "
               "steps that look it up has no meaningful 1 - alpha^t correction"),
    Constraint(lambda g: not (g["lazy_sparse"] and g["differentiable"]),
               "lazy_sparse=True does not support differentiable=True", RuntimeError),
)  # fmt: skip


def normalize(values: Mapping[str, Any]) -> dict[str, Any]:
    """Check every option present in ``values`` (unknown keys pass through untouched) and return
    a copy with numpy scalars turned into Python numbers. Touches nothing."""
    out = dict(values)
    for name, value in values.items():
        option = BY_NAME.get(name)
        if option is not None:
            out[name] = option.check(value)
    return out


def validate_group(group: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """A complete group (every option present), checked value by value and between options;
    returns the normalized copy. Raises TypeError / ValueError / RuntimeError naming the first
    problem (prefixed by ``where``), changing nothing."""
    try:
        missing = [o.name for o in OPTIONS if o.name not in group]
        if missing:
            raise ValueError(f"the param group lacks the options {missing}")
        out = normalize(group)
        for constraint in CONSTRAINTS:
            if not constraint.holds(out):
                raise constraint.error(constraint.message)
    except (TypeError, ValueError, RuntimeError) as exc:
        if not where:
            raise
        raise type(exc)(f"{where}: {exc}") from None
    return out


def migrate_group(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """A saved group completed with the values that reproduce its algorithm for keys it lacks
    (a torch checkpoint, or one from an older version); ``current`` supplies the KEEP ones and
    the ``own_on_load`` ones (the optimizer's storage choices win over the checkpoint's)."""
    out = dict(saved)
    for option in OPTIONS:
        if option.own_on_load and option.name in current:
            out[option.name] = current[option.name]
        elif option.name not in out and option.missing is not REQUIRED:
            out[option.name] = current[option.name] if option.missing is KEEP else option.missing
    return out
