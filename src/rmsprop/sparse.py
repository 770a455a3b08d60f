r"""Sparse gradients (``nn.Embedding(sparse=True)``, any torch sparse layout), before dispatch.

A sparse gradient never reaches a backend as such; :func:`rmsprop.functional.prepare` turns it
into dense work first, in one of two ways chosen by the group's ``lazy_sparse``:

- ``lazy_sparse=False`` (default): the gradient is replaced by its dense equivalent
  ``grad.to_dense()`` (duplicates summed) for the step, so the result is, bit for bit, what that
  dense gradient gives on the same backend, for every option: no silent change of algorithm.
  (torch's RMSprop refuses sparse gradients.) This costs what a dense gradient costs: every row
  is read and written.
- ``lazy_sparse=True``: TensorFlow's lazy rows. The gradient is coalesced (duplicate indices
  summed, as TF's optimizers do before ``SparseApplyRMSProp``), the rows it names are gathered
  from the parameter and each state tensor into dense temporaries, the step runs on those rows
  with the group's backend and rule, and the rows are written back. For a row :math:`r` present
  with gradient row :math:`g_r`, everything is the dense update of that row:

  .. math::
      v_r \leftarrow \alpha v_r + (1-\alpha) g_r^2,\quad
      m_r \leftarrow \alpha m_r + (1-\alpha) g_r \text{ (centered)},\quad
      b_r \leftarrow \mu b_r + \eta\, g_r / d_r \text{ (lr\_in\_momentum)},\quad
      \theta_r \leftarrow \theta_r - b_r

  (with TF's options — ``eps_in_sqrt``, ``lr_in_momentum``, :math:`d_r = \sqrt{v_r - m_r^2 + \epsilon}`
  — exactly TF's ``SparseApplyRMSProp`` / ``SparseApplyCenteredRMSProp``); rows absent from the
  gradient keep parameter, averages and momentum buffer exactly: they neither decay nor coast.
  Weight decay (coupled or decoupled) acts on the rows present only, as TF Addons' decoupled
  decay does for sparse updates. ``bias_correction`` (whose per-step factor has no meaning for a
  row that skipped steps) and ``differentiable`` are refused with ``lazy_sparse`` by the option
  table. The step counter counts the parameter's steps, as for a dense gradient.

Both run on any device through torch ops, and on the fused CPU kernel where the group uses it
(the lazy rows are dense temporaries, so the kernel steps them like any tensor). Everything is
validated before anything is written: a sparse gradient must have its parameter's shape, dtype
and device and indices inside it (an uncoalesced one is fine). The gradient tensor itself is
only read: under ``GradScaler`` the step unscales its dense copy, not ``p.grad``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SPARSE_LAYOUTS", "check_sparse_grads", "densify", "dense_equivalent", "LazyRows", "gather_rows"]

SPARSE_LAYOUTS = frozenset(
    (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)
)
_COMPRESSED = SPARSE_LAYOUTS - {torch.sparse_coo}


def check_sparse_grads(params: Sequence[Tensor], grads: Sequence[Tensor], indices: Sequence[int]) -> None:
    """Raise (RuntimeError naming the parameter) unless every ``grads[i]`` for i in ``indices`` is
    a sparse tensor its parameter can be stepped with: a supported layout, the parameter's
    shape, dtype and device, and valid indices (torch's own invariant checks). Writes nothing."""
    for i in indices:
        problem = _problem(params[i], grads[i])
        if problem is not None:
            p = params[i]
            raise RuntimeError(
                f"parameter {i} (shape {tuple(p.shape)}, {p.dtype} on {p.device}): its sparse gradient "
                f"{problem}; nothing was updated"
            )


def _problem(p: Tensor, g: Tensor) -> str | None:
    if g.layout not in SPARSE_LAYOUTS:
        return f"has layout {g.layout}, which RMSprop does not take (strided or torch's sparse layouts)"
    if g.shape != p.shape:
        return f"has shape {tuple(g.shape)}"
    if g.dtype != p.dtype:
        return f"has dtype {g.dtype}"
    if g.device != p.device:
        return f"is on {g.device}"
    try:  # torch's own invariant checks (off by default when a sparse tensor is built)
        if g.layout is torch.sparse_coo:
            torch._validate_sparse_coo_tensor_args(g._indices(), g._values(), g.shape)
        else:
            compressed, plain = _compressed_indices(g)
            torch._validate_sparse_compressed_tensor_args(compressed, plain, g.values(), g.shape, g.layout)
    except (RuntimeError, ValueError, IndexError) as exc:
        return f"is malformed ({exc})"
    return None


def _compressed_indices(g: Tensor) -> tuple[Tensor, Tensor]:
    if g.layout in (torch.sparse_csr, torch.sparse_bsr):
        return g.crow_indices(), g.col_indices()
    return g.ccol_indices(), g.row_indices()


def densify(grads: Sequence[Tensor], indices: Sequence[int]) -> list[Tensor]:
    """A copy of the list with each sparse gradient at ``indices`` replaced by its dense
    equivalent, ``to_dense()``."""
    out = list(grads)
    for i in indices:
        out[i] = dense_equivalent(grads[i])
    return out


def dense_equivalent(grad: Tensor) -> Tensor:
    """``grad.to_dense()``, bit for bit on the CPU. A COO gradient is scattered with
    ``index_put_(accumulate=True)``, which sums duplicate indices in the order to_dense does
    (entry by entry) but without to_dense's parallel section, which costs milliseconds on a
    busy machine even for a few rows. (On CUDA both sum duplicates with atomics, in no fixed
    order.)"""
    if grad.layout is not torch.sparse_coo:
        return grad.to_dense()
    dense = torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device)
    return dense.index_put_(tuple(grad._indices()), grad._values(), accumulate=True)


@dataclass
class LazyRows:
    """The rows one sparse gradient touches, gathered from its parameter and state.

    ``where`` indexes the parameter (a tuple of index tensors, one per sparse dimension);
    ``targets`` are the parameter and its state tensors, ``rows`` the dense temporaries the step
    updates in place, in the same order; :meth:`write_back` puts the rows back."""

    where: tuple[Tensor, ...]
    targets: list[Tensor]
    rows: list[Tensor]

    def write_back(self) -> None:
        # Coalesced indices are unique, so index_put_ writes each row exactly once; it is an
        # in-place op, so each target's version counter moves as autograd expects.
        with torch.no_grad():
            for target, row in zip(self.targets, self.rows, strict=True):
                target.index_put_(self.where, row)


def gather_rows(grad: Tensor, param: Tensor, state: Sequence[Tensor]) -> tuple[Tensor, LazyRows]:
    """The coalesced gradient's values (one dense row per index, duplicates summed) and the
    matching rows of ``param`` and each tensor of ``state``."""
    if grad.layout in _COMPRESSED:
        grad = grad.to_sparse_coo()
    with torch.no_grad():
        grad = grad.coalesce()
        where = tuple(grad._indices())
        targets = [param, *state]
        rows = [t[where] for t in targets]  # advanced indexing: copies, in any layout
    return grad._values().contiguous(), LazyRows(where, targets, rows)
