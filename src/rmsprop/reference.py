"""The float64 NumPy oracle: every RMSProp variant, straight from the formulas, slow and obvious.

Every backend is tested against this module. It deliberately shares no code with the backends:
it reads the formulas of :class:`rmsprop.rule.Rule` and nothing else.

Complex parameters are handled as torch handles them: the real and imaginary parts are two
independent real parameters (torch applies ``view_as_real`` before the update), so pass
``np.stack([z.real, z.imag], -1)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["ReferenceRMSprop", "run_reference", "LazyRowsReference"]


@dataclass
class ReferenceRMSprop:
    """One parameter under RMSProp, in float64. Call :meth:`step` with each gradient."""

    param: np.ndarray
    lr: float = 1e-2
    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    centered: bool = False
    maximize: bool = False
    eps_in_sqrt: bool = False
    nesterov: bool = False
    decoupled_weight_decay: bool = False
    lr_in_momentum: bool = False
    initial_square_avg: float = 0.0
    bias_correction: bool = False
    step_count: int = 0
    square_avg: np.ndarray = field(init=False)
    grad_avg: np.ndarray = field(init=False)
    momentum_buffer: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.param = np.array(self.param, dtype=np.float64)
        self.square_avg = np.full_like(self.param, self.initial_square_avg)
        self.grad_avg = np.zeros_like(self.param)
        self.momentum_buffer = np.zeros_like(self.param)

    def step(self, grad: np.ndarray, lr: float | None = None) -> np.ndarray:
        """Apply one update with gradient ``grad`` (and optionally a new lr); return the param."""
        lr = self.lr if lr is None else float(lr)
        a, mu = self.alpha, self.momentum
        g = np.array(grad, dtype=np.float64)
        if self.maximize:
            g = -g
        self.step_count += 1
        t = self.step_count

        if self.weight_decay != 0:
            if self.decoupled_weight_decay:
                self.param = self.param * (1.0 - lr * self.weight_decay)
            else:
                g = g + self.weight_decay * self.param

        self.square_avg = a * self.square_avg + (1.0 - a) * g * g
        correction = (1.0 - a**t) if self.bias_correction else 1.0
        v_hat = self.square_avg / correction
        if self.centered:
            self.grad_avg = a * self.grad_avg + (1.0 - a) * g
            m_hat = self.grad_avg / correction
            s = np.maximum(v_hat - m_hat * m_hat, 0.0)
        else:
            s = v_hat
        denom = np.sqrt(s + self.eps) if self.eps_in_sqrt else np.sqrt(s) + self.eps
        u = g / denom

        if mu > 0:
            scale = lr if self.lr_in_momentum else 1.0
            self.momentum_buffer = mu * self.momentum_buffer + scale * u
            applied = scale * u + mu * self.momentum_buffer if self.nesterov else self.momentum_buffer
            self.param = self.param - (applied if self.lr_in_momentum else lr * applied)
        else:
            self.param = self.param - lr * u
        return self.param

    def state(self) -> dict[str, np.ndarray]:
        """The state in torch's key names (only the keys the options create)."""
        out = {"square_avg": self.square_avg}
        if self.momentum > 0:
            out["momentum_buffer"] = self.momentum_buffer
        if self.centered:
            out["grad_avg"] = self.grad_avg
        return out


def run_reference(
    param: np.ndarray,
    grads: Iterable[np.ndarray],
    lrs: Sequence[float] | None = None,
    **options: float | bool,
) -> ReferenceRMSprop:
    """Run the reference over a gradient sequence; ``lrs`` gives a per-step lr (a schedule)."""
    ref = ReferenceRMSprop(param, **options)
    for i, g in enumerate(grads):
        ref.step(g, None if lrs is None else lrs[i])
    return ref


@dataclass
class LazyRowsReference:
    """TensorFlow's lazy rows in float64: one :class:`ReferenceRMSprop` per row of ``param`` (its
    first dimension), stepped only on the steps whose sparse gradient names the row, with the
    sum of that step's values for it (duplicates summed). A row never named keeps its value
    and its state; the options are those of :class:`ReferenceRMSprop` (``bias_correction``
    excluded: its per-step factor has no meaning for a row that skips steps)."""

    param: np.ndarray
    options: dict = field(default_factory=dict)
    rows: list[ReferenceRMSprop] = field(init=False)

    def __post_init__(self) -> None:
        if self.options.get("bias_correction"):
            raise ValueError("lazy rows have no bias correction")
        self.rows = [ReferenceRMSprop(row, **self.options) for row in np.array(self.param, dtype=np.float64)]

    def step(self, indices: np.ndarray, values: np.ndarray, lr: float | None = None) -> np.ndarray:
        """One sparse gradient: ``values[k]`` is the gradient of row ``indices[k]``."""
        for r in np.unique(indices):
            self.rows[r].step(values[indices == r].sum(axis=0), lr)
        return self.value()

    def value(self) -> np.ndarray:
        return np.stack([row.param for row in self.rows])

    def state(self) -> dict[str, np.ndarray]:
        return {key: np.stack([row.state()[key] for row in self.rows]) for key in self.rows[0].state()}
