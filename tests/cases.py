"""The one table the generic tests are driven by (after torch's OptimizerInfo): the option cases,
the inputs that must be refused, and the tolerance of each backend and dtype with the rounding
that explains it. Tests import from here instead of keeping tables of their own.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

# ----------------------------------------------------------------------------- backends
# Every backend, as the optimizer arguments that select it.
BACKENDS: dict[str, dict] = {
    "per-tensor": {"foreach": False, "fused": False},
    "foreach": {"foreach": True, "fused": False},
    "fused": {"fused": True},
}

# ----------------------------------------------------------------------------- option cases
# torch's own option table (optim_inputs_func_rmsprop in torch.testing._internal.
# common_optimizers), plus tensor lr, momentum alone and the combinations it skips: the cases
# where bit-identity with torch.optim.RMSprop is promised.
TORCH_CASES: dict[str, dict] = {
    "default": {},
    "non-default lr": {"lr": 1e-3},
    "nonzero weight_decay": {"weight_decay": 0.1},
    "maximize": {"maximize": True},
    "centered": {"weight_decay": 0.1, "centered": True},
    "maximize, weight_decay": {"maximize": True, "weight_decay": 0.1},
    "momentum": {"weight_decay": 0.1, "centered": True, "momentum": 0.1},
    "maximize, centered, weight_decay, w/ momentum": {
        "weight_decay": 0.1,
        "centered": True,
        "momentum": 0.1,
        "maximize": True,
    },
    "momentum alone": {"momentum": 0.9},
    "centered alone": {"centered": True},
    "seed example": {"lr": 0.01, "alpha": 0.9, "eps": 1e-8},
    "alpha 0": {"alpha": 0.0, "momentum": 0.5},
    "tensor lr": {"lr": torch.tensor(0.003)},
    "tensor lr of shape [1]": {"lr": torch.tensor([0.003])},
    "tensor lr, momentum, centered": {"lr": torch.tensor(0.003), "momentum": 0.9, "centered": True},
}

# Every switch, two values each: their product (minus the refused nesterov-without-momentum
# half) is checked against the float64 reference on every backend.
SWITCHES: dict[str, list] = {
    "eps_in_sqrt": [False, True],
    "centered": [False, True],
    "momentum": [0.0, 0.9],
    "nesterov": [False, True],
    "lr_in_momentum": [False, True],
    "weight_decay": [0.0, 0.1],
    "decoupled_weight_decay": [False, True],
    "bias_correction": [False, True],
    "maximize": [False, True],
    "initial_square_avg": [0.0, 1.0],
}


def _combinations():
    names = list(SWITCHES)
    for values in itertools.product(*SWITCHES.values()):
        combo = dict(zip(names, values, strict=True))
        if combo["nesterov"] and combo["momentum"] == 0:
            continue  # refused by design (see ERROR_CASES)
        yield combo


COMBINATIONS: list[dict] = list(_combinations())

# Named configurations for the tests that cannot afford the whole grid (resume, compile,
# distributed, the fused kernel's layouts and dtypes). "full" avoids centered + bias correction
# from v0 = 0, whose first variance is exactly 0 (see test_reference's exact-input tests).
NAMED: dict[str, dict] = {
    "plain": {},
    "eps_in_sqrt": {"eps_in_sqrt": True},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "decoupled": {"weight_decay": 0.1, "decoupled_weight_decay": True},
    "lr_in_momentum": {"momentum": 0.9, "lr_in_momentum": True},
    "initial_square_avg": {"initial_square_avg": 1.0},
    "momentum+centered": {"momentum": 0.9, "centered": True},
    "full": {"momentum": 0.9, "centered": True, "weight_decay": 0.01, "initial_square_avg": 0.5,
             "bias_correction": True},
    "everything": {"momentum": 0.9, "centered": True, "weight_decay": 0.1, "maximize": True,
                   "eps_in_sqrt": True, "nesterov": True, "decoupled_weight_decay": True,
                   "lr_in_momentum": True, "initial_square_avg": 1.0, "bias_correction": True},
    "eps_in_sqrt+nesterov+wd": {"eps_in_sqrt": True, "nesterov": True, "momentum": 0.9, "weight_decay": 0.01},
}  # fmt: skip

# ----------------------------------------------------------------------------- error cases
# (arguments, exception, message pattern): refused by the constructor and by add_param_group,
# before anything is added or changed. Messages start like torch's where torch has one.
ERROR_CASES: list[tuple[dict, type[Exception], str]] = [
    ({"lr": -1e-3}, ValueError, "Invalid learning rate"),
    ({"lr": math.nan}, ValueError, "learning rate"),
    ({"lr": math.inf}, ValueError, "learning rate"),
    ({"lr": torch.tensor([0.1, 0.2])}, ValueError, "Tensor lr must be 1-element"),
    ({"lr": torch.tensor(1, dtype=torch.int64)}, TypeError, "floating-point"),
    ({"lr": "0.1"}, TypeError, "lr must be a real number"),
    ({"eps": -1e-8}, ValueError, "epsilon"),
    ({"eps": math.nan}, ValueError, "epsilon"),
    ({"eps": math.inf}, ValueError, "epsilon"),
    ({"weight_decay": -0.1}, ValueError, "weight_decay"),
    ({"weight_decay": math.nan}, ValueError, "weight_decay"),
    ({"momentum": -1.0}, ValueError, "Invalid momentum value: -1.0"),  # torch's own message
    ({"momentum": math.nan}, ValueError, "momentum"),
    ({"momentum": torch.tensor(0.9)}, TypeError, "momentum must be a number, not a tensor"),
    ({"momentum": True}, TypeError, "momentum must be a real number"),
    ({"initial_square_avg": -1.0}, ValueError, "initial_square_avg"),
    ({"initial_square_avg": math.nan}, ValueError, "initial_square_avg"),
    ({"initial_square_avg": torch.tensor([1.0])}, TypeError, "initial_square_avg must be a number"),
    ({"alpha": -0.1}, ValueError, "alpha"),
    ({"alpha": 1.5}, ValueError, "alpha"),
    ({"alpha": math.nan}, ValueError, "alpha"),
    ({"alpha": None}, TypeError, "alpha"),
    ({"centered": "yes"}, TypeError, "centered must be True or False"),
    ({"centered": 1}, TypeError, "centered must be True or False"),
    ({"foreach": "auto"}, TypeError, "foreach must be None, True or False"),
    ({"nesterov": True}, ValueError, "nesterov=True requires momentum > 0"),
    ({"bias_correction": True, "alpha": 1.0}, ValueError, "bias_correction=True requires alpha < 1"),
    ({"fused": True, "foreach": True}, RuntimeError, "cannot both"),
    ({"fused": True, "differentiable": True}, RuntimeError, "differentiable"),
    ({"lazy_sparse": 1}, TypeError, "lazy_sparse must be True or False"),
    ({"lazy_sparse": True, "bias_correction": True}, ValueError, "lazy_sparse=True cannot be combined with bias"),
    ({"lazy_sparse": True, "differentiable": True}, RuntimeError, "lazy_sparse=True does not support differentiable"),
]

# Accepted and normalized: numpy scalars become Python numbers (so checkpoints stay loadable
# with weights_only=True).
NUMPY_CASES: dict[str, dict] = {
    "float64 momentum": {"momentum": np.float64(0.9)},
    "float32 lr": {"lr": np.float32(0.01)},
    "int64 weight_decay": {"weight_decay": np.int64(0)},
    "numpy bool": {"centered": np.bool_(True)},
}


# ----------------------------------------------------------------------------- tolerances
@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    reason: str


# Against the float64 reference, per (backend, dtype). The reason is the rounding allowed.
TOLERANCES: dict[tuple[str, torch.dtype], Tolerance] = {
    **{
        (b, torch.float64): Tolerance(
            1e-10, 1e-12,
            "float64: the paths order operations differently (torch's lerp vs a*m + (1-a)*g, addcdiv vs "
            "g/d*lr, the kernel's multiply by 1/(1-a^t)): a few ulps (1e-16) a step, 8 steps, amplified "
            "by 1/sqrt(v)",
        )
        for b in BACKENDS
    },
    **{
        (b, torch.complex128): Tolerance(1e-10, 1e-12, "complex128: two float64 reals each, as above")
        for b in BACKENDS
    },
    **{
        (b, torch.float32): Tolerance(
            2e-5, 1e-6,
            "float32: about 1 ulp (6e-8) per operation, ~10 operations a step over 8 steps, amplified "
            "by the division by sqrt(v) + eps",
        )
        for b in BACKENDS
    },
}  # fmt: skip
# Property tests draw hyperparameters at random (lr up to 1, eps down to 1e-8): more steps of
# cancellation than the fixed grid, hence ten times the float64 tolerance.
PROPERTY_TOLERANCE = Tolerance(1e-9, 1e-11, "float64 with random hyperparameters: see TOLERANCES, x10")


def tolerance(backend: str, dtype: torch.dtype) -> Tolerance:
    return TOLERANCES[(backend, dtype)]


# Low precision storage, fp32 math: each stored value is rounded once, so one step's result is
# within half an ulp of the exact result of its inputs (2^-8 relative for bf16, 2^-11 for fp16),
# plus the fp32 math's own error (~1e-7 relative, covered by the factor 1 + 1e-3).
HALF_ULP: dict[torch.dtype, float] = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
