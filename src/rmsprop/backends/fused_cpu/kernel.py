"""The fused CPU backend's entry: one native call per group walks every tensor once.

What reaches C is a column of TensorImpl addresses per list; the kernel reads each tensor's
current data pointer, size, dtype, device, layout and strides itself (see native.py) and refuses
— writing nothing — anything it cannot step exactly: another device, a dtype it does not take, a
gradient or state tensor whose sizes, strides or dtype differ from the parameter's, a step
counter that is not a one-element float32/float64 tensor, or memory shared between tensors the
step writes (a gradient aliasing its parameter, two parameters viewing one buffer), and — where
torch's is_neg / is_conj are found (native.READS_BITS) — a conjugate or negative bit. Python
adds what the kernel cannot tell: tensor subclasses, the bits where the kernel cannot read them
(both route the tensor to the torch path, which resolves them), inference tensors without a
version counter (refused outside inference mode, as torch refuses in-place updates of them), and
whether each tensor object still holds the TensorImpl the cached handles name (swap_tensors).

With ``fused=None`` whatever the kernel does not take goes to the torch path; with ``fused=True``
it raises, naming the tensor and the reason. Either way, everything is validated before the first
write, and the version counter of each tensor the kernel writes is bumped, as an in-place op
bumps it: by the kernel itself, between its validation and its first write, while it still has
the TensorImpls in the cache (through torch's own autograd functions, see native.py), or in
Python where those are missing.

In eager mode the step calls the library directly: a custom-op dispatch over thousands of tensors
would cost more than the kernel. Under ``torch.compile`` it calls the custom op
``rmsprop::fused_step`` (schema derived from the option table), whose implementation is the same
call, so dynamo sees one opaque op on every step.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ...options import OP_OPTIONS, OP_SCHEMA_ARGS, RULE_OPTIONS
from ...rule import Rule
from .. import inplace
from . import native
from .cache import Entry, FusedCache

__all__ = ["prepare", "ALL_KINDS", "default_kinds", "explain"]

Lists6 = tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]
TorchPath = Callable[[list[int]], Callable[[], None] | None]

ALL_KINDS = (1 << len(native.KINDS)) - 1
_FP16 = 1 << native.KINDS.index(torch.float16)


def default_kinds() -> int:
    """What fused=None sends to the kernel: everything, except float16 on a CPU without F16C —
    there the kernel's fp16 conversions are integer code, slower than torch's foreach path (16 vs
    9 ms for 10 x 1M); with F16C the kernel converts in registers and is faster than foreach."""
    return ALL_KINDS if native.LIB is not None and native.isa() in ("avx2+f16c", "avx512") else ALL_KINDS & ~_FP16
_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))
_WHICH = ("parameter", "gradient", "square_avg", "grad_avg", "momentum_buffer", "step")
# Status reasons (low 5 bits; the tensor is in the high 3): the C side's, and Python's own (13, 14).
_REASONS = {
    1: "is missing",
    2: "cannot be read through torch's C shim (a tensor without storage?)",
    3: "is not on the CPU",
    4: "is not a strided tensor",
    5: "has a dtype the kernel does not take here, or another than the parameter's",
    6: "has gaps or overlaps in memory (not a permutation of a contiguous layout)",
    7: "has other sizes or strides than the parameter",
    8: "is not a one-element float32/float64 CPU tensor",
    9: "shares memory with another tensor this step touches",
    10: "is float16, which the fused kernel takes only with fused=True on a CPU without F16C",
    11: "has more than 64 dimensions",
    12: "has elements past the end of its storage (was the storage resized under it?)",
    13: "is a tensor subclass (only plain tensors reach the kernel)",
    14: "has its conjugate or negative bit set",
    15: "is int8 state whose scales (<buffer>_scale) are missing, not a contiguous 1-D float32 tensor, or not "
        "one per block of 256 elements",
    16: "has a state format the fused kernel does not take for this parameter (it takes bf16 / int8 / float32 "
        "state of float32, bfloat16 and float16 parameters, bf16 and int8 only for contiguous ones)",
}
_ST_SUBCLASS, _ST_BITS = 13, 14
_REASON_MASK, _WHICH_SHIFT = 0x1F, 5
# What no path can step (a tensor torch itself cannot read, elements past the storage's end): an
# error even with fused=None, where anything else the kernel declines goes to torch's path.
_FATAL = frozenset((1, 2, 12))


def explain(status: int, index: int, params: Sequence[Tensor]) -> str:
    """One status as a sentence naming the parameter, the tensor and the reason."""
    reason, which = status & _REASON_MASK, status >> _WHICH_SHIFT
    p = params[index]
    what = "the parameter" if which == 0 else f"its {_WHICH[which]}"
    return (
        f"parameter {index} (shape {tuple(p.shape)}, {p.dtype} on {p.device}): {what} "
        f"{_REASONS.get(reason, f'failed check {reason}')}"
    )


def _scalar(t: Tensor | None, as_flag: bool = False) -> tuple[Tensor | None, ctypes.Array | None]:
    """A one-element float32 CPU copy for the kernel; ``as_flag``: 1.0 where ``t`` is nonzero in
    its own dtype (a float64 found_inf of 1e-50 is an inf found, as on torch's path)."""
    if t is None:
        return None, None
    t = t.detach().resolve_neg()  # (the kernel reads raw memory, and refuses a lazily negated view)
    t = (t != 0) if as_flag else t
    t = t.to(device="cpu", dtype=torch.float32).reshape(()).contiguous()
    return t, native.handles([t])


class _Call:
    """One native call's arguments, and everything that must stay alive while C reads them."""

    def __init__(self, lr: float, rule: Rule, kinds: int, grad_scale, found_inf) -> None:
        self.scale, self.scale_handle = _scalar(grad_scale)
        self.inf, self.inf_handle = _scalar(found_inf, as_flag=True)
        self.struct = native.Call(
            lr=lr,
            **{o.name: _to_c(o, getattr(rule, o.name)) for o in RULE_OPTIONS},
            dtype_mask=kinds,
            write_back=1,
            grad_scale=self.scale_handle.buffer_info()[0] if self.scale_handle is not None else None,
            found_inf=self.inf_handle.buffer_info()[0] if self.inf_handle is not None else None,
            bump_versions=native.BUMPS_VERSIONS,
        )

    def invoke(self, columns, grad_column, n: int, mode: int, records: int, status: bytearray) -> int:
        def address(column):
            return column.buffer_info()[0] if column is not None else None

        persisted = [address(c) for c in columns] + [None] * (8 - len(columns))
        lists = native.Lists(
            param=persisted[0],
            grad=address(grad_column),
            square_avg=persisted[1],
            grad_avg=persisted[2],
            momentum_buffer=persisted[3],
            step=persisted[4],
            square_avg_scale=persisted[5],
            grad_avg_scale=persisted[6],
            momentum_buffer_scale=persisted[7],
        )
        self.struct.mode = mode
        bad = ctypes.c_int64(-1)
        return native.LIB.rmsprop_step(
            ctypes.byref(lists),
            n,
            ctypes.byref(self.struct),
            torch.get_num_threads(),
            records,
            native.buffer_address(status),
            ctypes.byref(bad),
        )


def _to_c(option, value):
    """A Rule field as the C struct holds it (state_dtype as its code)."""
    return native.STATE_DTYPE_CODES[value] if option.kind == "state_dtype" else value


def _python_exclusions(
    lists: Lists6, status: bytearray, grads_only: bool = False, conj: bool = True, scales=(), types: bool = True
) -> None:
    """Mark (in ``status``) the records Python must keep from the kernel: subclasses and, where
    the kernel cannot read them itself (native.READS_BITS), tensors with a negative or
    (``conj``: only complex tensors can have it) conjugate bit. Runs as map() over each list: no
    bytecode per tensor. ``scales``: the int8 scales lists (None entries where a record has
    none), reported as their buffer's. ``types=False``: the lists are known to hold plain
    tensors only (read so in C), and only the bits are checked."""
    bits = not native.READS_BITS
    if not grads_only:
        for which, tensors in zip((2, 3, 4), scales, strict=False):
            for i, t in enumerate(tensors):
                if t is not None and not status[i] and (type(t) not in _PLAIN or (bits and t.is_neg())):
                    status[i] = (_ST_SUBCLASS if type(t) not in _PLAIN else _ST_BITS) | (which << _WHICH_SHIFT)
    for which, tensors in enumerate(lists):
        if not tensors or (grads_only and which != 1):
            continue
        if types and not set(map(type, tensors)) <= _PLAIN:
            for i, t in enumerate(tensors):
                if type(t) not in _PLAIN and not status[i]:
                    status[i] = _ST_SUBCLASS | (which << _WHICH_SHIFT)
        if not bits:
            continue
        if any(map(Tensor.is_neg, tensors)) or (conj and any(map(Tensor.is_conj, tensors))):
            for i, t in enumerate(tensors):
                if (t.is_neg() or t.is_conj()) and not status[i]:
                    status[i] = _ST_BITS | (which << _WHICH_SHIFT)


def _bits_set(persisted, has_complex: bool) -> bool:
    for tensors in persisted:
        if tensors and (any(t is not None and t.is_neg() for t in tensors)
                        or (has_complex and any(t is not None and t.is_conj() for t in tensors))):  # fmt: skip
            return True
    return False


_NEEDED = {"grads": lambda r: True, "square_avgs": lambda r: True, "steps": lambda r: True,
           "grad_avgs": lambda r: r.centered, "momentum_buffers": lambda r: r.momentum > 0}  # fmt: skip


def _check_lists(lists: Lists6, rule: Rule) -> None:
    """Every list the rule needs holds one tensor per parameter (C reads that many)."""
    n = len(lists[0])
    names = ("grads", "square_avgs", "grad_avgs", "momentum_buffers", "steps")
    for name, lst in zip(names, lists[1:], strict=True):
        if (_NEEDED[name](rule) or lst) and len(lst) != n:
            raise ValueError(f"fused RMSprop: {name} has {len(lst)} tensors for {n} parameters")


def _check_types(lists: Lists6) -> None:
    for name, lst in zip(_WHICH, lists, strict=True):
        if not all(map(isinstance, lst, [Tensor] * len(lst))):
            i = next(i for i, t in enumerate(lst) if not isinstance(t, Tensor))
            raise RuntimeError(
                f"parameter {i}: its {name} is a {type(lst[i]).__name__}, not a tensor; nothing was updated"
            )


def _check_scale_types(scale_lists) -> None:
    """The int8 scales: a tensor or None per record (C reads each non-zero handle as a tensor)."""
    for which, lst in zip(_WHICH[2:5], scale_lists, strict=False):
        for i, t in enumerate(lst):
            if t is not None and not isinstance(t, Tensor):
                raise RuntimeError(
                    f"parameter {i}: the int8 scales of its {which} are a {type(t).__name__}, not a tensor; "
                    "nothing was updated"
                )


def _check_inference(written: Sequence[Sequence[Tensor]]) -> None:
    """torch refuses in-place updates of inference tensors outside inference mode; so do we,
    before anything is written (see backends/inplace.py)."""
    if inplace.without_version_counter(written):
        raise RuntimeError(inplace.MESSAGE)


def _bump_versions(lists: Lists6, indices: list[int] | None, grads_written: bool) -> None:
    """Every tensor the kernel wrote gets its version counter bumped, as an in-place op would,
    so autograd notices a saved tensor that changed (where the kernel cannot bump them itself)."""
    for which, tensors in enumerate(lists):
        if not tensors or (which == 1 and not grads_written):
            continue
        torch.autograd.graph.increment_version(tensors if indices is None else [tensors[i] for i in indices])


def prepare(
    lists: Lists6,
    *,
    lr: float,
    rule: Rule,
    kinds: int,
    required: bool,
    cache: FusedCache | None,
    torch_path: TorchPath,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    check_now: bool = True,
    scales: tuple[list, list, list] | None = None,
) -> Callable[[], None]:
    """Validate one call's tensors for the kernel and return the step that runs it.

    ``kinds``: the element kinds the kernel may take (a bit mask of native.KINDS). ``required``
    (fused=True): a record the kernel does not take raises RuntimeError; otherwise it goes to
    ``torch_path(indices)``, which validates those records for torch's paths (raising if they
    are invalid anywhere) and returns their step. With ``check_now`` everything is validated
    here, natively too, so that the caller can validate several groups before running any;
    without it the native validation happens inside the returned step, which still writes
    nothing unless every tensor passes (the caller must not have written anything of this step
    that a failure would leave half-applied). ``scales``: the int8 scales of square_avg /
    grad_var, grad_avg and momentum_buffer (lists aligned with the parameters, None where a
    record's state is not int8), with ``rule.state_dtype`` set.
    """
    _check_lists(lists, rule)
    params, grads, square_avgs, grad_avgs, momentum_buffers, steps = lists
    n = len(params)
    scale_lists = tuple(lst for lst in scales) if scales is not None and any(scales) else ()
    if scale_lists:
        scale_lists = tuple(lst if lst else [None] * n for lst in scale_lists)
        if len(scale_lists) != 3 or any(len(lst) != n for lst in scale_lists):
            raise ValueError(f"fused RMSprop: the int8 scales must be three lists of {n} entries (tensors or None)")
    persisted = (params, square_avgs, grad_avgs, momentum_buffers, steps, *scale_lists)
    call = _Call(lr, rule, kinds, grad_scale, found_inf)
    grads_written = grad_scale is not None
    entry = cache.lookup(persisted) if cache is not None else None
    if entry is not None and (entry.kinds, entry.required) != (kinds, required):
        entry = None

    grad_column, plain_grads = native.list_handles(grads)
    grad_status = bytearray(n)
    _python_exclusions(
        lists, grad_status, grads_only=True, conj=entry is None or entry.has_complex, types=not plain_grads
    )
    if entry is not None:
        # `t.data = t.data.conj()` (or the private _neg_view) keeps the object and its address:
        # the bits are the one thing the kernel's memory of the last step cannot see change.
        # Where the kernel reads them it checks every tensor's on every step; else Python checks
        # them here, on every persistent tensor (parameters, state, step counters, scales).
        if not native.READS_BITS and _bits_set(persisted, entry.has_complex):
            entry = None
        elif grads_written:
            _check_inference([grads])  # unscaled in place

    def full() -> tuple[Entry, Callable[[], None] | None, list[int]]:
        """Validate everything from scratch: Python's checks, then the kernel's."""
        written = [params, square_avgs, grad_avgs, momentum_buffers, steps] + (
            [grads] if grads_written else []
        )
        _check_types(lists)
        _check_scale_types(scale_lists)
        _check_inference(written + [[t for t in lst if t is not None] for lst in scale_lists])
        has_complex = any(map(torch.is_complex, params))
        fresh = Entry(persisted, has_complex, kinds, required)
        status = bytearray(n)
        _python_exclusions(lists, status, scales=scale_lists)
        rc = call.invoke(fresh.columns, grad_column, n, native.MODE_CHECK, fresh.records_address, status)
        if rc not in (native.OK, native.INVALID):
            raise RuntimeError(f"fused RMSprop kernel failed: {native.ERRORS.get(rc, rc)}")
        first_bad = next((i for i, s in enumerate(status) if s), None)
        if required and first_bad is not None:
            raise RuntimeError(
                f"fused=True: {explain(status[first_bad], first_bad, params)}; nothing was updated"
            )
        fatal = next((i for i, s in enumerate(status) if s & _REASON_MASK in _FATAL), None)
        if fatal is not None:
            raise RuntimeError(f"RMSprop: {explain(status[fatal], fatal, params)}; nothing was updated")
        fresh.excluded = status
        fresh.grad_caused = any(s and (s >> _WHICH_SHIFT) == 1 for s in status)
        leftovers = fresh.leftovers()
        rest = torch_path(leftovers) if leftovers else None
        if cache is not None:
            cache.store(fresh)
        return fresh, rest, leftovers

    def launch(chosen: Entry, rest, leftovers: list[int], mode: int) -> bool:
        """Run the kernel on the chosen entry's records; False when the kernel asks for the full
        path (a persistent tensor changed) — nothing has been written then."""
        status = bytearray(chosen.excluded)
        rc = call.invoke(chosen.columns, grad_column, n, mode, chosen.records_address, status)
        if rc == native.CHANGED:
            return False
        if rc == native.INVALID:
            first = next(i for i, s in enumerate(status) if s and not chosen.excluded[i])
            raise RuntimeError(f"fused RMSprop: {explain(status[first], first, params)}; nothing was updated")
        if rc not in (native.OK, native.SKIPPED):
            raise RuntimeError(f"fused RMSprop kernel failed: {native.ERRORS.get(rc, rc)}")
        if rc == native.OK and len(leftovers) < n and not call.struct.bump_versions:
            kernel_records = None if not leftovers else sorted(set(range(n)) - set(leftovers))
            _bump_versions(lists, kernel_records, grads_written)
            for lst in scale_lists:
                chosen = lst if kernel_records is None else [lst[i] for i in kernel_records]
                written_scales = [t for t in chosen if t is not None]
                if written_scales:
                    torch.autograd.graph.increment_version(written_scales)
        if rest is not None:
            rest()
        return True

    fast = entry is not None and not any(grad_status) and not entry.grad_caused
    if fast:
        leftovers = entry.leftovers()
        rest = torch_path(leftovers) if leftovers else None
        if check_now:
            status = bytearray(entry.excluded)
            mode = native.MODE_CHECK | native.REQUIRE_UNCHANGED
            rc = call.invoke(entry.columns, grad_column, n, mode, entry.records_address, status)
            if rc == native.OK:
                return lambda: launch(entry, rest, leftovers, native.MODE_RUN) or _unreachable()
        else:

            def run_fast() -> None:
                if not launch(entry, rest, leftovers, native.MODE_RUN | native.REQUIRE_UNCHANGED):
                    chosen, rest2, leftovers2 = full()
                    launch(chosen, rest2, leftovers2, native.MODE_RUN) or _unreachable()

            return run_fast

    chosen, rest, leftovers = full()
    return lambda: launch(chosen, rest, leftovers, native.MODE_RUN) or _unreachable()


def _unreachable() -> None:
    raise RuntimeError("fused RMSprop: the kernel reported a change between validation and the step")


# ----------------------------------------------------------------------------- torch.compile
_LIST_ARGS = ("params", "grads", "square_avgs", "grad_avgs", "momentum_buffers", "steps")
_SCHEMA = (
    "("
    + ", ".join(f"Tensor({chr(97 + i)}!)[] {name}" for i, name in enumerate(_LIST_ARGS))
    + ", Tensor lr, "
    + OP_SCHEMA_ARGS
    + ", int kinds, bool required, Tensor? grad_scale, Tensor? found_inf) -> ()"
)
torch.library.define("rmsprop::fused_step", _SCHEMA)


@torch.library.impl("rmsprop::fused_step", "CompositeExplicitAutograd")
def _fused_step_impl(params, grads, square_avgs, grad_avgs, momentum_buffers, steps, lr, *args):
    """The op's body, run eagerly: the same validation and kernel call as the eager path (no
    cache). ``required`` is the user's fused=True; without it, what the kernel declines (memory
    shared between tensors, a conjugate bit...) takes torch's foreach path here, as in eager."""
    rule_values, (kinds, required, grad_scale, found_inf) = args[: len(OP_OPTIONS)], args[len(OP_OPTIONS) :]
    rule = Rule(**{o.name: v for o, v in zip(OP_OPTIONS, rule_values, strict=True)})
    lists = (
        list(params),
        list(grads),
        list(square_avgs),
        list(grad_avgs),
        list(momentum_buffers),
        list(steps),
    )

    def torch_path(indices: list[int]):
        from ... import functional

        return functional.leftover_step(lists, indices, lr=lr, rule=rule, grad_scale=grad_scale, found_inf=found_inf)

    prepare(
        lists,
        lr=float(lr),
        rule=rule,
        kinds=kinds,
        required=required,
        cache=None,
        torch_path=torch_path,
        grad_scale=grad_scale,
        found_inf=found_inf,
        check_now=False,
    )()


@torch.library.register_fake("rmsprop::fused_step")
def _fused_step_fake(*args) -> None:
    return None


def compiled_step(lists: Lists6, *, lr, rule: Rule, kinds: int, required: bool, grad_scale, found_inf) -> None:
    """The step as dynamo should see it: one call of the custom op, lr as a tensor (a float lr
    is still a constant of the graph: dynamo guards on it, as it does for torch's optimizers)."""
    if rule.state_dtype is not None:  # (functional routes those elsewhere; the op has no such argument)
        raise RuntimeError("the fused_step op steps state in torch's format only (state_dtype=None)")
    lr_tensor = lr if isinstance(lr, Tensor) else torch.tensor(lr, dtype=torch.float64)
    torch.ops.rmsprop.fused_step(
        *lists, lr_tensor, *(getattr(rule, o.name) for o in OP_OPTIONS), kinds, required, grad_scale, found_inf
    )


def compile_eligible(param: Tensor, others: Sequence[Tensor], kinds: int) -> bool:
    """What the compiled path sends to the kernel, decided from what dynamo can guard on."""
    if type(param) not in _PLAIN or not param.is_cpu or param.dtype not in native.KINDS:
        return False
    if not (kinds >> native.KINDS.index(param.dtype)) & 1 or not param.is_contiguous():
        return False
    return all(
        type(t) in _PLAIN and t.dtype == param.dtype and t.is_contiguous() and t.shape == param.shape
        for t in others
    )
