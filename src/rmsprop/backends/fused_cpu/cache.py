"""What the fused backend keeps between steps, keyed by the tensors it relies on.

A :class:`FusedCache` belongs to its caller (the optimizer holds one and passes it through the
functional layer without looking inside), so its lifetime is the caller's: nothing here outlives
the optimizer, and nothing here knows about param groups or state dicts. An entry is found by
the identity of the tensors that persist between steps (parameters and their state) and holds:

- their handle columns (TensorImpl addresses), so a step reads no attribute of them in Python;
- which records the kernel does not take (its exclusion set: float16 by default, non-dense
  views, ...), so a steady training loop routes them without asking the kernel twice;
- the kernel's memory of the previous step (each record's addresses, counts and dtypes), with
  which it notices any tensor that moved, grew, shrank or changed dtype since — the step then
  takes the full validation path again.

The entry holds strong references to the tensors it describes: a handle is only valid while its
tensor lives.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

from torch import Tensor

from . import native

__all__ = ["FusedCache", "Entry"]

_MAX_ENTRIES = 64  # one per param group in practice; the bound only stops a pathological leak


class Entry:
    """The persistent half of one call's lists, described for the kernel."""

    def __init__(self, persisted: tuple[Sequence[Tensor], ...], has_complex: bool) -> None:
        # params, square_avgs, grad_avgs, bufs, steps, and the int8 scales of the three buffers
        # (lists with None where a record's state is not int8)
        self.persisted = tuple(tuple(lst) for lst in persisted)
        self.columns = tuple(
            (native.handles(lst) if k < 5 else native.optional_handles(lst)) if lst else None
            for k, lst in enumerate(self.persisted)
        )
        n = len(self.persisted[0])
        self.records = bytearray(native.memo_size(n))  # the kernel's memory of the last step
        self.excluded = bytearray(n)  # nonzero: the kernel does not take this record (its status)
        self.has_complex = has_complex
        self.grad_caused = False  # an exclusion came from a gradient (it may differ next step)
        self.records_address = native.buffer_address(self.records)

    def matches(self, persisted: tuple[Sequence[Tensor], ...]) -> bool:
        """True when ``persisted`` holds exactly these tensor objects, list by list."""
        if len(self.persisted) != len(persisted):
            return False
        for mine, theirs in zip(self.persisted, persisted, strict=True):
            if len(mine) != len(theirs) or not all(map(operator.is_, mine, theirs)):
                return False
        return True

    def leftovers(self) -> list[int]:
        """Indices of the records the kernel does not take."""
        if not any(self.excluded):
            return []
        return [i for i, s in enumerate(self.excluded) if s]


class FusedCache:
    """The fused backend's memory across steps; opaque to whoever holds it. ``others`` holds
    the other fused backends' caches by name (the Triton backend's: ``"triton"``), so that the
    caller carries one object, cleared as one."""

    def __init__(self) -> None:
        self._entries: dict[tuple[int, int], Entry] = {}
        self.others: dict[str, object] = {}

    def clear(self) -> None:
        self._entries.clear()
        for other in self.others.values():
            other.clear()  # type: ignore[attr-defined]

    def lookup(self, persisted: tuple[Sequence[Tensor], ...]) -> Entry | None:
        params = persisted[0]
        entry = self._entries.get((id(params[0]), len(params))) if params else None
        if entry is not None and entry.matches(persisted):
            return entry
        return None

    def store(self, entry: Entry) -> None:
        params = entry.persisted[0]
        key = (id(params[0]), len(params))
        self._entries.pop(key, None)
        if len(self._entries) >= _MAX_ENTRIES:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = entry

    def __len__(self) -> int:
        return len(self._entries)

    # plans hold raw addresses: never copied or pickled with their owner
    def __deepcopy__(self, memo) -> FusedCache:
        return FusedCache()

    def __reduce__(self):
        return (FusedCache, ())
