"""Fused CPU backend: one native call per group walks every tensor once (see _cpu/rmsprop_cpu.c).

The kernel is a plain C library built by ``pip install`` and loaded with ctypes: no torch C++
headers, nothing compiled at run time. In eager mode the step calls it directly (a custom-op
dispatch over thousands of tensors would cost more than the kernel); under ``torch.compile`` it
goes through the opaque custom op ``rmsprop::fused_step`` so the compiler sees one op.

A tensor is eligible when it lives on the CPU, is float32/float64/bfloat16/float16 (or complex,
as float pairs), and the parameter, its gradient and its state share one dtype and one dense
layout (contiguous, or channels-last with equal strides). Anything else goes to foreach.
"""

from __future__ import annotations

import ctypes
import importlib.util
import operator
from collections.abc import Callable, Sequence
from itertools import repeat
from pathlib import Path

import torch
from torch import Tensor

from ..rule import Rule

__all__ = ["load_error", "is_available", "eligible", "rmsprop_fused", "FusedPlan", "NATIVE_DTYPES"]

# Element dtype codes of the C ABI; a table row is the C struct rms_tensor: param, grad,
# square_avg, grad_avg, momentum_buffer, step (addresses), numel, dtype code.
NATIVE_DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_COMPLEX_AS_REAL = {torch.complex64: 0, torch.complex128: 1}  # (re, im) pairs of f32 / f64
_STEP_DTYPES = {torch.float32: 0, torch.float64: 1}
_ABI_VERSION = 1
_GRAD, _DTYPE = operator.attrgetter("grad"), operator.attrgetter("dtype")
_ERRORS = {-1: "unsupported dtype code", -2: "out of memory", -3: "bad thread count"}
# The boolean switches of a Rule, in the order of the C struct rms_rule (and of the custom op's
# `flags` argument).
_RULE_FLAGS = (
    "centered",
    "maximize",
    "eps_in_sqrt",
    "nesterov",
    "decoupled_weight_decay",
    "lr_in_momentum",
    "bias_correction",
)


class _Rule(ctypes.Structure):
    _fields_ = [
        ("lr", ctypes.c_double),
        ("alpha", ctypes.c_double),
        ("eps", ctypes.c_double),
        ("weight_decay", ctypes.c_double),
        ("momentum", ctypes.c_double),
        ("centered", ctypes.c_int32),
        ("maximize", ctypes.c_int32),
        ("eps_in_sqrt", ctypes.c_int32),
        ("nesterov", ctypes.c_int32),
        ("decoupled_weight_decay", ctypes.c_int32),
        ("lr_in_momentum", ctypes.c_int32),
        ("bias_correction", ctypes.c_int32),
        ("has_momentum", ctypes.c_int32),
        ("grad_scale", ctypes.c_void_p),
        ("found_inf", ctypes.c_void_p),
    ]


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    spec = importlib.util.find_spec("rmsprop._rmsprop_cpu")
    if spec is None or not spec.origin:
        return (
            None,
            "the native library rmsprop._rmsprop_cpu was not built (reinstall with a C compiler: pip install .)",
        )
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError as exc:
        return None, f"the native library {spec.origin} failed to load: {exc}"
    if lib.rmsprop_abi_version() != _ABI_VERSION:
        return None, f"the native library {spec.origin} is a different version; reinstall the package"
    lib.rmsprop_step.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(_Rule), ctypes.c_int]
    lib.rmsprop_step.restype = ctypes.c_int
    lib.rmsprop_stream_bound.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    lib.rmsprop_stream_bound.restype = ctypes.c_int
    lib.rmsprop_use_openmp.argtypes = [ctypes.c_void_p]
    lib.rmsprop_use_openmp.restype = None
    gomp_parallel = _torch_openmp_entry()
    if gomp_parallel is not None:
        lib.rmsprop_use_openmp(gomp_parallel)
    return lib, None


def _torch_openmp_entry() -> int | None:
    """Address of GOMP_parallel in the OpenMP runtime torch ships and uses, or None.

    The kernel then runs on torch's own, already-warm thread pool instead of starting threads of
    its own, so the two never compete for the cores. A runtime torch does not use (or none at
    all) leaves the kernel on plain pthreads.
    """
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    lib_dir = Path(torch.__file__).parent / "lib"
    for pattern in ("libgomp*.so*", "libiomp5*.so*", "libomp*.so*", "libomp*.dylib", "libiomp5*.dylib"):
        for path in sorted(lib_dir.glob(pattern)):
            try:
                runtime = ctypes.CDLL(str(path))
                return ctypes.cast(runtime.GOMP_parallel, ctypes.c_void_p).value
            except (OSError, AttributeError):
                continue
    return None


_LIB, _LOAD_ERROR = _load()


def is_available() -> bool:
    """True when the native kernel is built and loaded."""
    return _LIB is not None


def load_error() -> str | None:
    """Why the native kernel is unavailable, or None."""
    return _LOAD_ERROR


# Plain tensors only: a subclass (DTensor, a tensor wrapper) can report the shape and numel of
# a whole of which its memory holds only a part, and the kernel trusts numel. DTensors are
# unwrapped to their local shards before they get here (see functional.py).
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _same_layout(t: Tensor, p: Tensor, contiguous: bool) -> bool:
    # Gradients and state always have the parameter's device and shape (torch checks .grad on
    # assignment; load_state_dict checks shapes), so dtype and dense layout are what can differ.
    if t.dtype is not p.dtype:
        return False
    return t.is_contiguous() if contiguous else (t.stride() == p.stride() and t.shape == p.shape)


# Supported, but chosen only on request (fused=True): the kernel's fp16 conversions are integer
# code, and on CPUs with F16C torch's own foreach path converts faster (measured: 16 vs 9 ms for
# 10 x 1M fp16 on the benchmark machine), while bf16 fused is 3x faster than foreach.
_SLOWER_THAN_FOREACH = {torch.float16}


def eligible(param: Tensor, grad: Tensor, states: Sequence[Tensor], *, by_default: bool = False) -> bool:
    """Whether the kernel can update this parameter (see the module docstring); ``by_default``:
    whether fused=None should pick it (not for dtypes where foreach is faster)."""
    if type(param) not in _PLAIN or type(grad) not in _PLAIN or any(type(s) not in _PLAIN for s in states):
        return False
    if not param.is_cpu or (param.dtype not in NATIVE_DTYPES and param.dtype not in _COMPLEX_AS_REAL):
        return False
    if by_default and param.dtype in _SLOWER_THAN_FOREACH:
        return False
    contiguous = param.is_contiguous()
    if not contiguous and not (param.dim() == 4 and param.is_contiguous(memory_format=torch.channels_last)):
        return False
    if grad.is_sparse or not _same_layout(grad, param, contiguous):
        return False
    return all(_same_layout(s, param, contiguous) for s in states)


_CODES = {**NATIVE_DTYPES, **_COMPLEX_AS_REAL}


def _table(params, grads, square_avgs, grad_avgs, momentum_buffers, steps) -> Tensor:
    """The (n, 8) int64 table of rms_tensor records the kernel walks."""
    flat: list[int] = []
    has_m, has_b = bool(grad_avgs), bool(momentum_buffers)
    for i, p in enumerate(params):
        step = steps[i]
        step_code = _STEP_DTYPES.get(step.dtype)
        if step_code is None or not step.is_cpu or step.numel() != 1:
            raise RuntimeError(
                f"fused RMSprop needs CPU float32/float64 step counters, got {step.dtype} on {step.device}"
            )
        code = _CODES[p.dtype]
        flat += (
            p.data_ptr(),
            grads[i].data_ptr(),
            square_avgs[i].data_ptr(),
            grad_avgs[i].data_ptr() if has_m else 0,
            momentum_buffers[i].data_ptr() if has_b else 0,
            step.data_ptr(),
            p.numel() * (2 if p.is_complex() else 1),  # complex: (re, im) float pairs
            code | (step_code << 8),
        )
    return torch.tensor(flat, dtype=torch.int64)


def _scalar_pointer(t: Tensor | None, name: str) -> tuple[int | None, Tensor | None]:
    """Address of a float32 CPU scalar (and the tensor that keeps it alive)."""
    if t is None:
        return None, None
    t = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if t.numel() != 1:
        raise ValueError(f"{name} must have one element, got shape {tuple(t.shape)}")
    return t.data_ptr(), t


def _call_kernel(
    params,
    grads,
    square_avgs,
    grad_avgs,
    momentum_buffers,
    steps,
    lr: float,
    rule: Rule,
    grad_scale,
    found_inf,
) -> None:
    table = _table(params, grads, square_avgs, grad_avgs, momentum_buffers, steps)
    _run(table, len(params), lr, rule, grad_scale, found_inf)


def _run(table: Tensor, n_tensors: int, lr: float, rule: Rule, grad_scale, found_inf) -> None:
    if _LIB is None:
        raise RuntimeError(f"fused RMSprop is unavailable: {_LOAD_ERROR}")
    scale_ptr, scale_keep = _scalar_pointer(grad_scale, "grad_scale")
    inf_ptr, inf_keep = _scalar_pointer(found_inf, "found_inf")
    flags = [getattr(rule, name) for name in _RULE_FLAGS]
    native_rule = _Rule(
        lr,
        rule.alpha,
        rule.eps,
        rule.weight_decay,
        rule.momentum,
        *flags,
        rule.momentum > 0,
        scale_ptr,
        inf_ptr,
    )
    status = _LIB.rmsprop_step(
        table.data_ptr(), n_tensors, ctypes.byref(native_rule), torch.get_num_threads()
    )
    del scale_keep, inf_keep
    if status != 0:
        raise RuntimeError(f"fused RMSprop kernel failed: {_ERRORS.get(status, status)}")


@torch.library.custom_op(
    "rmsprop::fused_step",
    mutates_args=("params", "grads", "square_avgs", "grad_avgs", "momentum_buffers", "steps"),
    device_types="cpu",
)
def _fused_step_op(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffers: list[Tensor],
    steps: list[Tensor],
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    flags: list[bool],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    rule = Rule(
        alpha=alpha,
        eps=eps,
        weight_decay=weight_decay,
        momentum=momentum,
        **dict(zip(_RULE_FLAGS, flags, strict=True)),
    )
    _call_kernel(
        params, grads, square_avgs, grad_avgs, momentum_buffers, steps, lr, rule, grad_scale, found_inf
    )


@_fused_step_op.register_fake
def _(
    params,
    grads,
    square_avgs,
    grad_avgs,
    momentum_buffers,
    steps,
    lr,
    alpha,
    eps,
    weight_decay,
    momentum,
    flags,
    grad_scale,
    found_inf,
):
    return None


def rmsprop_fused(
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
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """Update every tensor in place with one native call (tensors must be :func:`eligible`)."""
    del has_complex  # complex tensors are passed as float pairs
    if differentiable:
        raise RuntimeError("fused=True does not support differentiable=True")
    if capturable:
        raise RuntimeError("fused=True does not support capturable=True (the fused kernel is CPU-only)")
    if not params:
        return
    lr = float(lr)
    if torch.compiler.is_compiling():
        flags = [getattr(rule, name) for name in _RULE_FLAGS]
        _fused_step_op(
            params, grads, square_avgs, grad_avgs, momentum_buffers, steps, lr,
            rule.alpha, rule.eps, rule.weight_decay, rule.momentum, flags, grad_scale, found_inf,
        )  # fmt: skip
    else:
        _call_kernel(
            params, grads, square_avgs, grad_avgs, momentum_buffers, steps, lr, rule, grad_scale, found_inf
        )


def stream_bound(params: list[Tensor], grads: list[Tensor], square_avgs: list[Tensor]):
    """Benchmark only: a zero-argument callable that moves the bytes of a plain fp32 step (read
    p, g, v; write p, v) over these float32 tensors with trivial arithmetic, split across threads
    as the kernel splits them. The pointer table is built here, once, so calls time memory only."""
    if _LIB is None:
        raise RuntimeError(f"the native library is unavailable: {_LOAD_ERROR}")
    if any(t.dtype != torch.float32 or not t.is_contiguous() for t in (*params, *grads, *square_avgs)):
        raise ValueError("stream_bound takes contiguous float32 tensors")
    steps = [torch.zeros((), dtype=torch.float32) for _ in params]
    table = _table(params, grads, square_avgs, [], [], steps)
    n, threads = len(params), torch.get_num_threads()

    def stream() -> None:
        status = _LIB.rmsprop_stream_bound(table.data_ptr(), n, threads)
        if status != 0:
            raise RuntimeError(f"stream bound failed: {_ERRORS.get(status, status)}")

    stream.keep_alive = (table, steps, params, grads, square_avgs)  # type: ignore[attr-defined]
    return stream


class FusedPlan:
    """A whole group's fused step with its pointer table kept between steps.

    Building the table costs a few microseconds per tensor in Python, as much as the kernel
    itself for thousands of small tensors. A plan keeps it and, each step, only re-checks what
    can change (cheap, mostly identity tests): the same parameter objects at the same addresses,
    the same state dicts holding the same state tensors, gradients present with the parameter's
    dtype and contiguous. Then it refreshes the gradient addresses and calls the kernel. If any
    check fails it does nothing and says so, and the caller takes the general path.
    """

    def __init__(self, params, square_avgs, grad_avgs, momentum_buffers, steps, state_dicts) -> None:
        self.params = tuple(params)
        self.state_dicts = tuple(state_dicts)
        self.square_avgs, self.grad_avgs = tuple(square_avgs), tuple(grad_avgs)
        self.momentum_buffers, self.steps = tuple(momentum_buffers), tuple(steps)
        self.dtypes = [p.dtype for p in params]
        self.param_ptrs = [p.data_ptr() for p in params]
        self.state_tensors = [("square_avg", self.square_avgs), ("step", self.steps)]
        if self.grad_avgs:
            self.state_tensors.append(("grad_avg", self.grad_avgs))
        if self.momentum_buffers:
            self.state_tensors.append(("momentum_buffer", self.momentum_buffers))
        grads = [p.grad for p in params]
        self.table = _table(params, grads, square_avgs, grad_avgs, momentum_buffers, steps).view(-1, 8)

    @classmethod
    def build(
        cls, params, grads, square_avgs, grad_avgs, momentum_buffers, steps, state_dicts
    ) -> FusedPlan | None:
        """A plan for these tensors, or None when some are not plain contiguous eligible ones."""
        for i, p in enumerate(params):
            if not p.is_contiguous():
                return None  # channels-last and friends: correct on the general path, not cached
            states = (
                [square_avgs[i]]
                + ([grad_avgs[i]] if grad_avgs else [])
                + ([momentum_buffers[i]] if momentum_buffers else [])
            )
            if not eligible(p, grads[i], states):
                return None
        return cls(params, square_avgs, grad_avgs, momentum_buffers, steps, state_dicts)

    # The checks run as map()/operator iterations: no Python bytecode per tensor, which matters
    # with thousands of tensors whose objects the kernel's memory stream has evicted from cache.
    def _still_valid(self, group_params, state, grads) -> bool:
        if len(group_params) != len(self.params) or not all(map(operator.is_, group_params, self.params)):
            return False
        if any(map(operator.is_, grads, repeat(None))):
            return False
        # grads are strided here (the optimizer refuses other layouts before any step); a dtype
        # other than the parameter's could still arrive through .data and must not reach C
        if list(map(_DTYPE, grads)) != self.dtypes or not all(map(Tensor.is_contiguous, grads)):
            return False
        if not all(map(operator.is_, map(state.get, self.params), self.state_dicts)):
            return False
        for key, tensors in self.state_tensors:
            if not all(map(operator.is_, map(operator.itemgetter(key), self.state_dicts), tensors)):
                return False
        return list(map(Tensor.data_ptr, self.params)) == self.param_ptrs

    def prepare(self, group_params, state, rule: Rule) -> Callable[..., None] | None:
        """If the plan still holds, the step to run (taking lr, grad_scale, found_inf); else None.

        Validation and running are apart so that the optimizer can validate every group before
        it updates any: a plan that still holds also proves the kernel takes every tensor.
        """
        if (rule.momentum > 0) != bool(self.momentum_buffers) or rule.centered != bool(self.grad_avgs):
            return None
        grads = list(map(_GRAD, self.params))
        if not self._still_valid(group_params, state, grads):
            return None

        def run(lr, grad_scale=None, found_inf=None) -> None:
            self.table[:, 1] = torch.tensor(list(map(Tensor.data_ptr, grads)), dtype=torch.int64)
            _run(self.table, len(self.params), float(lr), rule, grad_scale, found_inf)

        return run
