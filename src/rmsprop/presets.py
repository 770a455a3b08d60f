"""Presets: each framework's flavour of RMSProp as data, with the peer it matches.

A preset is a set of :class:`rmsprop.RMSprop` arguments plus the numbered list of the ways it
still differs from its peer. ``from_preset(name, params, **overrides)`` builds the optimizer;
overrides use this library's argument names (``alpha``, not ``rho`` or ``decay``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch.optim.optimizer import ParamsT

from .optimizer import RMSprop

__all__ = ["Preset", "PRESETS", "from_preset"]


@dataclass(frozen=True)
class Preset:
    """A named RMSProp configuration and the framework optimizer it reproduces."""

    name: str
    peer: str
    options: Mapping[str, Any]
    # How the peer's own argument names map onto ours, for the docs and the parity tests.
    peer_names: Mapping[str, str] = field(default_factory=dict)
    deviations: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        object.__setattr__(self, "peer_names", MappingProxyType(dict(self.peer_names)))


_TF_EMA_ROUNDING = (
    "{peer} updates the average as v + (1 - rho) * (g^2 - v); this library as "
    "rho * v + (1 - rho) * g^2. The two are equal in exact arithmetic and differ in the last bits."
)
_CLAMP = (
    "Centered: v - m^2 is clamped at 0 before eps is added; {peer} does not clamp, which matters "
    "only where rounding makes v - m^2 negative (there {peer} can produce NaN)."
)

PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        p.name: p
        for p in [
            Preset(
                name="torch",
                peer="torch.optim.RMSprop",
                options={"lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "fused": False},
                deviations=(
                    "None: bit-identical, including the state dict, because the preset keeps "
                    "torch's op paths (fused=False; pass fused=None for the fused CPU kernel, "
                    "equal up to float rounding). Centered RMSprop clamps the variance at 0 where "
                    "torch would take the root of a negative rounding error and return NaN.",
                ),
            ),
            Preset(
                name="tensorflow",
                peer="tf.compat.v1.train.RMSPropOptimizer (ApplyRMSProp / ApplyCenteredRMSProp ops)",
                options={
                    "lr": 1e-3,
                    "alpha": 0.9,
                    "eps": 1e-10,
                    "eps_in_sqrt": True,
                    "initial_square_avg": 1.0,
                    "lr_in_momentum": True,
                },
                peer_names={"learning_rate": "lr", "decay": "alpha", "epsilon": "eps"},
                deviations=(
                    "TF1 has no default learning rate (it is required); the preset uses 1e-3, "
                    "the tf.keras default.",
                    "TF1's optimizer has no weight decay: an L2 term in the loss is what "
                    "weight_decay (coupled) does here.",
                    "TF1 has no Nesterov option; nesterov=True is this library's extension.",
                    _TF_EMA_ROUNDING.format(peer="TF"),
                    _CLAMP.format(peer="TF"),
                ),
            ),
            Preset(
                name="keras",
                peer="keras.optimizers.RMSprop (Keras 3; tf.keras 2 uses the same formula)",
                options={
                    "lr": 1e-3,
                    "alpha": 0.9,
                    "eps": 1e-7,
                    "eps_in_sqrt": True,
                    "lr_in_momentum": True,
                    "decoupled_weight_decay": True,
                },
                peer_names={"learning_rate": "lr", "rho": "alpha", "epsilon": "eps"},
                deviations=(
                    "Keras keeps lr in a float32 variable: with float64 parameters it sees lr "
                    "rounded to float32. Its torch backend also computes the decay factor "
                    "1 - wd * lr in float32 (the TF/JAX backends use p - p * wd * lr); this "
                    "library computes p * (1 - lr * wd) in double precision.",
                    "Keras has no Nesterov option; nesterov=True is this library's extension.",
                    "Keras's clipnorm / clipvalue / use_ema / gradient accumulation are not "
                    "optimizer options here: use torch.nn.utils.clip_grad_norm_ and "
                    "torch.optim.swa_utils.",
                    _CLAMP.format(peer="Keras"),
                ),
            ),
            Preset(
                name="optax",
                peer="optax.rmsprop",
                options={
                    "lr": 1e-3,
                    "alpha": 0.9,
                    "eps": 1e-8,
                    "eps_in_sqrt": True,
                    "lr_in_momentum": True,
                    "initial_square_avg": 0.0,
                    "bias_correction": False,
                },
                peer_names={
                    "learning_rate": "lr",
                    "decay": "alpha",
                    "eps": "eps",
                    "initial_scale": "initial_square_avg",
                    "eps_in_sqrt": "eps_in_sqrt",
                    "centered": "centered",
                    "momentum": "momentum",
                    "nesterov": "nesterov",
                    "bias_correction": "bias_correction",
                },
                deviations=(
                    "optax.rmsprop has no default learning rate; the preset uses 1e-3.",
                    "optax's momentum=None (no momentum) is momentum=0 here.",
                    "optax.rmsprop has no weight decay; chained before it, "
                    "optax.add_decayed_weights is weight_decay (coupled) here.",
                    _CLAMP.format(peer="optax"),
                ),
            ),
            Preset(
                name="timm",
                peer="timm.optim.RMSpropTF",
                options={
                    "lr": 1e-2,
                    "alpha": 0.9,
                    "eps": 1e-10,
                    "eps_in_sqrt": True,
                    "initial_square_avg": 1.0,
                    "lr_in_momentum": True,
                },
                peer_names={"decoupled_decay": "decoupled_weight_decay", "lr_in_momentum": "lr_in_momentum"},
                deviations=(
                    _TF_EMA_ROUNDING.format(peer="timm"),
                    "timm's caution=True and corrected_weight_decay=True are not supported.",
                    "timm has no Nesterov option; nesterov=True is this library's extension.",
                    _CLAMP.format(peer="timm"),
                ),
            ),
            Preset(
                name="seed",
                peer="the formula of the seed document (Hinton, 2012)",
                options={"lr": 1e-3, "alpha": 0.9, "eps": 1e-8, "eps_in_sqrt": True},
                deviations=("None: theta -= lr * g / sqrt(E[g^2] + eps), E[g^2] starting at 0.",),
            ),
        ]
    }
)


def from_preset(name: str, params: ParamsT, **overrides: Any) -> RMSprop:
    """Build an :class:`RMSprop` configured as preset ``name``, with ``overrides`` on top.

    >>> opt = from_preset("keras", model.parameters(), lr=3e-4, momentum=0.9)  # doctest: +SKIP
    """
    try:
        preset = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
    return RMSprop(params, **{**preset.options, **overrides})
