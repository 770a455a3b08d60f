"""torch's rule for updating a tensor in place, which every path applies before it writes.

Outside inference mode torch refuses an in-place update of a tensor that has no version counter:
a tensor made inside inference mode. Neither ``is_inference()`` way round says so: after
``p.data = <inference tensor>`` it is true of ``p``, which keeps its own counter and which torch
updates in place (so do we); after ``q.data = <normal tensor>`` of a ``q`` made in inference mode
it is false, but ``q`` still has no counter and torch refuses it (so do we). The counter itself
is the test: reading ``_version`` raises where there is none.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["without_version_counter", "lacks_version_counter", "MESSAGE"]

MESSAGE = (
    "Inplace update to inference tensor outside InferenceMode is not allowed: a parameter or its "
    "optimizer state is an inference tensor, or was made in inference mode and has no version counter "
    "(clone it to get a normal tensor); nothing was updated"
)


_VERSION = operator.attrgetter("_version")


def lacks_version_counter(t: Tensor) -> bool:
    """True when ``t`` has no version counter (it was made in inference mode)."""
    try:
        _VERSION(t)
    except RuntimeError:  # "Inference tensors do not track version counter."
        return True
    return False


def without_version_counter(lists: Iterable[Sequence[Tensor | None]]) -> bool:
    """True when, outside inference mode, some tensor of ``lists`` (None entries skipped) has no
    version counter: torch would refuse to update it in place. (One C-level getter per tensor,
    as cheap as ``is_inference()``.)"""
    if torch.is_inference_mode_enabled():
        return False
    for tensors in lists:
        tensors = [t for t in tensors if t is not None] if any(t is None for t in tensors) else tensors
        try:
            for _ in map(_VERSION, tensors):
                pass
        except RuntimeError:
            return True
    return False
