"""Functional RMSProp: the one seam where a backend is chosen.

:class:`rmsprop.RMSprop` gathers lists of tensors and calls :func:`rmsprop`; backends plug in
here and nowhere else.

Choice, per group:
- ``fused=True``: the fused CPU kernel for every tensor, or a RuntimeError saying why not.
- ``fused=None`` with ``foreach=None`` (the default): the fused kernel for the tensors it supports
  (CPU, float32/64, bfloat16, complex; dense), foreach for the rest (float16 too: foreach is
  faster there). If the native library is missing, foreach, with one warning naming the cause.
- ``fused=False`` or an explicit ``foreach``: the torch-op paths, bit-identical to torch
  (``foreach=True``: multi-tensor; ``False``: per-tensor; ``None``: what torch would pick).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim.optimizer import _default_to_fused_or_foreach

from .backends import fused_cpu
from .backends.foreach import rmsprop_foreach
from .backends.single import rmsprop_single
from .rule import Rule

__all__ = ["rmsprop", "StepCache", "fused_refusal"]

Backend = Callable[..., None]
_warned_unavailable = False


def _warn_unavailable_once() -> None:
    global _warned_unavailable
    if not _warned_unavailable:
        _warned_unavailable = True
        warnings.warn(
            f"rmsprop: the fused CPU kernel is unavailable ({fused_cpu.load_error()}); "
            "using the foreach path instead",
            RuntimeWarning,
            stacklevel=4,
        )


def _torch_op_backend(params: list[Tensor], foreach: bool | None, differentiable: bool) -> Backend:
    if foreach is None:
        _, foreach = _default_to_fused_or_foreach(params, differentiable, use_fused=False)
    return rmsprop_foreach if foreach else rmsprop_single


def _run_torch_ops(
    backend: Backend, lists: tuple[list[Tensor], ...], grad_scale, found_inf, **kwargs
) -> None:
    """A torch-op backend with GradScaler's contract: skip on inf, else unscale the grads in place
    by the float32 reciprocal of the scale, exactly as GradScaler.unscale_ does."""
    if found_inf is not None and found_inf.item() != 0:
        return
    params, grads = lists[0], lists[1]
    if grad_scale is not None and grads:
        inv_scale = grad_scale.double().reciprocal().float()
        torch._foreach_mul_(grads, inv_scale.to(grads[0].device))
    if params:
        backend(*lists, **kwargs)


def _local_shards(lists: tuple[list[Tensor], ...]) -> tuple[list[Tensor], ...]:
    """The lists with each DTensor parameter (and its gradient and state) replaced by the local
    shards, when all of them share one mesh and placement: elementwise math on matching shards
    is the math on the whole. Others are left as they are (and go to foreach)."""
    params = lists[0]
    if all(type(p) in (torch.Tensor, torch.nn.Parameter) for p in params):
        return lists
    from torch.distributed.tensor import DTensor

    out = tuple(list(lst) for lst in lists)
    per_param = [lst for lst in out[1:5] if lst]  # grads and state (not the step counters)
    for i, p in enumerate(params):
        if not isinstance(p, DTensor):
            continue
        group = [p] + [lst[i] for lst in per_param]
        if all(
            isinstance(t, DTensor) and t.placements == p.placements and t.device_mesh == p.device_mesh
            for t in group
        ):
            out[0][i] = p.to_local()
            for lst in per_param:
                lst[i] = lst[i].to_local()
    return out


def _split(lists: tuple[list[Tensor], ...], by_default: bool) -> tuple[list[int], list[int]]:
    """Indices of the tensors the fused kernel takes, and of the others."""
    params, grads, square_avgs, grad_avgs, momentum_buffers, _ = lists
    fused, other = [], []
    for i, (p, g, v) in enumerate(zip(params, grads, square_avgs, strict=True)):
        states = [v]
        if grad_avgs:
            states.append(grad_avgs[i])
        if momentum_buffers:
            states.append(momentum_buffers[i])
        (fused if fused_cpu.eligible(p, g, states, by_default=by_default) else other).append(i)
    return fused, other


def fused_refusal(params: list[Tensor], grads: list[Tensor]) -> str | None:
    """Why ``fused=True`` cannot step these parameters, or None; checked before any update.

    State tensors are not needed here: they are created like their parameter, and
    load_state_dict gives loaded ones the parameter's dtype and shape.
    """
    if not fused_cpu.is_available():
        return f"fused=True: the fused CPU kernel is unavailable: {fused_cpu.load_error()}"
    local_params, local_grads = _local_shards((params, grads, [], [], [], []))[:2]
    for p, lp, lg in zip(params, local_params, local_grads, strict=True):
        if not fused_cpu.eligible(lp, lg, []):
            return (
                "fused=True supports dense CPU tensors of dtype float32, float64, bfloat16, float16 "
                "or complex whose gradient and state share the parameter's dtype and layout; got a "
                f"parameter of type {type(p).__name__}, dtype {p.dtype} on {p.device} "
                f"(contiguous: {p.is_contiguous()}). Use fused=None to route such tensors to foreach."
            )
    return None


def _subset(lists: tuple[list[Tensor], ...], indices: list[int]) -> tuple[list[Tensor], ...]:
    return tuple([lst[i] for i in indices] if lst else [] for lst in lists)


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
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> bool:
    r"""Apply one RMSProp step (see :class:`rmsprop.rule.Rule` for the formula) in place.

    ``grad_avgs`` is empty unless ``rule.centered``; ``momentum_buffers`` is empty unless
    ``rule.momentum > 0``; ``steps`` are the per-parameter step counters (tensors), incremented.
    ``grad_scale`` / ``found_inf`` follow torch.amp.GradScaler's contract for optimizers with
    ``_step_supports_amp_scaling``: grads are divided by the scale, and nothing happens (steps
    included) when ``found_inf`` is nonzero. Returns True when the fused kernel did every tensor.
    """
    lists = (params, grads, square_avgs, grad_avgs, momentum_buffers, steps)
    kwargs = {"lr": lr, "rule": rule, "differentiable": differentiable, "capturable": capturable}

    wants_fused = fused is True or (
        fused is None and foreach is None and not differentiable and not capturable
    )
    if wants_fused and not fused_cpu.is_available():
        if fused:
            raise RuntimeError(f"fused=True: the fused CPU kernel is unavailable: {fused_cpu.load_error()}")
        _warn_unavailable_once()
        _run_torch_ops(rmsprop_foreach, lists, grad_scale, found_inf, has_complex=has_complex, **kwargs)
        return False
    if not wants_fused:
        backend = _torch_op_backend(params, foreach, differentiable)
        _run_torch_ops(backend, lists, grad_scale, found_inf, has_complex=has_complex, **kwargs)
        return False

    local = _local_shards(lists)
    fused_indices, other_indices = _split(local, by_default=fused is None)
    if fused and other_indices:  # the optimizer checks this before any group is touched
        i = other_indices[0]
        raise RuntimeError(fused_refusal([params[i]], [grads[i]]) or "fused=True: unsupported state tensors")
    if fused_indices:
        fused_lists = local if not other_indices else _subset(local, fused_indices)
        fused_cpu.rmsprop_fused(*fused_lists, grad_scale=grad_scale, found_inf=found_inf, **kwargs)
    if other_indices:
        rest = _subset(lists, other_indices)
        rest_complex = any(torch.is_complex(p) for p in rest[0])
        # foreach for CPU leftovers too: on CPU it is still faster than a per-tensor loop
        _run_torch_ops(rmsprop_foreach, rest, grad_scale, found_inf, has_complex=rest_complex, **kwargs)
    return not other_indices


def _dispatch_flags(group: dict) -> tuple:
    return (group["foreach"], group["fused"], group["differentiable"], group["capturable"])


class StepCache:
    """Per-optimizer cache of fused-step plans (:class:`fused_cpu.FusedPlan`), one per group.

    Purely a speed-up for groups of many small tensors: a plan re-checks everything it relies on
    each step and declines when anything changed, and the optimizer then takes the general path.
    """

    def __init__(self) -> None:
        self._plans: dict[int, tuple[dict, tuple, fused_cpu.FusedPlan]] = {}

    def clear(self) -> None:
        self._plans.clear()

    def prepare(self, group: dict, state: dict, rule: Rule) -> Callable[..., None] | None:
        """The group's cached fused step, validated now, if it still applies (see
        FusedPlan.prepare); call it with (lr, grad_scale, found_inf)."""
        entry = self._plans.get(id(group))
        if entry is None or entry[0] is not group or entry[1] != _dispatch_flags(group):
            return None
        return entry[2].prepare(group["params"], state, rule)

    def remember(self, group: dict, state: dict, lists: tuple[list[Tensor], ...]) -> None:
        """After a step in which the fused kernel did the whole group, keep a plan for it."""
        params = lists[0]
        self._plans.pop(id(group), None)
        if len(params) != len(group["params"]):
            return  # some parameters had no gradient: their set may change, keep it general
        if any(type(p) not in (torch.Tensor, torch.nn.Parameter) for p in params):
            return  # DTensors and other subclasses: unwrapped afresh each step on the general path
        plan = fused_cpu.FusedPlan.build(*lists, state_dicts=[state[p] for p in params])
        if plan is not None:
            self._plans[id(group)] = (group, _dispatch_flags(group), plan)
