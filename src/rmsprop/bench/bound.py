"""The streaming bound of `rmsprop bench`: the memory traffic of a step, with nothing else.

The native library's stream mode moves the bytes of a plain fp32 step (read p, g, v; write p, v)
over the same tensors, split across threads as the kernel splits them, with arithmetic too cheap
to matter. Its inputs pass the same validation as a real step (so it cannot be pointed at memory
a tensor does not own), on every call: with thousands of small tensors that validation is a
visible part of the bound's time, which ``check_only`` measures alone (the kernel's check mode:
every tensor validated, nothing written).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

from ..backends.fused_cpu import native

__all__ = ["stream_bound"]


def stream_bound(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    square_avgs: list[torch.Tensor],
    check_only: bool = False,
) -> Callable[[], None]:
    """A zero-argument callable streaming a plain fp32 step's bytes over these float32 tensors
    (``check_only``: validating them as the stream does, and moving nothing)."""
    if native.LIB is None:
        raise RuntimeError(f"the native library is unavailable: {native.load_error()}")
    if not len(params) == len(grads) == len(square_avgs):  # (C reads one handle of each per parameter)
        raise ValueError(
            f"stream_bound takes one gradient and one square average per parameter, got "
            f"{len(params)} / {len(grads)} / {len(square_avgs)}"
        )
    if any(t.dtype != torch.float32 or not t.is_contiguous() for t in (*params, *grads, *square_avgs)):
        raise ValueError("stream_bound takes contiguous float32 tensors")
    steps = [torch.zeros((), dtype=torch.float32) for _ in params]
    columns = [native.handles(lst) for lst in (params, grads, square_avgs, steps)]
    address = [c.buffer_info()[0] for c in columns]
    lists = native.Lists(param=address[0], grad=address[1], square_avg=address[2], step=address[3])
    call = native.Call(mode=native.MODE_CHECK if check_only else native.MODE_STREAM, dtype_mask=1)
    n = len(params)
    records = bytearray(native.memo_size(n))
    records_address = native.buffer_address(records)

    def stream() -> None:
        status = bytearray(n)
        rc = native.LIB.rmsprop_step(
            ctypes.byref(lists), n, ctypes.byref(call), torch.get_num_threads(), records_address,
            native.buffer_address(status) if n else None, None,
        )  # fmt: skip
        if rc != native.OK:
            raise RuntimeError(f"stream bound failed: {native.ERRORS.get(rc, rc)}")

    stream.keep_alive = (columns, steps, params, grads, square_avgs, records)  # type: ignore[attr-defined]
    return stream
