"""Shared test helpers: fixed parameters and gradient sequences, and an N-step runner."""

from __future__ import annotations

import copy
import os
import signal
from collections.abc import Callable, Sequence

import numpy as np
import torch
from cases import BACKENDS  # noqa: F401  (re-exported: the tests' one table of backends)

SHAPES: tuple[tuple[int, ...], ...] = ((3, 4), (5,), (2, 3, 2), (1,))


def _cpu_flags() -> str:
    return open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""


# Each level the fused kernel has code for, where this CPU runs it (the portable code runs
# anywhere); the `isa` fixture (conftest) runs a test at each.
ISA_LEVELS = ["portable", "avx2+f16c", "avx512"]
ISA_PRESENT = {"portable": True, "avx2+f16c": " avx2" in _cpu_flags() and " f16c" in _cpu_flags(),
               "avx512": " avx512f" in _cpu_flags()}  # fmt: skip


def sigint_as_a_terminal_has_it() -> None:
    """preexec_fn for a child that a test interrupts with SIGINT: the default disposition. A suite
    started as a background job of a script (`cmd &`, nohup) inherits SIGINT ignored, and a Python
    started so installs no KeyboardInterrupt handler: the test would then see Ctrl-C do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def make_params(
    dtype: torch.dtype = torch.float32, shapes: Sequence[tuple[int, ...]] = SHAPES, seed: int = 0
):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]


def make_grads(params, steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    """One list of gradients per step; each step's gradients differ in scale, to exercise the EMA."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        scale = 1.0 + 0.5 * np.sin(t)
        out.append([scale * torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params])
    return out


def run(
    make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    params: list[torch.Tensor],
    grads: list[list[torch.Tensor]],
    lrs: Sequence[float] | None = None,
) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    """Run one optimizer over the gradient sequence on copies of ``params``."""
    params = [p.detach().clone().requires_grad_() for p in params]
    opt = make_optimizer(params)
    for t, step_grads in enumerate(grads):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[t]
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
    return params, opt


def assert_states_equal(a: torch.optim.Optimizer, b: torch.optim.Optimizer, params_a, params_b) -> None:
    """Bit-identical per-parameter state (same keys, same values)."""
    for pa, pb in zip(params_a, params_b, strict=True):
        sa, sb = a.state[pa], b.state[pb]
        assert set(sa) == set(sb), (set(sa), set(sb))
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


def to_real_numpy(t: torch.Tensor) -> np.ndarray:
    """float64 NumPy view, complex tensors as (real, imag) pairs as torch updates them."""
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.to(torch.float64).numpy()


def clone_params(params):
    return [copy.deepcopy(p) for p in params]


def spy_kernel(monkeypatch) -> list[int]:
    """Record, for every native step that ran, how many tensors the kernel stepped."""
    from rmsprop.backends.fused_cpu import kernel, native

    calls: list[int] = []
    original = kernel._Call.invoke

    def invoke(self, columns, grad_column, n, mode, records, status):
        excluded = sum(1 for s in status if s)
        rc = original(self, columns, grad_column, n, mode, records, status)
        if mode & 0xFF == native.MODE_RUN and rc == native.OK:
            calls.append(n - excluded)
        return rc

    monkeypatch.setattr(kernel._Call, "invoke", invoke)
    return calls
