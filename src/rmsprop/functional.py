"""Functional RMSProp: the one seam where a backend is chosen.

:class:`rmsprop.RMSprop` gathers lists of tensors and calls :func:`rmsprop` (or, to validate
several groups before updating any, :func:`prepare` for each and then the returned steps);
backends plug in here and nowhere else.

Choice, per call:

- ``fused=True``: the fused CPU kernel for every tensor, or a RuntimeError saying which tensor it
  cannot take and why — before anything is written.
- ``fused=None`` with ``foreach=None`` (the default): the fused kernel for the CPU tensors it
  takes (float32/64, bfloat16, float16 where the CPU has F16C, complex; dense layouts), torch's
  foreach path for the rest. A call without CPU tensors never consults the kernel.
  If the native library is missing, foreach, with one warning naming the cause.
- ``fused=False`` or an explicit ``foreach``: the torch-op paths, bit-identical to torch
  (``foreach=True``: multi-tensor; ``False``: per-tensor; ``None``: what torch would pick).
- A call whose first parameter is a CUDA tensor takes the Triton kernel instead of the CPU one
  (``backends/fused_triton``; ``capturable`` included), when triton imports; without it, torch's
  paths (``fused=True``: an error saying why).

Sparse gradients (``nn.Embedding(sparse=True)``) are turned into dense work before a backend is
chosen (see :mod:`rmsprop.sparse`): by default their dense equivalent, bit for bit; with
``lazy_sparse=True`` TensorFlow's lazy rows, stepped by the same backend choice as dense tensors.

Every path validates its inputs before its first write, so a call that raises has changed
nothing: list lengths and the lists the rule needs, the lr (a number or a one-element tensor,
used like torch's ``_to_scalar``), each gradient and state tensor against its parameter (sizes,
dtype, device, dense layout), and inference tensors outside inference mode.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
import warnings
from collections.abc import Callable
from itertools import repeat

import torch
from torch import Tensor
from torch.optim.optimizer import _default_to_fused_or_foreach, _get_capturable_supported_devices

from . import lowbit, sparse
from .backends import fused_cpu, fused_triton, inplace
from .backends.foreach import rmsprop_foreach
from .backends.fused_cpu import FusedCache
from .backends.lowbit import rmsprop_lowbit
from .backends.single import rmsprop_single
from .options import STATE_DTYPES
from .rule import Rule

__all__ = ["rmsprop", "prepare", "FusedCache"]

Backend = Callable[..., None]
Lists = tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]
# Per-block scales of int8 state: (square_avg / grad_var, grad_avg, momentum_buffer), each a list
# aligned with the parameters (None where that buffer is not int8) or empty when unused.
Scales = tuple[list, list, list]
_LIST_NAMES = ("params", "grads", "square_avgs", "grad_avgs", "momentum_buffers", "steps")
_SHAPE, _DTYPE, _DEVICE, _LAYOUT = (operator.attrgetter(a) for a in ("shape", "dtype", "device", "layout"))
_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))
_warned_unavailable = False


def _nothing() -> None:
    return None


def _warn_unavailable_once() -> None:
    global _warned_unavailable
    if not _warned_unavailable:
        _warned_unavailable = True
        warnings.warn(
            f"rmsprop: the fused CPU kernel is unavailable ({fused_cpu.load_error()}); "
            "using the foreach path instead",
            RuntimeWarning,
            stacklevel=5,
        )


def _check_arguments(lists: Lists, lr, rule, grad_scale, found_inf) -> float | Tensor:
    """The structure of a call, checked before anything else; returns the lr as torch's paths
    use it (a one-element tensor squeezed to 0-d)."""
    if not isinstance(rule, Rule):
        raise TypeError(f"rule must be a rmsprop.rule.Rule, got {type(rule).__name__}")
    if not any(rule.state_dtype is sd or (isinstance(sd, str) and rule.state_dtype == sd) for sd in STATE_DTYPES):
        raise ValueError(
            f'rule.state_dtype must be None, torch.float32, torch.bfloat16 or "int8", got {rule.state_dtype!r}'
        )
    for name, lst in zip(_LIST_NAMES, lists, strict=True):
        if not isinstance(lst, (list, tuple)):
            raise TypeError(f"{name} must be a list of tensors, got {type(lst).__name__}")
    n = len(lists[0])
    needed = {"grads": True, "square_avgs": True, "steps": True,
              "grad_avgs": rule.centered, "momentum_buffers": rule.momentum > 0}  # fmt: skip
    for name, lst in zip(_LIST_NAMES[1:], lists[1:], strict=True):
        if needed[name] and len(lst) != n:
            raise ValueError(
                f"{name} has {len(lst)} tensors for {n} parameters"
                + (f" (the rule needs {name})" if name in ("grad_avgs", "momentum_buffers") else "")
            )
        if not needed[name] and lst and len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} tensors for {n} parameters")
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
        if not lr.is_floating_point() or lr.device.type == "meta":
            raise ValueError(f"Tensor lr must be a floating-point tensor holding a value, got {lr.dtype} on {lr.device}")
        if lr.is_cpu and not torch.compiler.is_compiling():  # (reading a device lr would sync it)
            value = float(lr.detach().reshape(()).item())
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"Invalid learning rate: {value} (a finite number >= 0)")
        lr = lr.squeeze() if lr.dim() != 0 else lr
    elif isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"Invalid learning rate: {lr!r} (a finite number >= 0 or a 1-element tensor)")
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None and (not isinstance(t, Tensor) or t.numel() != 1):
            raise ValueError(f"{name} must be a one-element tensor or None")
    return lr


def _OVERLAPS_ITSELF(t: Tensor) -> bool:
    return torch._debug_has_internal_overlap(t) == 1  # (2, "too hard to tell", torch lets through)


def _check_torch_tensors(
    lists: Lists, capturable: bool, positions: list[int] | None = None, state: bool = True, grads_written: bool = False
) -> None:
    """What torch's op paths would trip over half-way through a step, checked before it starts:
    every entry a tensor; gradients dense; each gradient and (``state``) state tensor with its
    parameter's sizes, dtype and device; parameters and state strided and without a conjugate or
    negative bit (torch's paths write through such views only partly); step counters one-element
    float32/float64 tensors; nothing written (the gradients too, with ``grads_written``: unscaled
    in place) an inference tensor outside inference mode. (The
    sizes, dtypes and devices of low-bit state are checked by :func:`_lowbit_formats`.)"""
    params, grads = lists[0], lists[1]
    if not params:
        return

    def at(i: int) -> int:  # the parameter's position in the caller's lists, for messages
        return positions[i] if positions is not None else i
    for name, lst in zip(_LIST_NAMES, lists, strict=True):
        if lst and not all(map(isinstance, lst, [Tensor] * len(lst))):
            i = next(i for i, t in enumerate(lst) if not isinstance(t, Tensor))
            raise RuntimeError(f"parameter {at(i)}: its {name[:-1]} is a {type(lst[i]).__name__}; nothing was updated")
    if capturable:
        supported = _get_capturable_supported_devices()
        bad = next((p.device for p in params if p.device.type not in supported), None)
        if bad is not None:
            raise RuntimeError(
                f"capturable=True requires parameters on a capturable device ({supported}), got {bad}; "
                "nothing was updated"
            )
    if not all(map(operator.is_, map(_LAYOUT, grads), [torch.strided] * len(grads))):
        i = next(i for i, g in enumerate(grads) if g.layout is not torch.strided)
        raise RuntimeError(
            "RMSprop does not support sparse gradients "
            f"(parameter {at(i)} of shape {tuple(params[i].shape)} has a {grads[i].layout} .grad); nothing was updated"
        )
    shapes, dtypes, devices = list(map(_SHAPE, params)), list(map(_DTYPE, params)), list(map(_DEVICE, params))
    for name, lst in zip(_LIST_NAMES[1:5], lists[1:5] if state else lists[1:2], strict=False):
        if not lst:
            continue
        for what, mine, theirs in (
            ("shape", list(map(_SHAPE, lst)), shapes),
            ("dtype", list(map(_DTYPE, lst)), dtypes),
            ("device", list(map(_DEVICE, lst)), devices),
        ):
            if mine != theirs:
                i = next(i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a != b)
                item = "gradient" if name == "grads" else f"state tensor {name[:-1]}"
                raise RuntimeError(
                    f"parameter {at(i)}: its {item} has {what} {_show(mine[i])}, the parameter {_show(theirs[i])}; "
                    "nothing was updated"
                )
    for name, lst in ((n, lst) for n, lst in zip(_LIST_NAMES, lists, strict=True) if n != "grads" and lst):
        if not all(map(operator.is_, map(_LAYOUT, lst), [torch.strided] * len(lst))):
            i = next(i for i, t in enumerate(lst) if t.layout is not torch.strided)
            raise RuntimeError(f"parameter {at(i)}: its {name[:-1]} is a {lst[i].layout} tensor; nothing was updated")
        if any(map(Tensor.is_neg, lst)) or any(map(Tensor.is_conj, lst)):
            i = next(i for i, t in enumerate(lst) if t.is_neg() or t.is_conj())
            raise RuntimeError(
                f"parameter {at(i)}: its {name[:-1]} has its conjugate or negative bit set; resolve it first "
                "(t.data = t.data.resolve_conj().resolve_neg()); nothing was updated"
            )
        # torch's in-place ops refuse to write a tensor whose elements share memory (an expanded
        # one), but only when they reach it, after earlier tensors of the step were written
        if any(map(_OVERLAPS_ITSELF, lst)):
            i = next(i for i, t in enumerate(lst) if _OVERLAPS_ITSELF(t))
            raise RuntimeError(
                f"parameter {at(i)}: its {name[:-1]} has elements that share memory (an expanded tensor?), "
                "which an in-place update cannot write; nothing was updated"
            )
    steps = lists[5]
    if not all(s.numel() == 1 and s.dtype in (torch.float32, torch.float64) for s in steps):
        i = next(i for i, s in enumerate(steps) if not (s.numel() == 1 and s.dtype in (torch.float32, torch.float64)))
        raise RuntimeError(
            f"parameter {at(i)}: its step counter must be a one-element float32/float64 tensor, got "
            f"{steps[i].dtype} {tuple(steps[i].shape)}; nothing was updated"
        )
    if inplace.without_version_counter((params, *lists[2:], *((grads,) if grads_written else ()))):
        raise RuntimeError(inplace.MESSAGE)


def _show(value) -> str:
    return str(tuple(value)) if isinstance(value, torch.Size) else str(value)


def _torch_op_backend(params: list[Tensor], foreach: bool | None, differentiable: bool) -> Backend:
    if foreach is None:
        _, foreach = _default_to_fused_or_foreach(params, differentiable, use_fused=False)
    return rmsprop_foreach if foreach else rmsprop_single


def _torch_step(
    lists: Lists, backend: Backend, grad_scale, found_inf, positions: list[int] | None = None, checked: bool = False,
    **kwargs,
) -> Callable[[], None]:
    """A torch-op backend with GradScaler's contract: skip on inf, else unscale the grads in place
    by the float32 reciprocal of the scale, exactly as GradScaler.unscale_ does. ``checked``:
    the caller has validated the tensors."""
    if not torch.compiler.is_compiling() and not checked:
        _check_torch_tensors(lists, kwargs["capturable"], positions, grads_written=grad_scale is not None)
    if backend is rmsprop_foreach and kwargs["differentiable"]:
        raise ValueError("foreach=True does not support differentiable=True; use foreach=False")

    def run() -> None:
        if found_inf is not None and found_inf.item() != 0:
            return
        grads = lists[1]
        if grad_scale is not None and grads:
            inv_scale = grad_scale.double().reciprocal().float()
            torch._foreach_mul_(grads, inv_scale.to(grads[0].device))
        if any(map(Tensor.is_conj, grads)) or any(map(Tensor.is_neg, grads)):
            # torch's paths view complex tensors as real, which a lazily conjugated gradient
            # refuses: the math reads a resolved copy (the gradient itself is only read)
            grads = [g.resolve_conj().resolve_neg() for g in grads]
            backend(lists[0], grads, *lists[2:], **kwargs)
            return
        backend(*lists, **kwargs)

    return run


def _local_shards(lists: Lists) -> Lists:
    """The lists with each DTensor parameter (and its gradient and state) replaced by the local
    shards, when all of them share one mesh and placement: elementwise math on matching shards
    is the math on the whole. Others are left as they are (and go to foreach)."""
    params = lists[0]
    if set(map(type, params)) <= _PLAIN:  # eager only (the compiled path never comes here)
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
    return out  # type: ignore[return-value]


def _subset(lists: Lists, indices: list[int]) -> Lists:
    return tuple([lst[i] for i in indices] if lst else [] for lst in lists)  # type: ignore[return-value]


def prepare(
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
    cache: FusedCache | None = None,
    check_now: bool = True,
    lazy_sparse: bool = False,
    scales: Scales | None = None,
) -> Callable[[], None]:
    """Validate one RMSProp step over these lists and return the function that applies it.

    Arguments as for :func:`rmsprop`. Everything that could make the step raise is checked here
    (with ``check_now=False`` the fused kernel's own checks run inside the returned step, which
    still writes nothing unless they pass); the returned step raises only on a failure no check
    can foresee.
    """
    lists: Lists = (params, grads, square_avgs, grad_avgs, momentum_buffers, steps)
    if torch.compiler.is_compiling():
        if rule.state_dtype is not None:
            return _compiled_lowbit(lists, scales, lr, rule, capturable, grad_scale, found_inf)
        return _compiled(
            lists, lr, rule, foreach, fused, differentiable, capturable, grad_scale, found_inf, lazy_sparse
        )
    lr = _check_arguments(lists, lr, rule, grad_scale, found_inf)
    if not params:
        return _nothing
    if lazy_sparse and (rule.state_dtype is not None or scales is not None):
        raise ValueError(
            "lazy_sparse=True does not support a state_dtype (lazy rows update the state row by row; "
            "low-bit blocks are cut across rows); nothing was updated"
        )
    strided = fused_cpu.all_strided(grads)  # (read in C where it can be: no call per tensor)
    if strided is None:
        strided = all(map(operator.is_, map(_LAYOUT, grads), repeat(torch.strided)))
    if not strided:
        # sparse gradients become dense work here, before any backend is chosen
        chosen = [i for i, g in enumerate(grads) if g.layout is not torch.strided]
        sparse.check_sparse_grads(params, grads, chosen)
        if lazy_sparse:
            return _lazy_rows(
                lists, chosen, lr=lr, rule=rule, foreach=foreach, fused=fused, differentiable=differentiable,
                capturable=capturable, grad_scale=grad_scale, found_inf=found_inf, cache=cache,
                check_now=check_now,
            )  # fmt: skip
        grads = sparse.densify(grads, chosen)
        lists = (params, grads, square_avgs, grad_avgs, momentum_buffers, steps)
    if rule.state_dtype is not None or scales is not None:
        return _prepare_lowbit(lists, scales, lr, rule, foreach, fused, differentiable, capturable,
                               grad_scale, found_inf, cache, check_now)  # fmt: skip
    kwargs = {"lr": lr, "rule": rule, "differentiable": differentiable, "capturable": capturable}
    if (fused is True or (fused is None and foreach is None and not differentiable)) and fused_triton.takes(
        params[0]
    ):
        return _triton_path(lists, lr, rule, foreach, fused, differentiable, capturable, grad_scale, found_inf, cache)
    wants_fused = fused is True or (
        fused is None and foreach is None and not differentiable and not capturable
    )
    if fused is True and (differentiable or capturable):
        raise RuntimeError(
            "fused=True does not support " + ("differentiable=True" if differentiable else "capturable=True")
        )

    def torch_path(chosen: Lists, backend: Backend | None = None, positions=None) -> Callable[[], None]:
        chosen_complex = any(torch.is_complex(p) for p in chosen[0])  # has_complex is only a hint
        backend = backend or rmsprop_foreach  # foreach for CPU leftovers too: faster than a loop
        return _torch_step(chosen, backend, grad_scale, found_inf, positions, has_complex=chosen_complex, **kwargs)

    if wants_fused:
        on_cpu = params[0].is_cpu or any(p.is_cpu for p in params)
        if not on_cpu:
            if fused:
                raise RuntimeError(
                    f"fused=True: the fused kernel steps CPU tensors; the parameters are on {params[0].device}"
                )
        elif not fused_cpu.is_available():
            if fused:
                raise RuntimeError(
                    f"fused=True: the fused CPU kernel is unavailable: {fused_cpu.load_error()}"
                )
            _warn_unavailable_once()
        else:
            kinds = fused_cpu.ALL_KINDS if fused else fused_cpu.default_kinds()
            local = _local_shards(lists)
            return fused_cpu.prepare(
                local,
                lr=float(lr),
                rule=rule,
                kinds=kinds,
                required=bool(fused),
                cache=cache,
                torch_path=lambda indices: torch_path(_subset(lists, indices), positions=indices),
                grad_scale=grad_scale,
                found_inf=found_inf,
                check_now=check_now,
            )
        return torch_path(lists)
    return torch_path(lists, _torch_op_backend(params, foreach, differentiable))


# ----------------------------------------------------------------------------- the Triton kernel
def _triton_path(lists, lr, rule, foreach, fused, differentiable, capturable, grad_scale, found_inf, cache):
    """A call whose first parameter is on a device the Triton kernel steps (CUDA): the kernel
    for what it takes (capturable included), torch's path for the rest (in a group that mixes
    devices, the other devices' tensors too); with ``fused=True`` a clear error instead, before
    anything is written. Without triton, torch's paths, silently: they are torch's own default."""
    params = lists[0]
    kwargs = {"lr": lr, "rule": rule, "differentiable": differentiable, "capturable": capturable}

    def torch_path(chosen: Lists, backend: Backend | None = None) -> Callable[[], None]:
        chosen_complex = any(torch.is_complex(p) for p in chosen[0])
        backend = backend or _torch_op_backend(chosen[0], foreach, differentiable)
        return _torch_step(chosen, backend, grad_scale, found_inf, has_complex=chosen_complex, **kwargs)

    if not fused_triton.is_available():
        if fused:
            raise RuntimeError(
                f"fused=True: the Triton kernel for {params[0].device.type} tensors is unavailable: "
                f"{fused_triton.load_error()}"
            )
        return torch_path(lists)
    return fused_triton.prepare(
        _local_shards(lists),
        lr=lr,
        rule=rule,
        capturable=capturable,
        required=bool(fused),
        cache=cache,
        torch_path=lambda indices: torch_path(_subset(lists, indices)),
        grad_scale=grad_scale,
        found_inf=found_inf,
    )


def _compiled_triton(lists, lr, rule, fused, differentiable, capturable, grad_scale, found_inf):
    """Under torch.compile, for a call whose first parameter is on a Triton device: the
    kernel's share (decided from what dynamo guards on) through the custom op
    ``rmsprop::triton_step``, the rest through foreach."""
    params = lists[0]
    per_param = [lst for lst in lists[1:5] if lst]
    chosen, rest = [], []
    for i, p in enumerate(params):
        ok = fused_triton.compile_eligible(p, [lst[i] for lst in per_param]) and (
            lists[5][i].device == p.device or lists[5][i].is_cpu
        )
        (chosen if ok else rest).append(i)
    if fused is True and rest:
        raise RuntimeError(f"fused=True: parameter {rest[0]} cannot be stepped by the Triton kernel")
    kwargs = {"lr": lr, "rule": rule, "differentiable": differentiable, "capturable": capturable}
    rest_lists = lists if not chosen else _subset(lists, rest)
    has_complex = any(torch.is_complex(params[i]) for i in rest)

    def run() -> None:
        if chosen:
            kernel_lists = lists if not rest else _subset(lists, chosen)
            fused_triton.compiled_step(kernel_lists, lr=lr, rule=rule, grad_scale=grad_scale, found_inf=found_inf)
        if rest:
            if found_inf is not None or grad_scale is not None:
                _torch_step(rest_lists, rmsprop_foreach, grad_scale, found_inf, has_complex=has_complex, **kwargs)()
            else:
                rmsprop_foreach(*rest_lists, has_complex=has_complex, **kwargs)

    return run


def _lazy_rows(lists: Lists, chosen: list[int], *, cache, check_now, **kwargs) -> Callable[[], None]:
    """The step of a call whose gradients ``chosen`` are sparse, with lazy rows: the dense
    records as usual, and for each sparse one the rows it touches, gathered into dense
    temporaries, stepped by the same backend choice (one call for all of them), then written
    back. Everything is validated before the returned step writes anything."""
    params = lists[0]
    if kwargs["differentiable"]:  # the option table refuses it for the optimizer; this is the functional API
        raise RuntimeError("lazy_sparse=True does not support differentiable=True; nothing was updated")
    # The state must match its parameter before rows are gathered from it (gathering from a
    # tensor of another shape would fail with an indexing error, or read the wrong rows): the
    # torch-path checks, with the parameters standing in for the gradients they already passed.
    _check_torch_tensors((params, params, *lists[2:]), kwargs["capturable"])
    used = [k for k in (2, 3, 4) if lists[k]]  # square_avgs, and grad_avgs / momentum_buffers if in use
    row_lists: Lists = ([], [], [], [], [], [])
    lazy = []
    for i in chosen:
        values, rows = sparse.gather_rows(lists[1][i], params[i], [lists[k][i] for k in used])
        lazy.append(rows)
        row_lists[0].append(rows.rows[0])
        row_lists[1].append(values)
        for k, row in zip(used, rows.rows[1:], strict=True):
            row_lists[k].append(row)
        row_lists[5].append(lists[5][i])
    skip = set(chosen)
    rest = [i for i in range(len(params)) if i not in skip]
    # The temporaries are new every step: nothing about them is worth caching.
    row_step = prepare(*row_lists, cache=None, check_now=True, **kwargs)
    dense_step = prepare(*_subset(lists, rest), cache=cache, check_now=check_now, **kwargs) if rest else None

    def run() -> None:
        if dense_step is not None:
            dense_step()
        row_step()
        for rows in lazy:
            rows.write_back()

    return run


def _eager_sparse_step(lists, lr, rule, foreach, fused, differentiable, lazy_sparse) -> None:
    prepare(
        *lists, lr=lr, rule=rule, foreach=foreach, fused=fused, differentiable=differentiable,
        lazy_sparse=lazy_sparse, check_now=False,
    )()  # fmt: skip


def _compiled(
    lists, lr, rule, foreach, fused, differentiable, capturable, grad_scale, found_inf, lazy_sparse=False
):
    """Under torch.compile: plain, traceable code. The kernel's share is decided from what dynamo
    guards on (device, dtype, contiguity) and goes through the custom op, whose implementation
    validates everything again at run time; the rest takes torch's op paths."""
    params = lists[0]
    if not all(g.layout is torch.strided for g in lists[1]):
        # dynamo does not trace sparse tensors: such a step runs eagerly, outside the graph
        # (disabled here, not at import: the decorator would import dynamo with this module)
        eager = torch.compiler.disable(_eager_sparse_step)
        return lambda: eager(lists, lr, rule, foreach, fused, differentiable, lazy_sparse)
    if (
        params
        and (fused is True or (fused is None and foreach is None and not differentiable))
        and fused_triton.takes(params[0])
        and fused_triton.available_under_compile()
    ):
        return _compiled_triton(lists, lr, rule, fused, differentiable, capturable, grad_scale, found_inf)
    kwargs = {"lr": lr, "rule": rule, "differentiable": differentiable, "capturable": capturable}
    # dynamo traces every optimizer with capturable=True (its note "torch.compile x capturable"),
    # which means nothing to a CPU kernel: only the user's own choices decide here
    wants_fused = fused is True or (fused is None and foreach is None and not differentiable)
    chosen, rest = [], list(range(len(params)))
    kinds = fused_cpu.ALL_KINDS if fused else fused_cpu.default_kinds()
    if wants_fused and fused_cpu.is_available():
        per_param = [lst for lst in lists[1:5] if lst]
        chosen, rest = [], []
        for i, p in enumerate(params):
            ok = fused_cpu.compile_eligible(p, [lst[i] for lst in per_param], kinds) and lists[5][i].is_cpu
            (chosen if ok else rest).append(i)
    if fused is True and rest:
        raise RuntimeError(f"fused=True: parameter {rest[0]} cannot be stepped by the fused kernel")
    backend = rmsprop_foreach if wants_fused else _torch_op_backend(params, foreach, differentiable)
    rest_lists = lists if not chosen else _subset(lists, rest)
    has_complex = any(torch.is_complex(params[i]) for i in rest)

    def run() -> None:
        if chosen:
            kernel_lists = lists if not rest else _subset(lists, chosen)
            fused_cpu.compiled_step(
                kernel_lists, lr=lr, rule=rule, kinds=kinds, required=fused is True, grad_scale=grad_scale,
                found_inf=found_inf,
            )  # fmt: skip
        if rest:
            if found_inf is not None or grad_scale is not None:
                _torch_step(rest_lists, backend, grad_scale, found_inf, has_complex=has_complex, **kwargs)()
            else:
                backend(*rest_lists, has_complex=has_complex, **kwargs)

    return run

# ----------------------------------------------------------------------------- low-bit state
def _check_scales(scales, n: int, rule: Rule) -> Scales:
    if scales is None:
        return ([], [], [])
    if not isinstance(scales, (list, tuple)) or len(scales) != 3:
        raise TypeError("scales must be three lists (square_avg / grad_var, grad_avg, momentum_buffer)")
    out = []
    for name, lst in zip(("square_avg", "grad_avg", "momentum_buffer"), scales, strict=True):
        if not isinstance(lst, (list, tuple)) or (lst and len(lst) != n):
            raise ValueError(f"the scales of {name} must be a list of {n} entries (tensors or None)")
        out.append(list(lst))
    return tuple(out)  # type: ignore[return-value]


def _lowbit_formats(lists: Lists, scales: Scales, rule: Rule, positions: list[int] | None = None) -> list[str]:
    """Each record's state format (see :mod:`rmsprop.lowbit`), checked against the rule's
    ``state_dtype`` before anything is written: RuntimeError naming the record otherwise
    (``positions``: the records' indices in the caller's lists, for the message)."""
    params = lists[0]
    buffers = [(lists[2], scales[0], "square_avg")]
    if rule.centered:
        buffers.append((lists[3], scales[1], "grad_avg"))
    if rule.momentum > 0:
        buffers.append((lists[4], scales[2], "momentum_buffer"))
    formats = []
    for i, p in enumerate(params):
        try:
            fmt = lowbit.check_record(p, [(t[i], s[i] if s else None, key) for t, s, key in buffers], rule)
        except ValueError as exc:
            at = positions[i] if positions is not None else i
            raise RuntimeError(
                f"parameter {at} (shape {tuple(p.shape)}, {p.dtype}): {exc}; nothing was updated"
            ) from None
        formats.append(fmt)
    return formats


def _local_scales(lists: Lists, local: Lists, scales: Scales) -> Scales:
    """The scales of DTensor int8 state as this rank's 1-D views (see lowbit.local_scales)."""
    if local is lists:
        return scales
    return tuple(
        [None if s is None else lowbit.local_scales(s, local[0][i].numel()) for i, s in enumerate(lst)]
        for lst in scales
    )  # type: ignore[return-value]


def _subset_scales(scales: Scales, indices: list[int]) -> Scales:
    return tuple([lst[i] for i in indices] if lst else [] for lst in scales)  # type: ignore[return-value]


def _prepare_lowbit(lists, scales, lr, rule, foreach, fused, differentiable, capturable, grad_scale, found_inf,
                    cache, check_now) -> Callable[[], None]:  # fmt: skip
    """A step with a ``state_dtype``: records in the parameter's dtype ("same") take torch's
    paths as without one; the others the low-bit torch-op backend or the fused kernel. Every
    record is validated before the returned step writes anything."""
    if differentiable:
        raise ValueError("differentiable=True does not support a state_dtype (rounding the state is not differentiable)")
    if fused is True and capturable:
        raise RuntimeError("fused=True does not support capturable=True")
    params = lists[0]
    scales = _check_scales(scales, len(params), rule)
    local = _local_shards(lists)
    if local is not lists and any(map(lowbit.is_dtensor, local[0])):
        raise RuntimeError(
            f"state_dtype={rule.state_dtype!r} with DTensor parameters needs each parameter, its gradient and "
            "state in one placement (the local shards are stepped); nothing was updated"
        )
    local_scales = _local_scales(lists, local, scales)
    kwargs = {"lr": lr, "rule": rule, "differentiable": False, "capturable": capturable}

    def torch_path(indices: list[int]) -> Callable[[], None]:
        # the kernel validates its own records; these are checked here, before anything runs
        sub = _subset(local, indices)
        sub_formats = _lowbit_formats(sub, _subset_scales(local_scales, indices), rule, indices)
        formats = dict(zip(indices, sub_formats, strict=True))
        same = [i for i in indices if formats[i] == "same"]
        low = [i for i in indices if formats[i] != "same"]
        runs = []
        if same:
            chosen = _subset(lists, same)
            backend = rmsprop_foreach if foreach is None else _torch_op_backend(chosen[0], foreach, False)
            complex_ = any(torch.is_complex(p) for p in chosen[0])
            runs.append(_torch_step(chosen, backend, grad_scale, found_inf, same, has_complex=complex_, **kwargs))
        if low:
            chosen = _subset(local, low)
            _check_torch_tensors(chosen, capturable, low, state=False, grads_written=grad_scale is not None)
            backend = functools.partial(
                rmsprop_lowbit,
                formats=[formats[i] for i in low],
                scales=_subset_scales(local_scales, low),
                positions=low,
            )
            runs.append(_torch_step(chosen, backend, grad_scale, found_inf, low, checked=True, **kwargs))
        if len(runs) == 1:
            return runs[0]

        def both() -> None:
            for run in runs:
                run()

        return both

    wants_fused = fused is True or (fused is None and foreach is None and not capturable)
    on_cpu = params[0].is_cpu or any(p.is_cpu for p in params)
    if wants_fused and on_cpu and fused_cpu.is_available():
        return fused_cpu.prepare(
            local,
            lr=float(lr),
            rule=rule,
            kinds=fused_cpu.ALL_KINDS if fused else fused_cpu.default_kinds(),
            required=bool(fused),
            cache=cache,
            torch_path=torch_path,
            grad_scale=grad_scale,
            found_inf=found_inf,
            check_now=check_now,
            scales=local_scales,
        )
    if fused is True:
        reason = (f"the parameters are on {params[0].device}" if not on_cpu
                  else f"the fused CPU kernel is unavailable: {fused_cpu.load_error()}")  # fmt: skip
        raise RuntimeError(f"fused=True: {reason}")
    if wants_fused and on_cpu:
        _warn_unavailable_once()
    return torch_path(list(range(len(params))))


def _eager_lowbit_step(lists, scales, lr, rule, capturable, grad_scale, found_inf) -> None:
    prepare(
        *lists, lr=lr, rule=rule, capturable=capturable, grad_scale=grad_scale, found_inf=found_inf,
        scales=scales, check_now=False,
    )()  # fmt: skip


def _compiled_lowbit(lists, scales, lr, rule, capturable, grad_scale, found_inf):
    """Under torch.compile with a state_dtype: the step runs eagerly, outside the graph (dynamo's
    disable, applied here so that importing rmsprop does not import dynamo), exactly as it
    would without compile. (Traced by Inductor, the torch-op path's integer bit arithmetic gave
    wrong int8 momentum buffers and centered variances on torch 2.13's CPU backend, where
    bf16 state matched: until that is understood, nothing low-bit is traced.)"""
    eager = torch.compiler.disable(_eager_lowbit_step)
    return lambda: eager(lists, scales, lr, rule, capturable, grad_scale, found_inf)


def leftover_step(lists: Lists, indices: list[int], *, lr, rule: Rule, grad_scale, found_inf) -> Callable[[], None]:
    """The step, on torch's foreach path, of the records the fused kernel declined (used by the
    custom op's eager body); validated like any torch-path step before it returns."""
    chosen = _subset(lists, indices)
    lr = _check_arguments(chosen, lr, rule, grad_scale, found_inf)
    return _torch_step(
        chosen, rmsprop_foreach, grad_scale, found_inf, indices, lr=lr, rule=rule, differentiable=False,
        capturable=False,
        has_complex=any(torch.is_complex(p) for p in chosen[0]),
    )  # fmt: skip


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
    cache: FusedCache | None = None,
    lazy_sparse: bool = False,
    scales: Scales | None = None,
) -> None:
    r"""Apply one RMSProp step (see :class:`rmsprop.rule.Rule` for the formula) in place.

    ``grad_avgs`` is empty unless ``rule.centered``; ``momentum_buffers`` is empty unless
    ``rule.momentum > 0``; ``steps`` are the per-parameter step counters (tensors), incremented.
    ``grad_scale`` / ``found_inf`` follow torch.amp.GradScaler's contract for optimizers with
    ``_step_supports_amp_scaling``: grads are divided by the scale, and nothing happens (steps
    included) when ``found_inf`` is nonzero. ``cache``: a :class:`FusedCache` kept by the caller
    across steps (the fused kernel then revalidates cheaply instead of from scratch).
    ``lazy_sparse``: what a sparse gradient does (see :mod:`rmsprop.sparse`). Raises before
    writing anything when an input is invalid (see the module docstring).

    With ``rule.state_dtype`` set, the state tensors are in that format (see
    :mod:`rmsprop.lowbit`): for ``"int8"`` the buffer lists hold the uint8 codes and ``scales``
    their per-block float32 scales; with centered and a bf16 / int8 format ``square_avgs``
    holds the variance ``grad_var``.
    """
    prepare(
        params, grads, square_avgs, grad_avgs, momentum_buffers, steps,
        lr=lr, rule=rule, foreach=foreach, fused=fused, differentiable=differentiable, capturable=capturable,
        has_complex=has_complex, grad_scale=grad_scale, found_inf=found_inf, cache=cache, check_now=False,
        lazy_sparse=lazy_sparse, scales=scales,
    )()  # fmt: skip
