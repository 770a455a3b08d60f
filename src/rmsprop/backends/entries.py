"""What the fused backends keep between steps, found by the identity of the tensors that persist
between steps (parameters and their state). Each backend's entry adds what it remembers (the CPU
kernel's handle columns and memo, the Triton kernel's address tables); the cache belongs to its
caller, so nothing here outlives the optimizer.

An entry holds strong references to the tensors it describes: an address it keeps is only valid
while its tensor lives.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["PersistedEntry", "EntryCache"]


class PersistedEntry:
    """The persistent half of one call's lists, held tensor by tensor."""

    def __init__(self, persisted: tuple[Sequence[Tensor], ...]) -> None:
        self.persisted = tuple(tuple(lst) for lst in persisted)
        # Inside inference mode the step may write inference tensors, which torch refuses to
        # update in place outside it: an entry validated there holds only inside it.
        self.inference_mode = torch.is_inference_mode_enabled()

    def matches(self, persisted: tuple[Sequence[Tensor], ...]) -> bool:
        """True when ``persisted`` holds exactly these tensor objects, list by list."""
        if len(self.persisted) != len(persisted):
            return False
        for mine, theirs in zip(self.persisted, persisted, strict=True):
            if len(mine) != len(theirs) or not all(map(operator.is_, mine, theirs)):
                return False
        return True


class EntryCache:
    """Entries keyed by their first parameter and their length; found only when every persistent
    tensor is the same object. Never copied or pickled with its owner (entries hold addresses)."""

    _MAX_ENTRIES = 64  # one per param group in practice; the bound only stops a pathological leak

    def __init__(self) -> None:
        self._entries: dict[tuple[int, int], PersistedEntry] = {}
        self._used: set[tuple[int, int]] = set()  # keys found or stored since the last sweep

    def clear(self) -> None:
        self._entries.clear()
        self._used.clear()

    def sweep(self) -> None:
        """Forget the entries no call has used since the last sweep. The optimizer sweeps after
        each step: an entry holds its tensors, so one for parameters the user has dropped (a
        param group given new tensors) would otherwise keep them, and their state, alive."""
        if len(self._used) < len(self._entries):
            self._entries = {key: e for key, e in self._entries.items() if key in self._used}
        self._used.clear()

    def lookup(self, persisted: tuple[Sequence[Tensor], ...]):
        params = persisted[0]
        entry = self._entries.get((id(params[0]), len(params))) if params else None
        if entry is None or (entry.inference_mode and not torch.is_inference_mode_enabled()):
            return None
        if not entry.matches(persisted):
            return None
        self._used.add((id(params[0]), len(params)))
        return entry

    def store(self, entry: PersistedEntry) -> None:
        params = entry.persisted[0]
        key = (id(params[0]), len(params))
        self._entries.pop(key, None)
        if len(self._entries) >= self._MAX_ENTRIES:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = entry
        self._used.add(key)

    def __len__(self) -> int:
        return len(self._entries)

    def __deepcopy__(self, memo):
        return type(self)()

    def __reduce__(self):
        return (type(self), ())
