"""Per-tensor backend: one tensor at a time with ordinary torch ops.

Any device, differentiable (``differentiable=True`` keeps autograd history through the update).
With no extension switched on it issues exactly the op sequence of torch.optim.RMSprop's
``_single_tensor_rmsprop``, so results are bit-identical to torch's ``foreach=False`` path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..rule import Rule

__all__ = ["rmsprop_single", "bias_correction_factor"]


def bias_correction_factor(step: Tensor, alpha: float, capturable: bool) -> float | Tensor:
    """1 - alpha**t for the step counter ``step``.

    A tensor when capturable or compiling: ``.item()`` would sync the device, break a captured
    graph, or break torch.compile's graph.
    """
    if capturable or torch.compiler.is_compiling():
        return 1 - torch.pow(alpha, step)
    return 1 - alpha ** step.item()


def rmsprop_single(
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
    del has_complex  # decided per tensor here
    alpha, eps, momentum, weight_decay = rule.alpha, rule.eps, rule.momentum, rule.weight_decay

    for i, param in enumerate(params):
        step = steps[i]
        grad = grads[i]
        grad = grad if not rule.maximize else -grad
        square_avg = square_avgs[i]

        step += 1

        if weight_decay != 0:
            if rule.decoupled_weight_decay:
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)

        is_complex = torch.is_complex(param)
        if is_complex:
            param = torch.view_as_real(param)
            grad = torch.view_as_real(grad)
            square_avg = torch.view_as_real(square_avg)

        square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
        correction = bias_correction_factor(step, alpha, capturable) if rule.bias_correction else None
        v = square_avg if correction is None else square_avg / correction

        if rule.centered:
            grad_avg = grad_avgs[i]
            if is_complex:
                grad_avg = torch.view_as_real(grad_avg)
            grad_avg.lerp_(grad, 1 - alpha)
            m = grad_avg if correction is None else grad_avg / correction
            # v - m^2 >= 0 in exact arithmetic; rounding can push it below 0, and sqrt would
            # then turn finite inputs into NaN. Clamping leaves every non-negative value alone.
            var = v.addcmul(m, m, value=-1)
            var = var.clamp_min(0) if differentiable else var.clamp_min_(0)
            if rule.eps_in_sqrt:
                avg = var.add(eps).sqrt() if differentiable else var.add_(eps).sqrt_()
            else:
                avg = var.sqrt() if differentiable else var.sqrt_()
                avg = avg.add(eps) if differentiable else avg.add_(eps)
        elif rule.eps_in_sqrt:
            avg = v.add(eps).sqrt_()
        else:
            avg = v.sqrt()
            avg = avg.add(eps) if differentiable else avg.add_(eps)

        if momentum > 0:
            buf = momentum_buffers[i]
            if is_complex:
                buf = torch.view_as_real(buf)
            if rule.lr_in_momentum:
                buf.mul_(momentum).addcdiv_(grad, avg, value=lr)
            else:
                buf.mul_(momentum).addcdiv_(grad, avg)
            if rule.nesterov:
                applied = grad / avg
                if rule.lr_in_momentum:
                    param.sub_(applied.mul_(lr).add_(buf, alpha=momentum))
                else:
                    param.add_(applied.add_(buf, alpha=momentum), alpha=-lr)
            elif rule.lr_in_momentum:
                param.sub_(buf)
            else:
                param.add_(buf, alpha=-lr)
        else:
            param.addcdiv_(grad, avg, value=-lr)
