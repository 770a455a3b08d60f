"""Functional RMSProp: the one seam where a backend is chosen.

:class:`rmsprop.RMSprop` gathers lists of tensors and calls :func:`rmsprop`; backends plug in
here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor
from torch.optim.optimizer import _default_to_fused_or_foreach

from .backends.foreach import rmsprop_foreach
from .backends.single import rmsprop_single
from .rule import Rule

__all__ = ["rmsprop", "choose_backend"]

Backend = Callable[..., None]


def choose_backend(
    params: list[Tensor], *, foreach: bool | None, fused: bool | None, differentiable: bool
) -> Backend:
    """The backend for these tensors: what the user forced, else what torch would pick."""
    if fused:
        raise NotImplementedError(
            "fused=True: the fused RMSprop kernel is not available in this version; "
            "use fused=None or fused=False (foreach / per-tensor paths)"
        )
    if foreach is None:
        _, foreach = _default_to_fused_or_foreach(params, differentiable, use_fused=False)
    return rmsprop_foreach if foreach else rmsprop_single


def rmsprop(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffers: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    rule: Rule,
    foreach: bool | None = None,
    fused: bool | None = None,
    differentiable: bool = False,
    capturable: bool = False,
    has_complex: bool = False,
) -> None:
    r"""Apply one RMSProp step (see :class:`rmsprop.rule.Rule` for the formula) in place.

    ``grad_avgs`` is empty unless ``rule.centered``; ``momentum_buffers`` is empty unless
    ``rule.momentum > 0``; ``steps`` are the per-parameter step counters (tensors), incremented.
    """
    backend = choose_backend(params, foreach=foreach, fused=fused, differentiable=differentiable)
    backend(
        params,
        grads,
        square_avgs,
        grad_avgs,
        momentum_buffers,
        steps,
        lr=lr,
        rule=rule,
        differentiable=differentiable,
        capturable=capturable,
        has_complex=has_complex,
    )
