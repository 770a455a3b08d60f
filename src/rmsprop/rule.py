"""The update rule of one param group, as a frozen record the backends read.

:class:`Rule` is generated from the option table (:data:`rmsprop.options.RULE_OPTIONS`): one field
per option the update reads, numbers as ``float`` and switches as ``bool``, so a backend's view of
a group can never lack an option or see a numpy scalar. Building it once per group and step keeps
the backends' signatures short.
"""

from __future__ import annotations

from dataclasses import field, make_dataclass
from typing import Any

from .options import RULE_OPTIONS

__all__ = ["Rule"]

_DOC = (
    r"""Everything about the RMSProp update except the learning rate (which schedulers change).

    Fields: """
    + ", ".join(o.name for o in RULE_OPTIONS)
    + r""".

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
)


def _state_dtype(value: Any) -> Any:
    return value  # already normalized by the option table: None, a torch.dtype or "int8"


_TYPES = {"number": float, "flag": bool, "state_dtype": _state_dtype}
_ANNOTATIONS = {"number": float, "flag": bool, "state_dtype": Any}


def _from_group(cls, group: dict[str, Any]) -> Rule:
    """The rule a param group describes (numbers as float, switches as bool)."""
    return cls(**{o.name: _TYPES[o.kind](group[o.name]) for o in RULE_OPTIONS})


# state_dtype (a storage choice, the last rule option) defaults to None, torch's format, so a Rule
# spelled out with the update's options alone keeps meaning what it meant before it existed.
_WITH_DEFAULT = {"state_dtype": None}
assert all(o.name in _WITH_DEFAULT for o in RULE_OPTIONS[len(RULE_OPTIONS) - len(_WITH_DEFAULT) :])

Rule = make_dataclass(
    "Rule",
    [
        (o.name, _ANNOTATIONS[o.kind], field(default=_WITH_DEFAULT[o.name]))
        if o.name in _WITH_DEFAULT
        else (o.name, _ANNOTATIONS[o.kind])
        for o in RULE_OPTIONS
    ],
    frozen=True,
    namespace={"from_group": classmethod(_from_group), "__doc__": _DOC},
)
Rule.__module__ = __name__
