"""What the Triton backend checks before a launch, the tables it launches with, and its cache.

The kernel reads every tensor through an address in a table, so it cannot refuse anything itself:
everything is checked here, in Python, before the first launch of a step — the same checks as the
CPU kernel's native boundary:

- each tensor is a plain tensor (no subclass), strided, without the negative or conjugate bit,
  inside its storage (a storage freed or shrunk, as FSDP does to unsharded parameters, is caught);
- the parameter is dense (its elements tile exactly ``numel`` consecutive elements: contiguous,
  channels-last, a transposed weight), on a device the kernel steps, of a dtype it takes
  (float32, bfloat16, float16; complex64 as pairs of float32);
- the gradient and each state tensor have the parameter's dtype, device, sizes and strides
  (strides compared where a size is not 1), so element k of each is the same element;
- the step counter is a one-element float32/float64 tensor, on the parameter's device (the kernel
  reads and writes it) or, without ``capturable``, on the CPU (the host increments it);
- no memory written by the step overlaps any other memory the step touches (a gradient aliasing
  its parameter, parameters viewing one buffer, a state tensor shared by two parameters);
- outside inference mode, nothing the step writes is an inference tensor (refused, as torch
  refuses in-place updates of them).

A record that fails goes to torch's path (``fused=None``) or raises, naming the tensor and the
reason (``fused=True``); either way before anything is written.

Tables (see kernel.py) are built once and kept in a :class:`TritonCache` owned by the caller,
keyed by the identity of the tensors that persist between steps (parameters, state, step
counters), like the CPU kernel's cache. Each step revalidates what the tables rely on — the data
pointer, dtype and element count of every persistent tensor, and every check above for the
gradients (new tensors each step, usually) — and rebuilds on any change. Tables go to the
device with non-blocking copies from pinned memory; the gradients' addresses are copied only when
they moved.
"""

from __future__ import annotations

import math
import operator
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat

import numpy as np
import torch
from torch import Tensor

from .. import inplace
from ..entries import EntryCache, PersistedEntry

__all__ = ["TritonCache", "Entry", "Launch", "build_entry", "DEVICE_TYPES", "KINDS"]

# Device types whose tensors the Triton backend steps. Tests add "cpu": CPU tensors then run
# through Triton's interpreter (see loader.py). Nothing else changes it.
DEVICE_TYPES: set[str] = {"cuda"}
# Device types whose step counters, though on the parameters' device, the host keeps (the path a
# CUDA parameter with CPU counters takes); tests add "cpu" to exercise it on CPU tensors.
HOST_STEP_DEVICES: set[str] = set()

# Storage formats of kernel.py, by dtype; complex64 is stepped as pairs of float32.
KINDS = {torch.float32: 0, torch.complex64: 0, torch.bfloat16: 1, torch.float16: 2}
_ELEMENT_BYTES = (4, 2, 2)
# Elements per program and per iteration of its loop; the tests shrink them to get many
# programs and both loop paths on small tensors.
CHUNK = 8192
BLOCK = 1024

_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))
_DTYPE, _SHAPE, _LAYOUT = (
    operator.attrgetter("dtype"),
    operator.attrgetter("shape"),
    operator.attrgetter("layout"),
)
_WHICH = ("parameter", "gradient", "square_avg", "grad_avg", "momentum_buffer", "step")

Lists6 = tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]


def explain(index: int, params: Sequence[Tensor], which: int, reason: str) -> str:
    """One refusal as a sentence naming the parameter, the tensor and the reason."""
    p = params[index]
    what = "the parameter" if which == 0 else f"its {_WHICH[which]}"
    return f"parameter {index} (shape {tuple(p.shape)}, {p.dtype} on {p.device}): {what} {reason}"


def _dense(t: Tensor) -> bool:
    """Its elements tile exactly numel consecutive elements (a permutation of the contiguous
    layout), so the kernel can walk its memory instead of its indices."""
    if t.is_contiguous():
        return True
    dims = sorted((stride, size) for size, stride in zip(t.shape, t.stride(), strict=True) if size != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _in_storage(t: Tensor) -> bool:
    """Its elements lie inside its storage (the storage may have been freed or shrunk since the
    tensor was made: FSDP frees unsharded parameters with storage().resize_(0))."""
    if t.numel() == 0:
        return True
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    end = (t.storage_offset() + extent) * t.element_size()
    return t.data_ptr() != 0 and end <= t.untyped_storage().nbytes()


def _same_layout(a: Tensor, b: Tensor) -> bool:
    """Same sizes, and the same strides wherever a size is not 1 (only those place elements)."""
    if a.shape != b.shape:
        return False
    return all(size == 1 or sa == sb for size, sa, sb in zip(a.shape, a.stride(), b.stride(), strict=True))


def _bits(x: float) -> int:
    """The float64 bit pattern of x, as the kernel's int64 argument."""
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _f32(x: float) -> float:
    """x rounded to float32 (to nearest even; beyond its range, infinity, as C's cast), as a
    Python float the kernel takes exactly."""
    with np.errstate(over="ignore"):
        return float(np.float32(x))


@dataclass
class Launch:
    """One kernel launch: the records of one (device, storage formats, step mode, alignment)."""

    device: torch.device
    p_kind: int
    s_kind: int
    step_mode: int  # 0: the host keeps the step counters; 1 / 2: float32 / float64 on the device
    aligned: bool
    indices: list[int]
    programs: int = 0
    table: Tensor | None = None
    blocks: Tensor | None = None
    chunks: Tensor | None = None
    counters: Tensor | None = None
    grads: Tensor | None = None
    grad_ptrs: list[int] = field(default_factory=list)
    host_steps: list[Tensor] = field(default_factory=list)  # step_mode 0: the counters the host keeps
    block: int = BLOCK
    chunk: int = CHUNK


class Entry(PersistedEntry):
    """Everything one call's tensors need between steps (see the module docstring)."""

    def __init__(self, persisted: tuple[Sequence[Tensor], ...]) -> None:
        super().__init__(persisted)  # params, square_avgs, grad_avgs, bufs, steps
        self.ptrs = [list(map(Tensor.data_ptr, lst)) if lst else None for lst in self.persisted]
        self.dtypes = [list(map(_DTYPE, lst)) if lst else None for lst in self.persisted]
        self.numels = [list(map(Tensor.numel, lst)) if lst else None for lst in self.persisted]
        params = self.persisted[0]
        self.shapes = list(map(Tensor.size, params))
        self.strides = list(map(Tensor.stride, params))
        self.devices = list(map(Tensor.get_device, params))
        self.has_complex = any(map(torch.is_complex, params))
        self.launches: list[Launch] = []
        self.excluded: dict[int, tuple[int, str]] = {}  # record -> (which tensor, reason)
        self.grad_caused = False  # an exclusion came from a gradient (it may differ next step)
        self.kernel_records: list[int] | None = None  # None: all of them
        # for following moved gradients without a rebuild (see follow_grads)
        self.grad_ptrs: list[int] = []  # the kernel records' gradients, as the launches have them
        self.grad_bytes = np.empty(0, dtype=np.int64)  # each kernel record's bytes
        self.element_bytes = np.empty(0, dtype=np.int64)
        self.written_starts = np.empty(0, dtype=np.int64)  # sorted, disjoint: validated so
        self.written_ends = np.empty(0, dtype=np.int64)

    def unchanged(self, persisted: tuple[Sequence[Tensor], ...]) -> bool:
        """Every persistent tensor has the data pointer, dtype and element count it had."""
        for k, lst in enumerate(persisted):
            if not lst:
                continue
            if (
                list(map(Tensor.data_ptr, lst)) != self.ptrs[k]
                or list(map(_DTYPE, lst)) != self.dtypes[k]
                or list(map(Tensor.numel, lst)) != self.numels[k]
            ):
                return False
        return True

    def leftovers(self) -> list[int]:
        return sorted(self.excluded)


class TritonCache(EntryCache):
    """The Triton backend's memory across steps; opaque to whoever holds it.

    It also keeps alive every device table a CUDA graph captured (a replay reads the addresses
    the capture saw), for as long as the cache lives: ``clear`` forgets the entries only."""

    def __init__(self) -> None:
        super().__init__()
        self.captured: list[object] = []


# ----------------------------------------------------------------------------- checks
def _tensor_problem(t: object, p: Tensor, same_dtype: bool = True) -> str | None:
    """Why a gradient or state tensor cannot go with its parameter, or None."""
    if not isinstance(t, Tensor):
        return "is missing"
    if type(t) not in _PLAIN:
        return "is a tensor subclass (only plain tensors reach the kernel)"
    if t.layout is not torch.strided:
        return "is not a strided tensor"
    if t.device != p.device:
        return f"is on {t.device}, the parameter on {p.device}"
    if same_dtype and t.dtype != p.dtype:
        return f"has dtype {t.dtype}, the parameter {p.dtype}"
    if t.is_neg() or t.is_conj():
        return "has its conjugate or negative bit set"
    if not _same_layout(t, p):
        return f"has sizes {tuple(t.shape)} and strides {t.stride()}, the parameter {tuple(p.shape)} and {p.stride()}"
    if not _in_storage(t):
        return "lies outside its storage (freed or shrunk?)"
    return None


def _param_problem(p: Tensor) -> str | None:
    if type(p) not in _PLAIN:
        return "is a tensor subclass (only plain tensors reach the kernel)"
    if p.device.type not in DEVICE_TYPES:
        return f"is on {p.device}: the Triton kernel steps {'/'.join(sorted(DEVICE_TYPES))} tensors"
    if p.dtype not in KINDS:
        return f"has dtype {p.dtype}: the Triton kernel takes float32, bfloat16, float16 and complex64"
    if p.layout is not torch.strided:
        return "is not a strided tensor"
    if p.is_neg() or p.is_conj():
        return "has its conjugate or negative bit set"
    if not _dense(p):
        return "has gaps or overlaps in memory (not a permutation of a contiguous layout)"
    if not _in_storage(p):
        return "lies outside its storage (freed or shrunk?)"
    return None


def step_mode(p: Tensor, step: Tensor) -> int | None:
    """0: the host keeps this counter; 1 / 2: the kernel, float32 / float64; None: neither."""
    if not isinstance(step, Tensor) or type(step) not in _PLAIN or step.numel() != 1:
        return None
    if step.dtype not in (torch.float32, torch.float64) or step.layout is not torch.strided:
        return None
    if step.device == p.device and p.device.type not in HOST_STEP_DEVICES:
        return 1 if step.dtype == torch.float32 else 2
    return 0 if step.is_cpu else None


def _spans(lists: Lists6, records: Sequence[int], grads_written: bool) -> tuple[np.ndarray, ...]:
    """Start, end, written flag and record of every nonempty span of memory the step touches.
    (numpy, not torch, for these small host-side arrays: torch's CPU ops wake its thread pool,
    which costs milliseconds on a loaded machine.)"""
    starts, ends, written, owners = array("q"), array("q"), array("b"), array("q")
    for i in records:
        for which, lst in enumerate(lists):
            if not lst:
                continue
            t = lst[i]
            n = t.numel()
            if n == 0:
                continue
            begin = t.data_ptr()
            starts.append(begin)
            ends.append(begin + n * t.element_size())
            written.append(which != 1 or grads_written)
            owners.append(i)
    return (
        np.array(starts, dtype=np.int64),
        np.array(ends, dtype=np.int64),
        np.array(written, dtype=bool),
        np.array(owners, dtype=np.int64),
    )


def _holders(ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each position: the furthest end among the spans before it (-1 for the first) and
    the position holding it."""
    reach = np.maximum.accumulate(ends)
    before = np.concatenate(([-1], reach[:-1]))
    new_max = np.where(ends >= before, np.arange(len(ends)), 0)
    holder = np.maximum.accumulate(new_max)
    return before, np.concatenate(([0], holder[:-1]))


def overlapping_records(lists: Lists6, records: Sequence[int], grads_written: bool) -> set[int]:
    """The records whose memory a written tensor shares with another tensor of the step: spans
    sorted by start; a written span starting before the furthest end of the spans before it,
    or any span starting before the furthest end of the written spans before it, overlaps —
    and both it and the record holding that furthest end are marked (as the CPU kernel does)."""
    starts, ends, written, owners = _spans(lists, records, grads_written)
    if len(starts) < 2:
        return set()
    order = np.argsort(starts, kind="stable")
    starts, ends, written, owners = starts[order], ends[order], written[order], owners[order]
    before_any, holder_any = _holders(ends)
    before_w, holder_w = _holders(np.where(written, ends, -1))
    clash_any = written & (starts < before_any)
    clash_w = ~written & (starts < before_w)
    if not (clash_any | clash_w).any():
        return set()
    marked = set(owners[clash_any | clash_w].tolist())
    marked |= set(owners[holder_any[clash_any]].tolist()) | set(owners[holder_w[clash_w]].tolist())
    return marked


def grads_problems(lists: Lists6, entry: Entry, records: list[int], grads_written: bool) -> dict[int, str]:
    """Per-step checks of the gradients against the cached parameters' description: only the
    records that fail, with the reason (an empty dict in a steady training loop)."""
    params, grads = lists[0], lists[1]
    idx = records
    sub = grads if len(idx) == len(grads) else [grads[i] for i in idx]
    fast = (
        set(map(type, sub)) <= _PLAIN
        and all(map(operator.is_, map(_LAYOUT, sub), repeat(torch.strided)))
        and not any(map(Tensor.is_neg, sub))
        and not (entry.has_complex and any(map(Tensor.is_conj, sub)))
    )
    if fast:
        if len(idx) == len(grads):
            same = (
                list(map(_DTYPE, sub)) == entry.dtypes[0]
                and list(map(Tensor.get_device, sub)) == entry.devices
                and list(map(Tensor.size, sub)) == entry.shapes
                and list(map(Tensor.stride, sub)) == entry.strides
            )
        else:
            same = all(
                g.dtype == entry.dtypes[0][i]
                and g.get_device() == entry.devices[i]
                and g.size() == entry.shapes[i]
                and g.stride() == entry.strides[i]
                for i, g in zip(idx, sub, strict=True)
            )
        if same:
            return {}
    problems = {}
    for i in idx:
        reason = _tensor_problem(grads[i], params[i])
        if reason is not None:
            problems[i] = reason
    return problems


# ----------------------------------------------------------------------------- tables
def _column(values: Sequence[int], dtype: torch.dtype) -> Tensor:
    code = "q" if dtype == torch.int64 else "i"
    return (
        torch.frombuffer(array(code, values), dtype=dtype).clone() if values else torch.empty(0, dtype=dtype)
    )


def upload(host: Tensor, device: torch.device, keep: list | None) -> Tensor:
    """A host tensor on the device: a non-blocking copy from pinned memory (the pinned buffer
    is kept in ``keep`` when a CUDA graph is being captured: a replay copies from it again)."""
    if device.type == "cpu":
        return host
    staged = host.pin_memory()
    out = staged.to(device, non_blocking=True)
    if keep is not None and torch.cuda.is_current_stream_capturing():
        keep.extend((staged, out))
    return out


def build_launch(launch: Launch, lists: Lists6, keep: list | None) -> None:
    """The launch's tables, on its device."""
    params, grads, square_avgs, grad_avgs, bufs, steps = lists
    idx = launch.indices
    launch.block, launch.chunk = BLOCK, CHUNK
    numels = [params[i].numel() * (2 if params[i].is_complex() else 1) for i in idx]
    chunks = [max(1, -(-n // launch.chunk)) for n in numels]
    rows: list[int] = [params[i].data_ptr() for i in idx]
    rows += [square_avgs[i].data_ptr() for i in idx]
    rows += [grad_avgs[i].data_ptr() for i in idx] if grad_avgs else [0] * len(idx)
    rows += [bufs[i].data_ptr() for i in idx] if bufs else [0] * len(idx)
    rows += [steps[i].data_ptr() for i in idx] if launch.step_mode else [0] * len(idx)
    rows += numels
    tensor_of = [k for k, c in enumerate(chunks) for _ in range(c)]
    chunk_of = [j for c in chunks for j in range(c)]
    launch.programs = len(tensor_of)
    launch.table = upload(_column(rows, torch.int64), launch.device, keep)
    launch.blocks = upload(_column(tensor_of + chunk_of, torch.int32), launch.device, keep)
    launch.chunks = upload(_column(chunks, torch.int32), launch.device, keep)
    launch.counters = torch.zeros(len(idx), dtype=torch.int32, device=launch.device)
    launch.grad_ptrs = [grads[i].data_ptr() for i in idx]
    launch.grads = upload(_column(launch.grad_ptrs, torch.int64), launch.device, keep)
    launch.host_steps = [steps[i] for i in idx] if launch.step_mode == 0 else []


def build_entry(
    lists: Lists6, *, grads_written: bool, keep: list | None
) -> tuple[Entry, dict[int, tuple[int, str]]]:
    """Check every record from scratch and build the launches of those that pass. Returns the
    entry and the refused records (record -> (which tensor, reason)). Raises RuntimeError for
    what no path may do (writing inference tensors)."""
    params, grads, square_avgs, grad_avgs, bufs, steps = lists
    n = len(params)
    persisted = (params, square_avgs, grad_avgs, bufs, steps)
    entry = Entry(persisted)
    if inplace.without_version_counter((params, square_avgs, grad_avgs, bufs, steps) + ((grads,) if grads_written else ())):
        raise RuntimeError(inplace.MESSAGE)
    refused: dict[int, tuple[int, str]] = {}
    modes: list[int | None] = [None] * n
    for i in range(n):
        p = params[i]
        reason = _param_problem(p)
        if reason is not None:
            refused[i] = (0, reason)
            continue
        for which, lst in ((2, square_avgs), (3, grad_avgs), (4, bufs), (1, grads)):
            if which in (3, 4) and not lst:
                continue
            reason = _tensor_problem(lst[i], p)
            if reason is not None:
                refused[i] = (which, reason)
                break
        if i in refused:
            continue
        mode = step_mode(p, steps[i])
        if mode is None:
            refused[i] = (5, f"is not a one-element float32/float64 tensor on {p.device} or the CPU")
            continue
        modes[i] = mode
    candidates = [i for i in range(n) if i not in refused]
    for i in overlapping_records(lists, candidates, grads_written):
        refused[i] = (0, "shares memory with another tensor this step touches")
    entry.excluded = refused
    entry.grad_caused = any(which == 1 for which, _ in refused.values())
    chosen = [i for i in candidates if i not in refused]
    entry.kernel_records = None if len(chosen) == n else chosen

    groups: dict[tuple, list[int]] = {}
    for i in chosen:
        p = params[i]
        kind = KINDS[p.dtype]
        size = _ELEMENT_BYTES[kind]
        aligned = (
            all((lst[i].data_ptr() % 16 == 0) for lst in (params, grads, square_avgs, grad_avgs, bufs) if lst)
            and size * BLOCK % 16 == 0
        )
        key = (p.device, kind, kind, modes[i], aligned)
        groups.setdefault(key, []).append(i)
    for (device, p_kind, s_kind, mode, aligned), indices in groups.items():
        launch = Launch(device, p_kind, s_kind, mode, aligned, indices)
        build_launch(launch, lists, keep)
        entry.launches.append(launch)
    entry.grad_ptrs = [grads[i].data_ptr() for i in chosen]
    entry.element_bytes = np.array([params[i].element_size() for i in chosen], dtype=np.int64)
    entry.grad_bytes = np.array([params[i].numel() for i in chosen], dtype=np.int64) * entry.element_bytes
    starts, ends, _, _ = _spans((params, [], square_avgs, grad_avgs, bufs, steps), chosen, False)
    order = np.argsort(starts)
    entry.written_starts, entry.written_ends = starts[order], ends[order]
    return entry, refused


def follow_grads(lists: Lists6, entry: Entry, grads_written: bool, keep: list | None) -> bool:
    """Point the cached launches at this step's gradients after checking them as a rebuild
    would: every per-step check of grads_problems, then — only if they moved — that they lie in
    their storage, are aligned where the launch assumes it, and share no memory with anything
    the step writes (vectorised: the written spans are sorted and disjoint, so a binary search
    per gradient finds any overlap). False: the caller rebuilds from scratch."""
    grads = lists[1]
    every = entry.kernel_records is None
    records = range(len(grads)) if every else entry.kernel_records
    if grads_problems(lists, entry, list(records), grads_written):
        return False
    sub = grads if every else [grads[i] for i in records]
    ptrs = list(map(Tensor.data_ptr, sub))
    if ptrs == entry.grad_ptrs:
        return True
    starts = np.array(ptrs, dtype=np.int64)
    ends = starts + entry.grad_bytes
    nonempty = entry.grad_bytes > 0
    storage_bytes = np.fromiter(
        map(torch.UntypedStorage.nbytes, map(Tensor.untyped_storage, sub)), np.int64, len(sub)
    )
    offsets = np.fromiter(map(Tensor.storage_offset, sub), np.int64, len(sub))
    # same layout as their dense parameters: each spans exactly its numel elements
    if (
        (offsets * entry.element_bytes + entry.grad_bytes > storage_bytes) | ((starts == 0) & nonempty)
    ).any():
        return False
    if grads_written and inplace.without_version_counter((sub,)):
        return False
    if len(entry.written_starts):
        last = np.searchsorted(entry.written_starts, ends, side="left") - 1
        hit = (last >= 0) & (entry.written_ends[np.maximum(last, 0)] > starts) & nonempty
        if hit.any():
            return False
    if grads_written and len(ptrs) > 1:  # unscaled in place: gradients must not share memory either
        s, e = starts[nonempty], ends[nonempty]
        order = np.argsort(s)
        s, e = s[order], e[order]
        if len(s) > 1 and (s[1:] < np.maximum.accumulate(e)[:-1]).any():
            return False
    misaligned = starts % 16 != 0
    position: dict[int, int] | None = None
    for launch in entry.launches:
        if len(launch.indices) == len(ptrs):
            mine, odd = ptrs, misaligned.any()
        else:
            if position is None:
                position = {r: k for k, r in enumerate(records)}
            where = [position[i] for i in launch.indices]
            mine, odd = [ptrs[k] for k in where], misaligned[where].any()
        if mine == launch.grad_ptrs:
            continue
        if launch.aligned and odd:
            return False
        launch.grad_ptrs = mine
        launch.grads = upload(_column(mine, torch.int64), launch.device, keep)
    entry.grad_ptrs = ptrs
    return True


def host_corrections(launch: Launch, alpha: float, keep: list | None) -> Tensor:
    """1 / (1 - alpha^t) for each host-kept counter t (already incremented), in float64 as the
    CPU kernel computes it (C's pow), rounded to float32; on the launch's device."""
    values = torch.stack([s.detach().reshape(()) for s in launch.host_steps]).double().tolist()
    memo: dict[float, float] = {}
    out = []
    for t in values:
        c = memo.get(t)
        if c is None:
            c = memo[t] = 1.0 / (1.0 - math.pow(alpha, t))
        out.append(c)
    return upload(torch.tensor(out, dtype=torch.float64).float(), launch.device, keep)


def scalars(rule, lr: float) -> dict[str, float | int]:
    """The kernel's scalar arguments for a number lr (see kernel.py)."""
    decoupled = rule.decoupled_weight_decay and rule.weight_decay != 0
    return {
        "lr": _f32(lr),
        "alpha": _f32(rule.alpha),
        "oma": _f32(1.0 - rule.alpha),
        "eps": _f32(rule.eps),
        "wd": _f32(rule.weight_decay),
        "decay": _f32(1.0 - lr * rule.weight_decay) if decoupled else 1.0,
        "mu": _f32(rule.momentum),
        "alpha_bits": _bits(rule.alpha),
        "wd_bits": _bits(rule.weight_decay),
    }
