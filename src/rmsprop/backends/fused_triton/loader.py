"""Triton, imported only when a tensor the kernel steps is first seen.

A CPU-only install never imports triton (and pays nothing, and sees no warning, when it is absent):
:func:`is_available` is the first thing that imports it, and the dispatch calls it only for tensors
on a device the kernel steps.

``kernel.py`` is executed once per mode: compiled, for CUDA tensors, and under Triton's
interpreter (what ``TRITON_INTERPRET=1`` selects), for CPU tensors — the tests' route, since the
interpreter runs on CPU tensors. ``triton.jit`` picks the mode when it decorates, so each mode
gets its own copy of the module; the choice follows the tensors' device, not the environment,
because the kernel reads its tensors through addresses in a table, which the interpreter can
only dereference when they are host addresses.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from ...options import RULE_OPTIONS

__all__ = ["is_available", "available_under_compile", "load_error", "kernel", "IMPLEMENTED"]

# Every Rule field the kernel implements (see kernel.py); a Rule field missing here makes the
# kernel unavailable, with the reason, rather than silently ignored.
IMPLEMENTED = frozenset(
    {
        "alpha",
        "eps",
        "weight_decay",
        "momentum",
        "centered",
        "maximize",
        "eps_in_sqrt",
        "nesterov",
        "decoupled_weight_decay",
        "lr_in_momentum",
        "bias_correction",
    }
)
# Rule fields whose groups never reach the kernel: functional.prepare sends every group with a
# state_dtype to the low-bit paths first (this kernel stores torch's format only).
ROUTED_ELSEWHERE = frozenset({"state_dtype"})
_UNCHECKED = object()
_error: object = _UNCHECKED
_modules: dict[bool, ModuleType] = {}
# Whether triton is installed, found without importing it (a look for the package on the path).
INSTALLED = importlib.util.find_spec("triton") is not None


def _check() -> str | None:
    missing = sorted({o.name for o in RULE_OPTIONS} - IMPLEMENTED - ROUTED_ELSEWHERE)
    if missing:
        return f"the Triton kernel does not implement the option(s) {missing}"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
        from triton import knobs  # noqa: F401  (triton >= 3.4: the interpreter switch)
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"triton cannot be imported ({type(exc).__name__}: {exc})"
    return None


def is_available() -> bool:
    """Whether triton imports and the kernel implements every option (imports triton once)."""
    global _error
    if _error is _UNCHECKED:
        _error = _check()
    return _error is None


def available_under_compile() -> bool:
    """The same question for the compiled path, answered from module state dynamo can read
    while tracing (no import): the import check's result once made, before that whether triton
    is installed and the kernel implements every option."""
    if _error is _UNCHECKED:
        return INSTALLED and not ({o.name for o in RULE_OPTIONS} - IMPLEMENTED - ROUTED_ELSEWHERE)
    return _error is None


def load_error() -> str | None:
    """Why the Triton kernel is unavailable (None when it is available)."""
    is_available()
    return _error  # type: ignore[return-value]


def kernel(interpret: bool):
    """The jitted kernel, compiled (``interpret=False``) or interpreted."""
    module = _modules.get(interpret)
    if module is None:
        import triton
        from triton import knobs

        if interpret and tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7):
            # 3.6's interpreter turns a tensor loop bound into an int with int(array of shape
            # (1,)), which numpy 2 refuses; the compiled kernel is unaffected
            raise RuntimeError(f"running the Triton kernel interpreted needs triton >= 3.7, not {triton.__version__}")

        path = Path(__file__).with_name("kernel.py")
        suffix = "interpreted" if interpret else "compiled"
        spec = importlib.util.spec_from_file_location(f"{__package__}.kernel_{suffix}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        with knobs.runtime.scope():
            knobs.runtime.interpret = interpret
            spec.loader.exec_module(module)
        _modules[interpret] = module
    return module.rmsprop_kernel
