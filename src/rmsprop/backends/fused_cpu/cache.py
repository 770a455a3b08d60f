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

from array import array
from collections.abc import Sequence

from torch import Tensor

from ..entries import EntryCache, PersistedEntry
from . import native

__all__ = ["FusedCache", "Entry"]


class Entry(PersistedEntry):
    """The persistent half of one call's lists, described for the kernel."""

    def __init__(
        self, persisted: tuple[Sequence[Tensor], ...], has_complex: bool, kinds: int, required: bool
    ) -> None:
        # params, square_avgs, grad_avgs, bufs, steps, and the int8 scales of the three buffers
        # (lists with None where a record's state is not int8)
        super().__init__(persisted)
        self.columns = tuple(
            (native.handles(lst) if k < 5 else native.optional_handles(lst)) if lst else None
            for k, lst in enumerate(self.persisted)
        )
        # the ids of the objects, for the list reader's identity check (kept alive by persisted)
        self.objects = tuple(array("q", map(id, lst)) if lst else None for lst in self.persisted)
        n = len(self.persisted[0])
        self.records = bytearray(native.memo_size(n))  # the kernel's memory of the last step
        self.excluded = bytearray(n)  # nonzero: the kernel does not take this record (its status)
        self.has_complex = has_complex
        # the exclusions hold for the choice they were made under: what the kernel may take, and
        # whether a record it declines is an error (fused=True) or goes to the torch path
        self.kinds, self.required = kinds, required
        self.grad_caused = False  # an exclusion came from a gradient (it may differ next step)
        self.records_address = native.buffer_address(self.records)

    def matches(self, persisted: tuple[Sequence[Tensor], ...]) -> bool:
        """True when ``persisted`` holds exactly these tensor objects, list by list, and each
        still holds the TensorImpl its handle names. torch.utils.swap_tensors (nn.Module's
        load_state_dict(assign=True), .to() with swap_module_params_on_conversion) keeps the
        Python objects and swaps what is inside them: the handle would then name another
        tensor, possibly a freed one. Read in C where the lists are lists (native.same_objects:
        no Python call per tensor), else in Python."""
        if len(self.persisted) != len(persisted):
            return False
        for objects, column, tensors in zip(self.objects, self.columns, persisted, strict=True):
            if objects is None:
                if tensors:
                    return False
                continue
            same = native.same_objects(tensors, objects, column)
            if same is None:
                return super().matches(persisted) and self._same_impls(persisted)
            if not same:
                return False
        return True

    def _same_impls(self, persisted: tuple[Sequence[Tensor], ...]) -> bool:
        for k, (column, tensors) in enumerate(zip(self.columns, persisted, strict=True)):
            if column is not None and column != (native.handles(tensors) if k < 5 else native.optional_handles(tensors)):
                return False
        return True

    def leftovers(self) -> list[int]:
        """Indices of the records the kernel does not take."""
        if not any(self.excluded):
            return []
        return [i for i, s in enumerate(self.excluded) if s]


class FusedCache(EntryCache):
    """The fused backend's memory across steps; opaque to whoever holds it. ``others`` holds
    the other fused backends' caches by name (the Triton backend's: ``"triton"``), so that the
    caller carries one object, cleared as one."""

    def __init__(self) -> None:
        super().__init__()
        self.others: dict[str, object] = {}

    def clear(self) -> None:
        super().clear()
        for other in self.others.values():
            other.clear()  # type: ignore[attr-defined]

    def sweep(self) -> None:
        super().sweep()
        for other in self.others.values():
            other.sweep()  # type: ignore[attr-defined]
