"""The fused CPU kernel as a backend.

- ``native.py``: loads the C library, checks its ABI against the option table, hands it torch's
  stable C shim; :func:`is_available` / :func:`load_error`.
- ``kernel.py``: the entry — what the kernel takes, the validation before any write, one native
  call per group, version counters, and the custom op ``rmsprop::fused_step`` for torch.compile.
- ``cache.py``: :class:`FusedCache`, what the backend keeps between steps (owned by the caller).

:func:`all_strided` is the library's list reader lent to the functional layer, which checks
every gradient's layout before it picks a backend.
"""

from .cache import FusedCache
from .kernel import ALL_KINDS, compile_eligible, compiled_step, default_kinds, explain, prepare
from .native import all_strided, is_available, load_error

__all__ = [
    "FusedCache",
    "prepare",
    "compiled_step",
    "compile_eligible",
    "explain",
    "ALL_KINDS",
    "default_kinds",
    "is_available",
    "load_error",
    "all_strided",
]
