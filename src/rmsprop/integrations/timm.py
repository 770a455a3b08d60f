"""timm: register :class:`rmsprop.RMSprop` and every preset in timm's optimizer registry.

    >>> from rmsprop.integrations.timm import register_timm
    >>> register_timm()  # doctest: +SKIP
    ['rmspropx', 'rmspropxkeras', 'rmspropxoptax', 'rmspropxseed', 'rmspropxtensorflow', ...]
    >>> import timm.optim
    >>> opt = timm.optim.create_optimizer_v2(model, "rmspropxkeras", lr=1e-3, weight_decay=0.05)  # doctest: +SKIP

With timm's training script: call ``register_timm()`` before it builds the optimizer, then
``--opt rmspropxtimm`` (or ``--opt lookahead_rmspropxtimm``).

Names. timm lower-cases the name it is given, splits it on ``_`` and looks up the last part (a
first part ``lookahead`` wraps the optimizer in Lookahead), so a registered name may not contain
``_``: they are the prefix (default ``rmspropx``) alone for ``RMSprop`` with this library's
defaults, and the prefix followed by the preset's name for each preset (``rmspropxkeras``, ...).

What timm then does, as for its own optimizers (timm's rules, not this library's):

- ``create_optimizer_v2`` passes ``momentum=0.9`` unless told otherwise (timm's default for every
  optimizer with momentum, its own ``rmsproptf`` included): pass ``momentum=0`` for none.
- Given a model, it moves ``weight_decay`` into parameter groups and leaves biases and norm
  weights undecayed (``filter_bias_and_bn=True``).
- ``lr``, ``eps``, ``momentum``, ``weight_decay``, ``foreach`` and any keyword argument override
  the preset's values; the rest of the preset stays.
"""

from __future__ import annotations

import re
from typing import Any

from ..optimizer import RMSprop
from ..presets import PRESETS

__all__ = ["DEFAULT_PREFIX", "register_timm", "timm_names"]

DEFAULT_PREFIX = "rmspropx"
"""The default first part of every registered name: ``rmspropx``, ``rmspropxkeras``, ..."""
_NAME = re.compile(r"[a-z][a-z0-9]*\Z")


def timm_names(prefix: str = DEFAULT_PREFIX) -> dict[str, str | None]:
    """The names :func:`register_timm` registers, each mapped to its preset (None: ``RMSprop``
    with this library's defaults).

    Raises:
        ValueError: ``prefix`` is not lower-case letters and digits starting with a letter (timm
            lower-cases names and splits them on ``_``, so anything else could not be looked up).
    """
    if not _NAME.match(prefix):
        raise ValueError(
            f"prefix {prefix!r} must be lower-case letters and digits, starting with a letter: timm "
            "lower-cases optimizer names and splits them on '_'"
        )
    names: dict[str, str | None] = {prefix: None}
    for preset in PRESETS:
        names[prefix + preset.lower()] = preset
    return names


def register_timm(registry: Any = None, *, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Register ``RMSprop`` and every preset in a timm ``OptimizerRegistry``; return the names.

    Args:
        registry: a ``timm.optim.OptimizerRegistry``; default timm's own (the one
            ``timm.optim.create_optimizer_v2`` and ``timm.optim.list_optimizers`` use).
        prefix: the first part of every name (see :func:`timm_names`).

    Each entry is a timm ``OptimInfo`` whose class is :class:`rmsprop.RMSprop` and whose defaults
    are the preset's options, so ``registry.get_optimizer_class(name)`` gives
    ``functools.partial(RMSprop, **preset_options)``. Registering again is a no-op.

    Raises:
        ValueError: a name is already registered for another optimizer (timm's own ``rmsprop``
            is ``torch.optim.RMSprop``, so the prefix ``"rmsprop"`` is refused), or the prefix
            is not a name timm can parse. Nothing is registered then.
        ImportError: timm is not installed.
    """
    try:
        from timm.optim import OptimInfo
    except ImportError as exc:
        raise ImportError(f"register_timm needs timm (pip install timm): {exc}") from exc
    if registry is None:
        from timm.optim._optim_factory import default_registry as registry

    entries = []
    for name, preset in timm_names(prefix).items():
        if preset is None:
            description, defaults = "rmsprop.RMSprop: torch's RMSprop with every published variant", None
        else:
            description = f"rmsprop.RMSprop, preset {preset!r}: {PRESETS[preset].peer}"
            defaults = dict(PRESETS[preset].options)
        entries.append(
            OptimInfo(
                name=name,
                opt_class=RMSprop,
                description=description,
                has_eps=True,
                has_momentum=True,
                defaults=defaults,
            )
        )
    known = set(registry.list_optimizers())
    for info in entries:
        if info.name in known and registry.get_optimizer_info(info.name).opt_class is not RMSprop:
            raise ValueError(
                f"timm already has an optimizer named {info.name!r}; choose another prefix"
            )
    for info in entries:
        if info.name not in known or registry.get_optimizer_info(info.name) != info:
            registry.register(info)
    return [info.name for info in entries]
