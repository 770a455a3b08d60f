"""The update rule of one param group, as a frozen record the backends read.

Building a :class:`Rule` once per group and step keeps the backends' signatures short and puts the
validation of every switch in one place, instead of twenty loose keyword arguments per backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["Rule", "validate_hyperparameters"]


@dataclass(frozen=True)
class Rule:
    r"""Everything about the RMSProp update except the learning rate (which schedulers change).

    For a parameter :math:`\theta`, gradient :math:`g` and step :math:`t`:

    .. math::
        g &\leftarrow -g \text{ if maximize};\quad
            g \leftarrow g + \lambda\theta \text{ (coupled weight decay)} \\
        \theta &\leftarrow \theta(1 - \eta\lambda) \text{ (decoupled weight decay)} \\
        v &\leftarrow \alpha v + (1-\alpha) g^2, \qquad
            m \leftarrow \alpha m + (1-\alpha) g \text{ (centered)} \\
        \hat v &= v / (1-\alpha^t),\quad \hat m = m / (1-\alpha^t) \text{ (bias correction)} \\
        s &= \hat v - \hat m^2 \text{ clamped at 0 (centered), else } \hat v \\
        d &= \sqrt{s + \epsilon} \text{ (eps\_in\_sqrt) or } \sqrt{s} + \epsilon \text{ (torch)} \\
        u &= g / d

    then, without momentum, :math:`\theta \leftarrow \theta - \eta u`; with momentum :math:`\mu`,
    the buffer :math:`b` holds either unscaled steps (torch: :math:`b \leftarrow \mu b + u`,
    :math:`\theta \leftarrow \theta - \eta b`) or lr-scaled ones (``lr_in_momentum``, TF:
    :math:`b \leftarrow \mu b + \eta u`, :math:`\theta \leftarrow \theta - b`); Nesterov replaces
    the applied step :math:`b` by :math:`u + \mu b` (resp. :math:`\eta u + \mu b`).
    """

    alpha: float
    eps: float
    weight_decay: float = 0.0
    momentum: float = 0.0
    centered: bool = False
    maximize: bool = False
    eps_in_sqrt: bool = False
    nesterov: bool = False
    decoupled_weight_decay: bool = False
    lr_in_momentum: bool = False
    bias_correction: bool = False

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> Rule:
        """The rule a param group describes (every field of Rule is a key of the group)."""
        return cls(**{f.name: group[f.name] for f in fields(cls)})


def _is_bad(value: Any) -> bool:
    """True for a negative number or NaN (including 1-element tensors)."""
    try:
        value = float(value)
    except (TypeError, ValueError, RuntimeError):
        return True
    return math.isnan(value) or value < 0.0


def validate_hyperparameters(
    *,
    lr: Any,
    alpha: Any,
    eps: Any,
    weight_decay: Any,
    momentum: Any,
    nesterov: bool,
    initial_square_avg: Any,
    bias_correction: bool = False,
) -> None:
    """Raise ValueError naming the first invalid hyperparameter; touches nothing.

    The messages start like torch's ("Invalid momentum value: -1.0") so code matching torch's
    errors keeps working.
    """
    import torch

    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    checks = [
        ("learning rate", "lr", lr),
        ("epsilon value", "eps", eps),
        ("momentum value", "momentum", momentum),
        ("weight_decay value", "weight_decay", weight_decay),
        ("initial_square_avg value", "initial_square_avg", initial_square_avg),
    ]
    for what, name, value in checks:
        if _is_bad(value):
            raise ValueError(f"Invalid {what}: {value} ({name} must be a number >= 0, not NaN)")
    if _is_bad(alpha) or float(alpha) > 1.0:
        raise ValueError(f"Invalid alpha value: {alpha} (alpha must lie in [0, 1])")
    if math.isinf(float(eps)) or math.isinf(float(momentum)):
        raise ValueError(f"Invalid eps or momentum: eps={eps}, momentum={momentum} must be finite")
    if nesterov and not float(momentum) > 0:
        raise ValueError("nesterov=True requires momentum > 0")
    if bias_correction and float(alpha) == 1.0:
        raise ValueError("bias_correction=True requires alpha < 1 (the correction 1 - alpha^t would be 0)")
