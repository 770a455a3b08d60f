"""The fused Triton kernel as a backend: one launch per (group, device, dtype) for CUDA tensors.

- ``kernel.py``: the Triton kernel (every option of the Rule; fp32/bf16/fp16 storage, fp32 math).
- ``loader.py``: imports triton lazily (a CPU-only install never does) and loads the kernel,
  compiled for CUDA tensors or under Triton's interpreter for CPU tensors.
- ``plan.py``: the checks before any launch, the address tables, and :class:`TritonCache`.
- this module: :func:`prepare` (validate, then return the step), the custom op
  ``rmsprop::triton_step`` for torch.compile.

Dispatch (``rmsprop.functional.prepare``): ``fused=None`` takes this backend for CUDA tensors
when triton imports, ``fused=True`` requires it; what it does not take goes to torch's path
(``fused=None``) or raises before anything is written (``fused=True``).

A step makes no host synchronisation: the lr may be a tensor on the device (read by the kernel),
step counters on the device are read and written by the kernel, GradScaler's ``found_inf`` is
read by the kernel (every program returns at once when it is set) and ``grad_scale`` too. The
exceptions are stated where they happen: step counters on the CPU (torch's default without
``capturable``) are incremented by the host, which must then read ``found_inf`` (one sync) to
know whether to. With ``capturable=True`` counters must be on the device, and the step can be
captured in a CUDA graph: tables built during a capture are kept alive by the cache, and a CPU
tensor lr (whose value a replay would not see) is refused under capture.

Tests route CPU tensors here by adding "cpu" to :data:`plan.DEVICE_TYPES`; the kernel then runs
under Triton's interpreter (the same one ``TRITON_INTERPRET=1`` selects).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor

from ...options import OP_OPTIONS, OP_SCHEMA_ARGS
from ...rule import Rule
from . import loader, plan
from .loader import available_under_compile, is_available, load_error
from .plan import TritonCache, explain

__all__ = [
    "prepare",
    "takes",
    "is_available",
    "available_under_compile",
    "load_error",
    "TritonCache",
    "compiled_step",
    "compile_eligible",
]

Lists6 = plan.Lists6
TorchPath = Callable[[list[int]], Callable[[], None] | None]
_NUM_WARPS = 4
# Device tables made while a CUDA graph was being captured through the custom op (which has no
# cache of its caller's): a replay reads them, so they live as long as the process.
_CAPTURED_BY_OP: list[object] = []


def takes(p: Tensor) -> bool:
    """Whether ``p``'s device is one this backend steps (CUDA; also CPU in the tests)."""
    return p.device.type in plan.DEVICE_TYPES


def _cache_of(cache) -> TritonCache | None:
    """The TritonCache inside the caller's cache object (the optimizer carries one
    ``FusedCache`` for every fused backend), or the cache itself."""
    if cache is None or isinstance(cache, TritonCache):
        return cache
    others = cache.others
    found = others.get("triton")
    if found is None:
        found = others["triton"] = TritonCache()
    return found


def _on(t: Tensor | None, device: torch.device, dtypes=(torch.float32,)) -> Tensor | None:
    """``t`` on the launch's device in a dtype the kernel reads (a device-side copy if not)."""
    if t is None:
        return None
    t = t.detach()
    if t.device != device or t.dtype not in dtypes:
        t = t.to(device=device, dtype=t.dtype if t.dtype in dtypes else torch.float32, non_blocking=True)
    return t


def prepare(
    lists: Lists6,
    *,
    lr: float | Tensor,
    rule: Rule,
    capturable: bool,
    required: bool,
    cache,
    torch_path: TorchPath,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> Callable[[], None]:
    """Validate one call's tensors for the kernel and return the step that launches it.

    ``required`` (fused=True): a record the kernel does not take raises RuntimeError; otherwise
    it goes to ``torch_path(indices)``, which validates those records for torch's paths and
    returns their step. Everything is validated here; the returned step only launches (and runs
    the torch path's share), so a caller may validate several groups before running any.
    """
    if rule.state_dtype is not None:  # loader.ROUTED_ELSEWHERE: a caller's error, not the user's
        raise RuntimeError(f"the Triton kernel stores torch's state format only, not state_dtype={rule.state_dtype!r}")
    params, grads, square_avgs, grad_avgs, bufs, steps = lists
    persisted = (params, square_avgs, grad_avgs, bufs, steps)
    grads_written = grad_scale is not None
    tcache = _cache_of(cache)
    keep = tcache.captured if tcache is not None else _CAPTURED_BY_OP
    entry = tcache.lookup(persisted) if tcache is not None else None
    if entry is not None and (
        entry.grad_caused
        or not entry.unchanged(persisted)
        or not plan.follow_grads(lists, entry, grads_written, keep)
    ):
        entry = None
    if entry is None:
        entry, refused = plan.build_entry(lists, grads_written=grads_written, keep=keep)
        if required and refused:
            first = min(refused)
            which, reason = refused[first]
            raise RuntimeError(f"fused=True: {explain(first, params, which, reason)}; nothing was updated")
        if tcache is not None:
            tcache.store(entry)
    if capturable and any(la.step_mode == 0 for la in entry.launches):
        first = min(i for la in entry.launches if la.step_mode == 0 for i in la.indices)
        raise RuntimeError(
            f"capturable=True: parameter {first}'s step counter is on {steps[first].device}, the parameter on "
            f"{params[first].device}; capturable steps keep their counters on the parameters' device; "
            "nothing was updated"
        )
    leftovers = entry.leftovers()
    rest = torch_path(leftovers) if leftovers else None

    lr_tensor: Tensor | None = None
    lr_value = 0.0
    if isinstance(lr, Tensor) and not (lr.is_cpu and any(la.device.type != "cpu" for la in entry.launches)):
        lr_tensor = lr  # read by the kernel (copied to the launch's device first if elsewhere)
    else:
        if isinstance(lr, Tensor) and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "capturable: the lr is a CPU tensor, whose later values a replay of the captured step "
                "would not see; put it on the parameters' device; nothing was updated"
            )
        lr_value = float(lr)  # a number, or a CPU tensor read on the host (no device sync)
    args = plan.scalars(rule, lr_value)
    launches = entry.launches
    flags = _flags(rule)

    def run() -> None:
        if not launches:
            if rest is not None:
                rest()
            return
        host_kept = [la for la in launches if la.step_mode == 0]
        inf_on_device = found_inf
        if host_kept and found_inf is not None:
            # the host must know whether to count the step: one read of found_inf
            if found_inf.item() != 0:
                return
            inf_on_device = None
        if host_kept:
            counters = [s for la in host_kept for s in la.host_steps]
            torch._foreach_add_(counters, 1.0)
        for launch in launches:
            _launch(launch, rule, flags, args, lr_tensor, grad_scale, inf_on_device, keep)
            _bump_versions(lists, launch, grads_written)
        if rest is not None:
            rest()

    return run


def _flags(rule: Rule) -> dict[str, object]:
    wd = rule.weight_decay != 0
    return {
        "CENTERED": bool(rule.centered),
        "MOMENTUM": 0 if rule.momentum == 0 else (2 if rule.nesterov else 1),
        "EPS_IN_SQRT": bool(rule.eps_in_sqrt),
        "COUPLED": wd and not rule.decoupled_weight_decay,
        "DECOUPLED": wd and bool(rule.decoupled_weight_decay),
        "BIAS": bool(rule.bias_correction),
        "MAXIMIZE": bool(rule.maximize),
        "LR_IN_MOMENTUM": bool(rule.lr_in_momentum),
    }


def _launch(launch: plan.Launch, rule: Rule, flags, args, lr_tensor, grad_scale, found_inf, keep) -> None:
    import triton.language as tl

    types = (tl.float32, tl.uint16, tl.float16)
    device = launch.device
    corrections = None
    if flags["BIAS"] and launch.step_mode == 0:
        corrections = plan.host_corrections(launch, rule.alpha, keep)
    lr_ptr = _on(lr_tensor, device, (torch.float32, torch.float64))
    scale = _on(grad_scale, device)
    inf = _on(found_inf, device, (torch.float32, torch.float64, torch.int32, torch.int64, torch.bool))
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        keep.extend((launch.table, launch.grads, launch.blocks, launch.chunks, launch.counters, corrections))
    kernel = loader.kernel(interpret=device.type == "cpu")
    call = kernel[(launch.programs,)]
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        call(
            launch.table, launch.grads, launch.blocks, launch.chunks, launch.counters, corrections,
            lr_ptr, scale, inf, len(launch.indices), launch.programs, **args,
            P=launch.p_kind, P_TYPE=types[launch.p_kind], S=launch.s_kind, S_TYPE=types[launch.s_kind],
            STEP=launch.step_mode, **flags, LR_TENSOR=lr_ptr is not None, HAS_SCALE=scale is not None,
            HAS_INF=inf is not None, ALIGNED=launch.aligned, BLOCK=launch.block, CHUNK=launch.chunk,
            num_warps=_NUM_WARPS, enable_fp_fusion=False,
        )  # fmt: skip


def _bump_versions(lists: Lists6, launch: plan.Launch, grads_written: bool) -> None:
    """Every tensor the kernel wrote gets its version counter bumped, as an in-place op would,
    so autograd notices a saved tensor that changed (counters the host keeps were bumped by
    their own in-place add)."""
    everything = len(launch.indices) == len(lists[0])
    for which, tensors in enumerate(lists):
        if not tensors or (which == 1 and not grads_written) or (which == 5 and launch.step_mode == 0):
            continue
        torch.autograd.graph.increment_version(
            tensors if everything else [tensors[i] for i in launch.indices]
        )


# ----------------------------------------------------------------------------- torch.compile
_LIST_ARGS = ("params", "grads", "square_avgs", "grad_avgs", "momentum_buffers", "steps")
_SCHEMA = (
    "("
    + ", ".join(f"Tensor({chr(97 + i)}!)[] {name}" for i, name in enumerate(_LIST_ARGS))
    + ", Tensor lr, "
    + OP_SCHEMA_ARGS
    + ", Tensor? grad_scale, Tensor? found_inf) -> ()"
)
torch.library.define("rmsprop::triton_step", _SCHEMA)


@torch.library.impl("rmsprop::triton_step", "CompositeExplicitAutograd")
def _triton_step_impl(params, grads, square_avgs, grad_avgs, momentum_buffers, steps, lr, *args):
    rule_values, (grad_scale, found_inf) = args[: len(OP_OPTIONS)], args[len(OP_OPTIONS) :]
    rule = Rule(**{o.name: v for o, v in zip(OP_OPTIONS, rule_values, strict=True)})
    lists = tuple(list(x) for x in (params, grads, square_avgs, grad_avgs, momentum_buffers, steps))

    def refuse(indices: list[int]):
        raise RuntimeError(
            f"rmsprop::triton_step: {len(indices)} tensors the kernel cannot take reached the compiled op"
        )

    prepare(
        lists,  # type: ignore[arg-type]
        lr=lr,
        rule=rule,
        capturable=False,
        required=True,
        cache=None,
        torch_path=refuse,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )()


@torch.library.register_fake("rmsprop::triton_step")
def _triton_step_fake(*args) -> None:
    return None


def compiled_step(lists: Lists6, *, lr, rule: Rule, grad_scale, found_inf) -> None:
    """The step as dynamo should see it: one call of the custom op, lr as a tensor (a float lr
    is a constant of the graph, guarded on, as for torch's optimizers)."""
    lr_tensor = lr if isinstance(lr, Tensor) else torch.tensor(lr, dtype=torch.float64)
    torch.ops.rmsprop.triton_step(
        *lists, lr_tensor, *(getattr(rule, o.name) for o in OP_OPTIONS), grad_scale, found_inf
    )


def compile_eligible(param: Tensor, others: Sequence[Tensor]) -> bool:
    """What the compiled path sends to the kernel, decided from what dynamo can guard on."""
    if type(param) not in plan._PLAIN or not takes(param) or param.dtype not in plan.KINDS:
        return False
    if not param.is_contiguous():
        return False
    return all(
        type(t) in plan._PLAIN and t.dtype == param.dtype and t.is_contiguous() and t.shape == param.shape
        for t in others
    )
