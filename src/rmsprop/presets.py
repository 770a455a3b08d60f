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
    # How the peer's own argument names map onto ours: for the docs, the parity tests, and the
    # peer's checkpoints (complete_state_dict).
    peer_names: Mapping[str, str] = field(default_factory=dict)
    deviations: tuple[str, ...] = ()
    # The peer's options this library does not have, each with the value that turns it off.
    unsupported: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        object.__setattr__(self, "peer_names", MappingProxyType(dict(self.peer_names)))
        object.__setattr__(self, "unsupported", MappingProxyType(dict(self.unsupported)))

    def complete_state_dict(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of the peer's optimizer state dict whose param groups speak this library's
        names and get this preset's options where they lack the key, for
        :meth:`RMSprop.load_state_dict`.

        A peer's checkpoint (SB3's RMSpropTFLike, timm's RMSpropTF) has torch's keys and the
        peer's own, and ``load_state_dict`` completes a group without ``eps_in_sqrt`` or
        ``initial_square_avg`` with torch's values — right for a torch checkpoint, the wrong
        algorithm for the peer's. Values the checkpoint has (its lr, alpha, eps, ...) are kept;
        the peer's names for them are translated through :attr:`peer_names` (timm's
        ``decoupled_decay`` is ``decoupled_weight_decay``). A group that turns on one of the
        peer's :attr:`unsupported` options (timm's ``caution``) raises ValueError: continuing
        it here would be another algorithm. Nothing is modified in ``state_dict``."""
        groups = []
        for i, group in enumerate(state_dict["param_groups"]):
            for key, off in self.unsupported.items():
                if key in group and _differs(group[key], off):
                    raise ValueError(
                        f"param group {i} of the {self.peer} checkpoint has {key}={group[key]!r}, which this "
                        f"library does not support (the {self.name!r} preset continues it only with {key}={off!r})"
                    )
            ours: dict[str, Any] = {}
            for key, value in group.items():
                name = self.peer_names.get(key, key)
                if name != key and name in group and _differs(group[name], value):
                    raise ValueError(
                        f"param group {i} of the {self.peer} checkpoint has {key}={value!r} and {name}={group[name]!r}: "
                        f"two values for one option ({key} is the peer's name for {name})"
                    )
                ours[name] = value
            groups.append({**self.options, **ours})
        return {**state_dict, "param_groups": groups}


def _differs(value: Any, off: Any) -> bool:
    """Whether ``value`` differs from ``off`` (anything that cannot be compared, a tensor of several
    elements, counts as different)."""
    try:
        return bool(value != off)
    except (TypeError, ValueError, RuntimeError):
        return True


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
                unsupported={"caution": False, "corrected_weight_decay": False},
                deviations=(
                    _TF_EMA_ROUNDING.format(peer="timm"),
                    "timm's caution=True and corrected_weight_decay=True are not supported (a timm "
                    "checkpoint with either is refused by complete_state_dict).",
                    "timm has no Nesterov option; nesterov=True is this library's extension.",
                    _CLAMP.format(peer="timm"),
                ),
            ),
            Preset(
                name="sb3",
                peer="stable_baselines3.common.sb2_compat.rmsprop_tf_like.RMSpropTFLike (Stable-Baselines3)",
                options={
                    "lr": 1e-2,
                    "alpha": 0.99,
                    "eps": 1e-8,
                    "eps_in_sqrt": True,
                    "initial_square_avg": 1.0,
                },
                peer_names={
                    "lr": "lr", "alpha": "alpha", "eps": "eps", "weight_decay": "weight_decay",
                    "momentum": "momentum", "centered": "centered",
                },  # fmt: skip
                deviations=(
                    "None without centered: SB3's ops exactly (eps inside the root, square average "
                    "starting at 1, lr outside the momentum buffer, coupled weight decay), so with "
                    "fused=False the parameters are bit-identical to RMSpropTFLike's; the fused "
                    "default rounds once per value. Unlike the tensorflow preset, lr stays outside the "
                    "buffer: the two differ once momentum meets a changing lr.",
                    "Centered: SB3 updates the grad average as m * alpha + (1 - alpha) * g, this "
                    "library as torch does (a lerp): equal in exact arithmetic, different in the last "
                    "bits. " + _CLAMP.format(peer="SB3"),
                    "SB3 keeps the step counter as a Python int, this library as a tensor (as torch); "
                    "every other state key is the same. RMSpropTFLike's state dicts load here through "
                    "PRESETS['sb3'].complete_state_dict(sd): loaded as they are, their groups lack "
                    "eps_in_sqrt and read as torch's algorithm.",
                    "The RL Zoo's A2C configurations pass eps=1e-5 (optimizer_kwargs=dict(eps=1e-5)); "
                    "the preset keeps the class's own default, eps=1e-8. SB3's A2C without "
                    "optimizer_class uses torch.optim.RMSprop(alpha=0.99, eps=1e-5): the torch preset.",
                    "SB3's docstring says eps is added after the root; its code adds it inside, and the "
                    "preset follows the code.",
                ),
            ),
            Preset(
                name="dqn",
                peer="DeepMind's DQN (Mnih et al., Nature 2015): the centered RMSProp of its NeuralQLearner",
                options={
                    "lr": 2.5e-4,
                    "alpha": 0.95,
                    "eps": 0.01,
                    "eps_in_sqrt": True,
                    "centered": True,
                    "momentum": 0.0,
                },
                peer_names={"lr": "lr", "gradient momentum / squared gradient momentum": "alpha",
                            "min squared gradient": "eps", "wc": "weight_decay"},  # fmt: skip
                deviations=(
                    "DQN's update is w <- w + lr * dw / sqrt(g2 - g^2 + 0.01) with dw minus the loss "
                    "gradient; with torch's gradients that is w <- w - lr * grad / sqrt(...), this preset.",
                    "DQN computes g <- 0.95 g + 0.05 dw and g2 - g^2 + 0.01 in that order; this library "
                    "a lerp and (g2 - g^2) + 0.01: equal in exact arithmetic, different in the last bits. "
                    + _CLAMP.format(peer="DQN") + " With 0.01 inside the root that needs a rounding error "
                    "of 0.01: it does not happen.",
                    "DQN can anneal lr linearly (lr_end, lr_endt; Nature's runs kept it constant): a torch "
                    "LR scheduler (LinearLR) does that here.",
                    "DQN's weight cost wc (0 in Nature's runs) is weight_decay (coupled) here. Its TD-error "
                    "clipping to [-1, 1] belongs to the loss (smooth_l1_loss), not to the optimizer.",
                ),
            ),
            Preset(
                name="a3c",
                peer="the shared RMSProp of A3C (Mnih et al., 'Asynchronous Methods for Deep RL', 2016)",
                options={"lr": 7e-4, "alpha": 0.99, "eps": 0.1, "eps_in_sqrt": True},
                peer_names={"eta": "lr", "alpha": "alpha", "epsilon": "eps"},
                deviations=(
                    "The paper's statistics g are shared by every worker: call model.share_memory() and "
                    "optimizer.share_memory() before starting the workers (examples/a3c_cartpole.py). "
                    "Without it each worker keeps its own statistics, the per-thread RMSProp the paper "
                    "found less robust.",
                    "The paper sampled lr log-uniformly in [1e-4, 1e-2] and annealed it linearly to 0; "
                    "7e-4 is the default of common implementations (OpenAI Baselines' A2C, PyTorch A3C "
                    "ports): pass yours, and a scheduler for the annealing.",
                    "The SharedRMSprop widely copied in PyTorch A3C code (rl_a3c_pytorch and its forks) "
                    "uses these hyperparameters with torch's formula, sqrt(g) + 0.1: pass "
                    "eps_in_sqrt=False to reproduce it (bit for bit with fused=False).",
                    "Workers update without a lock, as in the paper (Hogwild): concurrent writes to one "
                    "element keep one of them, the shared step counter included.",
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
