r"""Low-bit state with torch ops, on any device: the torch-op path for ``state_dtype`` formats.

One tensor at a time, in chunks of whole blocks (so the temporaries stay bounded whatever the
tensor's size): load the parameter, gradient and state as float32 (float64 for float64
parameters), update, store — the parameter rounded to its dtype, the state in its format (see
:mod:`rmsprop.lowbit`: nearest for float state of another dtype, stochastic for bfloat16, the
int8 maps with per-block scales). The operations are the fused kernel's, in its order, each
correctly rounded, and the random bits are the same counter-based hash: on the CPU this path
and the kernel give the same bits.

No host synchronisation where it matters: with ``capturable=True`` or under ``torch.compile``
the per-step scalars (bias correction, the variance weight, the random keys) are computed from
the step counters as tensors on their device. Otherwise they are Python numbers from the CPU
counters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import lowbit
from ..rule import Rule

__all__ = ["rmsprop_lowbit"]


@dataclass
class _Scalars:
    """What one record's step needs besides the tensors: 1/C_t, 1/C_{t-1} (0 at t = 1, where
    the mean is 0 anyway), the variance weight alpha(1-alpha)C_{t-1}/C_t, the random keys."""

    inv_corr: Any
    inv_prev: Any
    k_var: Any
    key0: Any
    key1: Any


def _scalars(step: Tensor, rule: Rule, position: int, on_device: bool) -> _Scalars:
    a = rule.alpha
    if on_device:
        t = step.to(torch.float64)
        if rule.bias_correction:
            c = 1 - torch.pow(a, t)
            c_prev = 1 - torch.pow(a, t - 1)
            inv_corr = 1 / c
            inv_prev = torch.where(c_prev > 0, 1 / c_prev.clamp_min(1e-300), 0.0)
            k_var = a * (1 - a) * c_prev / c
        else:
            inv_corr, inv_prev, k_var = 1.0, 1.0, a * (1 - a)
        t_int = step.to(torch.int64)
        return _Scalars(inv_corr, inv_prev, k_var, lowbit.stream_key(t_int, position, 0),
                        lowbit.stream_key(t_int, position, 1))  # fmt: skip
    t = step.item()
    if rule.bias_correction:
        c, c_prev = 1 - a**t, 1 - a ** (t - 1)
        inv_corr, inv_prev, k_var = 1 / c, (1 / c_prev if c_prev > 0 else 0.0), a * (1 - a) * c_prev / c
    else:
        inv_corr, inv_prev, k_var = 1.0, 1.0, a * (1 - a)
    return _Scalars(inv_corr, inv_prev, k_var, lowbit.stream_key(int(t), position, 0),
                    lowbit.stream_key(int(t), position, 1))  # fmt: skip


def _sqrt(x: Tensor) -> Tensor:
    """The correctly rounded square root, as C's sqrtf. torch's float32 sqrt on the CPU is not
    (measured with AVX512: about 0.7% of results one ulp off); through float64 it is (the
    float64 root of a float32 value is never close enough to a float32 rounding boundary for
    the second rounding to matter), so this path and the fused kernel give the same bits."""
    if x.dtype == torch.float32 and x.is_cpu:
        return x.double().sqrt().float()
    return x.sqrt()


class _Flat:
    """A tensor's elements in row-major order as a 1-D view; a non-contiguous tensor is copied
    and written back by :meth:`commit`."""

    def __init__(self, t: Tensor) -> None:
        self.tensor = t
        self.work = t if t.is_contiguous() else t.contiguous()
        self.flat = self.work.view(-1)

    def commit(self) -> None:
        if self.work is not self.tensor:
            self.tensor.copy_(self.work)


class _Buffer:
    """One state buffer of one record: load a chunk as the math dtype, store it in its format."""

    def __init__(self, t: Tensor | None, scales: Tensor | None, fmt: str, signed: bool, math_dtype) -> None:
        self.fmt, self.signed, self.math_dtype = fmt, signed, math_dtype
        self.scales = scales
        self.flat = None if t is None else (_Flat(t) if t.dtype != torch.uint8 else None)
        self.codes = t.view(-1) if t is not None and t.dtype == torch.uint8 else None

    def load(self, start: int, end: int) -> Tensor:
        if self.codes is not None:
            b0, b1 = start // lowbit.BLOCK, lowbit.n_blocks(end)
            return lowbit.dequantize(self.codes[start:end], self.scales[b0:b1], self.signed).to(self.math_dtype)
        return self.flat.flat[start:end].to(self.math_dtype)

    def store(self, start: int, end: int, value: Tensor, r: Tensor | None) -> None:
        if self.codes is not None:
            codes, scales = lowbit.quantize(value.to(torch.float32), self.signed, r)
            self.codes[start:end].copy_(codes)
            self.scales[start // lowbit.BLOCK : lowbit.n_blocks(end)].copy_(scales)
        elif self.fmt == "bf16":
            self.flat.flat[start:end].copy_(lowbit.round_bf16(value.to(torch.float32), r))
        else:
            self.flat.flat[start:end].copy_(value)

    def commit(self) -> None:
        if self.flat is not None:
            self.flat.commit()


def rmsprop_lowbit(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffers: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    rule: Rule,
    formats: list[str],
    scales: tuple[list, list, list],
    positions: list[int],
    capturable: bool = False,
    differentiable: bool = False,
    has_complex: bool = False,
) -> None:
    """Update every record in place. ``formats[i]``: the record's state format (see
    :mod:`rmsprop.lowbit`; "float", "bf16" or "int8" — "same" records take torch's paths);
    ``scales``: the per-block scales of the int8 buffers (square_avg / grad_var, grad_avg,
    momentum_buffer), None elsewhere; ``positions``: each record's index in the group (its
    random stream). Inputs are validated by :func:`rmsprop.functional.prepare`."""
    del differentiable, has_complex  # refused / impossible with a state_dtype
    if isinstance(lr, Tensor) and lr.dim() != 0:
        lr = lr.squeeze()
    on_device = capturable or torch.compiler.is_compiling()
    a, mu, wd = rule.alpha, rule.momentum, rule.weight_decay
    oma = 1.0 - a
    k_buf = lr if rule.lr_in_momentum else 1.0
    k_par = 1.0 if rule.lr_in_momentum else lr
    decay = 1 - lr * wd if (rule.decoupled_weight_decay and wd != 0) else None
    for i, param in enumerate(params):
        fmt = formats[i]
        step = steps[i]
        step += 1
        sc = _scalars(step, rule, positions[i], on_device)
        math_dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        variance = lowbit.variance_form(fmt, rule.centered)
        p = _Flat(param)
        g = grads[i].reshape(-1)
        v = _Buffer(square_avgs[i], scales[0][i] if scales[0] else None, fmt, False, math_dtype)
        m = _Buffer(grad_avgs[i], scales[1][i] if scales[1] else None, fmt, True, math_dtype) if rule.centered else None
        b = _Buffer(momentum_buffers[i], scales[2][i] if scales[2] else None, fmt, True, math_dtype) if mu > 0 else None
        random = fmt in ("bf16", "int8")
        n = p.flat.numel()
        for start in range(0, n, lowbit.CHUNK):
            end = min(n, start + lowbit.CHUNK)
            pc = p.flat[start:end].to(math_dtype)
            gc = g[start:end].to(math_dtype)
            if rule.maximize:
                gc = -gc
            if wd != 0 and not rule.decoupled_weight_decay:
                gc = gc + wd * pc
            if decay is not None:
                pc = pc * decay
            vc = v.load(start, end)
            mc = m.load(start, end) if m is not None else None
            if variance:  # the variance itself, updated without cancellation (see rmsprop.lowbit)
                dlt = gc - mc * sc.inv_prev
                vc = a * vc + sc.k_var * dlt * dlt
                mc = mc + oma * (gc - mc)
                s = vc * sc.inv_corr
            else:
                vc = a * vc + oma * gc * gc
                s = vc * sc.inv_corr
                if mc is not None:
                    mc = mc + oma * (gc - mc)
                    mh = mc * sc.inv_corr
                    s = (s - mh * mh).clamp_min(0)
            d = _sqrt(s + rule.eps) if rule.eps_in_sqrt else _sqrt(s) + rule.eps
            u = gc / d
            if b is not None:
                bc = mu * b.load(start, end) + k_buf * u
                applied = k_buf * u + mu * bc if rule.nesterov else bc
                pc = pc - k_par * applied
            else:
                pc = pc - lr * u
            h0 = lowbit.random_bits(start, end - start, sc.key0, pc.device) if random else None
            v.store(start, end, vc, h0 >> 16 if random else None)
            if m is not None:
                m.store(start, end, mc, h0 & 0xFFFF if random else None)
            if b is not None:
                h1 = lowbit.random_bits(start, end - start, sc.key1, pc.device) if random else None
                b.store(start, end, bc, h1 >> 16 if random else None)
            p.flat[start:end].copy_(pc)
        p.commit()
        for buf in (v, m, b):
            if buf is not None:
                buf.commit()
