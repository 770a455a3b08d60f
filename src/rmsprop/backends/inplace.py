"""torch's rule for updating a tensor in place, which every path applies before it writes.

Outside inference mode torch refuses an in-place update of a tensor that has no version counter:
a tensor made inside inference mode. ``is_inference()`` alone says more than that: after
``p.data = <inference tensor>`` it is true of ``p``, which keeps its own counter and which torch
updates in place; so do we.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["without_version_counter", "MESSAGE"]

MESSAGE = (
    "Inplace update to inference tensor outside InferenceMode is not allowed: a parameter or its "
    "optimizer state is an inference tensor (clone it to get a normal tensor); nothing was updated"
)


def _lacks_counter(t: Tensor) -> bool:
    try:
        _ = t._version
    except RuntimeError:  # "Inference tensors do not track version counter."
        return True
    return False


def without_version_counter(lists: Iterable[Sequence[Tensor | None]]) -> bool:
    """True when, outside inference mode, some tensor of ``lists`` (None entries skipped) has no
    version counter: torch would refuse to update it in place."""
    if torch.is_inference_mode_enabled():
        return False
    for tensors in lists:
        tensors = [t for t in tensors if t is not None] if any(t is None for t in tensors) else tensors
        if tensors and any(map(Tensor.is_inference, tensors)):
            if any(_lacks_counter(t) for t in tensors if t.is_inference()):
                return True
    return False
