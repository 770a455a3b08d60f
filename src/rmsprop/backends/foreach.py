"""Multi-tensor backend: torch._foreach_* ops over all tensors of a (device, dtype) bucket.

With no extension switched on it issues exactly the op sequence of torch.optim.RMSprop's
``_multi_tensor_rmsprop``, so results are bit-identical to torch's ``foreach=True`` path. It has
no Python loop over tensors except where a per-tensor scalar is needed (bias correction).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, _view_as_real

from ..rule import Rule

__all__ = ["rmsprop_foreach"]


def rmsprop_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffers: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    rule: Rule,
    differentiable: bool = False,
    capturable: bool = False,
    has_complex: bool = False,
) -> None:
    """Update every tensor in place; ``grad_avgs`` / ``momentum_buffers`` are empty when unused."""
    if not params:
        return
    if differentiable:
        raise ValueError("foreach=True does not support differentiable=True; use foreach=False")
    if isinstance(lr, Tensor) and lr.dim() != 0:
        lr = lr.squeeze()

    alpha, eps, momentum, weight_decay = rule.alpha, rule.eps, rule.momentum, rule.weight_decay
    buckets = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, square_avgs, grad_avgs, momentum_buffers, steps]  # type: ignore[list-item]
    )
    for (b_params, b_grads, b_square, b_grad_avgs, b_bufs, b_steps), _ in buckets.values():
        b_params = cast(list[Tensor], b_params)
        b_grads = cast(list[Tensor], b_grads)
        b_square = cast(list[Tensor], b_square)
        b_grad_avgs = cast(list[Tensor], b_grad_avgs)
        b_bufs = cast(list[Tensor], b_bufs)
        b_steps = cast(list[Tensor], b_steps)

        if has_complex:
            extra = [b_grads, b_square]
            if momentum > 0:
                extra.append(b_bufs)
            if rule.centered:
                extra.append(b_grad_avgs)
            _view_as_real(b_params, *extra)

        if rule.maximize:
            b_grads = torch._foreach_neg(b_grads)

        # A CPU step counter would make foreach fall back to a per-tensor loop that wraps the
        # Python 1 in a new tensor each time; one wrapped tensor for all is what torch does.
        if not torch.compiler.is_compiling() and b_steps[0].is_cpu:
            torch._foreach_add_(b_steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
        else:
            torch._foreach_add_(b_steps, 1)

        if weight_decay != 0:
            if rule.decoupled_weight_decay:
                torch._foreach_mul_(b_params, 1 - lr * weight_decay)
            elif rule.maximize:  # b_grads is already a fresh list we may overwrite
                torch._foreach_add_(b_grads, b_params, alpha=weight_decay)
            else:
                b_grads = torch._foreach_add(b_grads, b_params, alpha=weight_decay)

        torch._foreach_mul_(b_square, alpha)
        torch._foreach_addcmul_(b_square, b_grads, b_grads, value=1 - alpha)

        v, m = b_square, b_grad_avgs
        if rule.bias_correction:
            if capturable or torch.compiler.is_compiling():  # no .item(): see bias_correction_factor
                corrections = torch._foreach_pow(alpha, b_steps)
                torch._foreach_neg_(corrections)
                torch._foreach_add_(corrections, 1)
            else:
                corrections = [1 - alpha ** s.item() for s in b_steps]
            v = torch._foreach_div(b_square, corrections)

        if rule.centered:
            torch._foreach_lerp_(b_grad_avgs, b_grads, 1 - alpha)
            if rule.bias_correction:
                m = torch._foreach_div(b_grad_avgs, corrections)
            avg = torch._foreach_addcmul(v, m, m, value=-1)
            # Rounding can make v - m^2 slightly negative; clamping keeps sqrt finite and
            # leaves every non-negative value, hence torch's results, unchanged.
            torch._foreach_clamp_min_(avg, 0)
            if rule.eps_in_sqrt:
                torch._foreach_add_(avg, eps)
                torch._foreach_sqrt_(avg)
            else:
                torch._foreach_sqrt_(avg)
                torch._foreach_add_(avg, eps)
        elif rule.eps_in_sqrt:
            avg = torch._foreach_add(v, eps)
            torch._foreach_sqrt_(avg)
        else:
            avg = torch._foreach_sqrt(v)
            torch._foreach_add_(avg, eps)

        # With a tensor lr and capturable, a Scalar argument would call .item() and silently
        # bake the value into a captured graph, so the lr is applied as a tensor multiply.
        tensor_lr = capturable and isinstance(lr, Tensor)
        if momentum > 0:
            torch._foreach_mul_(b_bufs, momentum)
            if rule.lr_in_momentum:
                if tensor_lr:
                    torch._foreach_add_(b_bufs, torch._foreach_mul(torch._foreach_div(b_grads, avg), lr))
                else:
                    torch._foreach_addcdiv_(b_bufs, b_grads, avg, value=lr)
            else:
                torch._foreach_addcdiv_(b_bufs, b_grads, avg)

            if rule.nesterov:
                applied = torch._foreach_div(b_grads, avg)
                if rule.lr_in_momentum:
                    torch._foreach_mul_(applied, lr)
                    torch._foreach_add_(applied, b_bufs, alpha=momentum)
                    torch._foreach_sub_(b_params, applied)
                else:
                    torch._foreach_add_(applied, b_bufs, alpha=momentum)
                    _add_scaled(b_params, applied, lr, tensor_lr)
            elif rule.lr_in_momentum:
                torch._foreach_sub_(b_params, b_bufs)
            else:
                _add_scaled(b_params, b_bufs, lr, tensor_lr)
        elif tensor_lr:
            torch._foreach_div_(avg, -lr)
            torch._foreach_addcdiv_(b_params, b_grads, avg)
        else:
            torch._foreach_addcdiv_(b_params, b_grads, avg, value=-lr)


def _add_scaled(params: list[Tensor], updates: list[Tensor], lr: float | Tensor, tensor_lr: bool) -> None:
    """params -= lr * updates, in the form torch uses for a Scalar or a captured tensor lr."""
    if tensor_lr:
        torch._foreach_add_(params, torch._foreach_mul(updates, -lr))
    else:
        torch._foreach_add_(params, updates, alpha=-lr)
