"""The fused CPU kernel: presence, ABI, dtypes, sizes, layouts, AMP, fallback, the cache.

Its agreement with the float64 reference for every combination of options is in
test_reference.py (the "fused" backend there); its refusals of bad input are the subprocess
probes of test_probes.py; torch.compile is in test_integration.py.
"""

from __future__ import annotations

import array
import copy
import ctypes
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from cases import HALF_ULP, NAMED
from helpers import ISA_LEVELS, ISA_PRESENT, make_grads, make_params, run, spy_kernel
from hypothesis import given, settings
from hypothesis import strategies as st

import rmsprop
import rmsprop.functional
from rmsprop.backends import fused_cpu
from rmsprop.backends.fused_cpu import native
from rmsprop.reference import ReferenceRMSprop, run_reference

FULL = NAMED["full"]


def test_native_kernel_is_built_and_loaded():
    """Never skip: a suite that silently tested foreach instead would hide a broken build."""
    assert fused_cpu.is_available(), fused_cpu.load_error()
    override = os.environ.get("RMSPROP_NATIVE_LIB")
    if override:  # scripts/sanitize.sh: the sanitizer build must be the one under test
        assert native._library_path() == override


def test_abi_check_refuses_a_struct_that_does_not_match():
    """The loader compares every field the C side exports with its ctypes twin."""
    assert native._check_layout(native.LIB, 0, native.Call, "rms_call") is None

    class Missing(ctypes.Structure):  # the call struct without its last switch
        _fields_ = [f for f in native.Call._fields_ if f[0] != "bias_correction"]

    problem = native._check_layout(native.LIB, 0, Missing, "rms_call")
    assert problem is not None and "bias_correction" in problem


def test_a_different_abi_version_is_refused(monkeypatch):
    monkeypatch.setattr(native, "ABI_VERSION", native.ABI_VERSION + 1)
    lib, error = native._load()
    assert lib is None and "different version" in error


def test_fp16_is_fused_by_default_where_the_cpu_converts_it_in_registers(monkeypatch):
    calls = spy_kernel(monkeypatch)
    params = [torch.randn(10, dtype=torch.float16, requires_grad=True), torch.randn(10, requires_grad=True)]
    grads = make_grads(params, 2)
    run(lambda p: rmsprop.RMSprop(p), params, grads)
    assert calls == ([2, 2] if native.isa() in ("avx2+f16c", "avx512") else [1, 1])
    calls.clear()
    native.use_isa("portable")  # the kernel's integer fp16 code: slower than foreach, so not chosen
    try:
        run(lambda p: rmsprop.RMSprop(p), params, grads)
        assert calls == [1, 1]
        calls.clear()
        run(lambda p: rmsprop.RMSprop(p, fused=True), params, grads)
        assert calls == [2, 2]
    finally:
        native.use_isa("best")


def test_default_on_cpu_is_the_fused_kernel(monkeypatch):
    calls = spy_kernel(monkeypatch)
    params = make_params()
    run(lambda p: rmsprop.RMSprop(p), params, make_grads(params, 3))
    assert calls == [len(params)] * 3  # one native call per group per step, every tensor in it


@pytest.mark.parametrize("dtype", list(HALF_ULP), ids=str)
@pytest.mark.parametrize("options", [{}, FULL, {"momentum": 0.9, "nesterov": True, "eps_in_sqrt": True}])
def test_low_precision_within_one_rounding(dtype, options, isa):
    """fp32 math, one rounding per stored value: every output is within half a ulp of the exact
    result of the same inputs (plus fp32's own error, far smaller)."""
    half_ulp = HALF_ULP[dtype]
    gen = torch.Generator().manual_seed(0)
    n = 4099  # not a multiple of the 512-element blocks or the 8-wide vectors: tails too
    p = (torch.randn(n, generator=gen)).to(dtype).requires_grad_()
    g = torch.randn(n, generator=gen).to(dtype)
    opt = rmsprop.RMSprop([p], lr=0.01, alpha=0.9, fused=True, **options)
    p.grad = g
    opt.step()  # creates the state; now give it arbitrary (representable) values and step again
    state = opt.state[p]
    # Arbitrary but reachable state: |m| <= 0.05 well below sqrt(v) >= 0.7, so the (bias-
    # corrected) variance stays positive, as it does in training.
    fills = {"square_avg": (1.0, 0.5), "grad_avg": (0.1, -0.05), "momentum_buffer": (1.0, -0.5)}
    for key, (scale, shift) in fills.items():
        if key in state:
            state[key].copy_((torch.rand(n, generator=gen) * scale + shift).to(dtype))
    start = {k: v.double().numpy().copy() for k, v in state.items() if k != "step"}
    p0, g0 = p.detach().double().numpy().copy(), g.double().numpy()

    opt.step()
    ref = ReferenceRMSprop(p0, lr=0.01, alpha=0.9, **options)
    ref.step_count = 1
    ref.square_avg = start["square_avg"]
    ref.grad_avg = start.get("grad_avg", ref.grad_avg)
    ref.momentum_buffer = start.get("momentum_buffer", ref.momentum_buffer)
    ref.step(g0)

    def close(actual, expected, what):
        err = np.abs(actual.double().numpy() - expected)
        bound = half_ulp * np.abs(expected) * (1 + 1e-3) + 1e-30
        tiny = np.abs(expected) < 1e-4  # subnormal-ish region: absolute bound
        assert np.all((err <= bound) | (tiny & (err < 1e-6))), (
            what,
            float(np.max(err / (np.abs(expected) + 1e-30))),
        )

    close(p.detach(), ref.param, "param")
    for key, expected in ref.state().items():
        close(state[key], expected, key)


@pytest.mark.parametrize("size", [0, 1, 7, 1_000_003])
def test_sizes_including_thread_boundaries(size):
    """1_000_003 elements are split across threads on 64-element boundaries, with a tail."""
    params = make_params(torch.float64, shapes=((size,), (3,)))
    grads = make_grads(params, steps=3)
    ours, _ = run(lambda p: rmsprop.RMSprop(p, fused=True, **FULL), params, grads)
    for i, p in enumerate(ours):
        ref = ReferenceRMSprop(params[i].detach().double().numpy(), **FULL)
        for step in grads:
            ref.step(step[i].numpy())
        np.testing.assert_allclose(p.detach().numpy(), ref.param, rtol=1e-10, atol=1e-12)


def test_an_empty_gradient_with_other_strides_is_stepped():
    """An empty tensor places no element, so its strides mean nothing: fused=True must not refuse
    a gradient whose strides differ (found by the property test, shape (0, 0, 1))."""
    p = torch.zeros((0, 0, 1), dtype=torch.float64, requires_grad=True)
    p.grad = torch.empty_strided((0, 0, 1), (5, 7, 3), dtype=torch.float64)
    opt = rmsprop.RMSprop([p], lr=0.1, fused=True)
    opt.step()
    opt.step()
    assert float(opt.state[p]["step"]) == 2.0


def test_many_threads_give_the_same_result_as_one():
    params = make_params(torch.float32, shapes=((300_000,), (70_001,)))
    grads = make_grads(params, steps=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = run(lambda p: rmsprop.RMSprop(p, fused=True, **FULL), params, grads)
        torch.set_num_threads(4)
        four, _ = run(lambda p: rmsprop.RMSprop(p, fused=True, **FULL), params, grads)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, four, strict=True))  # elementwise: no reduction


# Sizes whose end-to-end run is cut by every thread count below at a different place: inside a
# large tensor, a few elements before a tensor's end (the cut rounds up to the end), between tensors,
# inside tensors smaller than the 64-element alignment, and in a tensor of one element.
_THREAD_CUT_SIZES = ((70_001,), (5,), (64,), (33_000,), (129,), (100_000,), (1,), (65_537,), (40,), (3,))


@pytest.mark.parametrize("threads", [2, 3, 4, 5, 7, 8])
def test_every_element_is_stepped_once_whatever_the_thread_count(threads):
    """The kernel cuts the group's elements, laid end to end, into one run per thread: an element
    stepped twice or skipped at a cut changes the bits against one thread."""
    params = make_params(torch.float32, shapes=_THREAD_CUT_SIZES)
    grads = make_grads(params, steps=2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = run(lambda p: rmsprop.RMSprop(p, fused=True, **FULL), params, grads)
        torch.set_num_threads(threads)
        many, _ = run(lambda p: rmsprop.RMSprop(p, fused=True, **FULL), params, grads)
    finally:
        torch.set_num_threads(before)
    for i, (a, b) in enumerate(zip(one, many, strict=True)):
        assert torch.equal(a, b), (threads, i, _THREAD_CUT_SIZES[i])


# Above 256 records a thread (and where the elements too go to several threads), the kernel
# validates the records, bumps their version counters and counts their steps on several threads,
# each taking a run of whole records.
_MANY_RECORDS = 1600


def _many_small_run(threads: int, steps: int = 2):
    """1600 small parameters in three groups (fp32 with every option, a group of low-bit int8
    state with bias correction, fp64), some of them gapped views the kernel leaves to foreach:
    the parameters, states and version counters after ``steps`` steps on ``threads`` threads."""
    gen = torch.Generator().manual_seed(5)
    sizes = [64 + (7 * i) % 193 for i in range(_MANY_RECORDS)]
    params = []
    for i, n in enumerate(sizes):
        dtype = torch.float64 if i % 11 == 0 else torch.float32
        p = torch.randn(n, generator=gen, dtype=dtype)
        if i % 97 == 5:  # a gapped view: not dense, so foreach steps it and the kernel skips it
            p = torch.empty(2 * n, dtype=dtype)[::2].copy_(p)
        params.append(torch.nn.Parameter(p))
    grads = [[torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params] for _ in range(steps)]
    groups = [
        {"params": [p for i, p in enumerate(params) if i % 11 and i % 2 == 0], "state_dtype": "int8",
         "int8_min_numel": 1, "bias_correction": True, "momentum": 0.9},
        {"params": [p for i, p in enumerate(params) if i % 11 and i % 2]},
        {"params": [p for i, p in enumerate(params) if i % 11 == 0]},
    ]  # fmt: skip
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        opt = rmsprop.RMSprop(groups, lr=0.01, **{k: v for k, v in FULL.items() if k != "lr"})
        for g in grads:
            for p, gi in zip(params, g, strict=True):
                p.grad = gi
            opt.step()
    finally:
        torch.set_num_threads(old)
    return params, opt


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_records_split_across_threads_step_as_on_one(threads):
    """Validation and the per-record bookkeeping (version bumps, step counters, bias corrections,
    stochastic-rounding keys) split by records across threads: every record stepped once, as on
    one thread, the skipped ones by foreach."""
    one, opt_one = _many_small_run(1)
    many, opt_many = _many_small_run(threads)
    for i, (a, b) in enumerate(zip(one, many, strict=True)):
        assert torch.equal(a, b), (threads, i)
        assert a._version == b._version, (threads, i)
        sa, sb = opt_one.state[a], opt_many.state[b]
        assert set(sa) == set(sb) and float(sb["step"]) == 2.0, i
        for key in sa:
            assert torch.equal(sa[key], sb[key]), (i, key)
            assert sa[key]._version == sb[key]._version, (i, key)


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("bad", [3, 1000, _MANY_RECORDS - 1])
def test_a_bad_record_in_any_threads_run_is_refused_with_nothing_written(bad, in_place):
    """fused=True over 1600 records on several threads: one record with a state tensor of the
    wrong dtype, in the first, a middle or the last thread's run, fails the step, which names it
    and writes nothing (no parameter, state, step counter or version counter changes). A new
    tensor is seen by Python first; ``.data`` set in place only by the kernel's check of the
    cached records."""
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(100 + i % 5, generator=gen)) for i in range(_MANY_RECORDS)]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        opt = rmsprop.RMSprop(params, lr=0.01, momentum=0.9, fused=True)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        buf = opt.state[params[bad]]["momentum_buffer"]
        if in_place:
            buf.data = buf.data.double()
        else:
            opt.state[params[bad]]["momentum_buffer"] = buf.double()
        values = [p.detach().clone() for p in params]
        states = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
        versions = [(p._version, *(v._version for v in opt.state[p].values())) for p in params]
        with pytest.raises(RuntimeError, match=f"parameter {bad}\\b"):
            opt.step()
    finally:
        torch.set_num_threads(old)
    for i, p in enumerate(params):
        assert torch.equal(p, values[i]), i
        assert all(torch.equal(opt.state[p][k], v) for k, v in states[i].items()), i
        assert (p._version, *(v._version for v in opt.state[p].values())) == versions[i], i


def _strided_copy(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A copy of ``t`` laid out as a transposed (dense) or a gapped (every other element) view."""
    if layout == "transposed":
        return t.t().contiguous().t().detach()
    if layout == "gapped":
        return torch.empty(2 * t.numel())[::2].copy_(t).detach()
    return t.detach().clone()


def test_dense_views_are_fused_and_gapped_views_go_to_foreach(monkeypatch):
    """A transposed weight is dense (a permutation of a contiguous layout): the kernel walks its
    memory. A strided slice has gaps: it goes to foreach, bit-identical to foreach itself."""
    calls = spy_kernel(monkeypatch)
    layouts = ["transposed", "gapped", "contiguous"]
    start = [torch.randn(6, 5), torch.randn(5), torch.randn(4)]
    grads = make_grads(start, steps=4)

    def train(**kw):
        params = [_strided_copy(t, lay).requires_grad_() for t, lay in zip(start, layouts, strict=True)]
        assert not params[0].is_contiguous() and not params[1].is_contiguous()
        opt = rmsprop.RMSprop(params, **FULL, **kw)
        for step in grads:
            for p, g, lay in zip(params, step, layouts, strict=True):
                p.grad = _strided_copy(g, lay)  # gradients with the parameters' layouts, as autograd makes
            opt.step()
        return params

    ours = train()
    assert calls == [2] * 4
    theirs = train(foreach=True)
    assert torch.equal(ours[1], theirs[1])  # the gapped view went to foreach itself
    for i in (0, 2):
        ref = run_reference(start[i].double().numpy(), [s[i].double().numpy() for s in grads], **FULL)
        np.testing.assert_allclose(ours[i].detach().double().numpy(), ref.param, rtol=2e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="fused=True: parameter 1 .*gaps or overlaps"):
        train(fused=True)


def test_fused_true_refusal_happens_before_any_group_steps():
    ok = torch.randn(4, requires_grad=True)
    gapped = torch.randn(12)[::2].detach().requires_grad_()
    opt = rmsprop.RMSprop([{"params": [ok]}, {"params": [gapped], "fused": True}])
    ok.grad, gapped.grad = torch.ones(4), torch.ones(6)
    before = ok.detach().clone()
    with pytest.raises(RuntimeError, match="gaps or overlaps.*nothing was updated"):
        opt.step()
    assert torch.equal(ok, before) and len(opt.state) == 0


def test_channels_last_params_are_fused():
    p = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last).requires_grad_()
    grads = [[torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)] for _ in range(3)]
    ours, _ = run(lambda ps: rmsprop.RMSprop(ps, fused=True, **FULL), [p], grads)
    theirs, _ = run(lambda ps: rmsprop.RMSprop(ps, foreach=True, **FULL), [p], grads)
    assert ours[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-7)


def test_mixed_dtypes_in_one_group_one_call(monkeypatch):
    """Five dtypes in one group: one native call a step, and each tensor within its dtype's
    rounding of the float64 reference — a bound tight enough that a parameter the kernel had
    skipped would fail it (checked below)."""
    calls = spy_kernel(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64)
    params = [torch.randn(200, generator=gen, dtype=d).requires_grad_() for d in dtypes]
    grads = make_grads(params, steps=5)
    lr, steps = 0.05, len(grads)
    ours, _ = run(lambda p: rmsprop.RMSprop(p, fused=True, lr=lr, **FULL), params, grads)
    assert calls == [5] * steps
    relative = {torch.float32: 1e-5, torch.float64: 1e-12, torch.complex64: 1e-5, **HALF_ULP}
    for p0, p, i in zip(params, ours, range(len(params)), strict=True):
        ref = run_reference(
            torch.view_as_real(p0.detach()).double().numpy()
            if p0.is_complex()
            else p0.detach().double().numpy(),
            [(torch.view_as_real(s[i]) if s[i].is_complex() else s[i]).double().numpy() for s in grads],
            lr=lr,
            **FULL,
        )
        got = (torch.view_as_real(p.detach()) if p.is_complex() else p.detach()).double().numpy()
        start = (torch.view_as_real(p0.detach()) if p0.is_complex() else p0.detach()).double().numpy()
        # each step rounds p (and the state feeding it) once: a few half-ulps of |p| per step
        bound = 3 * steps * relative[p.dtype] * (np.abs(ref.param) + lr)
        assert np.all(np.abs(got - ref.param) <= bound), (
            p.dtype,
            float(np.max(np.abs(got - ref.param) / bound)),
        )
        # the test can fail: the parameter moved by more than the bound on most elements
        assert np.mean(np.abs(start - ref.param) > bound) > 0.5, p.dtype


@pytest.mark.parametrize(
    "options", [{}, {"momentum": 0.9, "centered": True}, FULL], ids=["plain", "momentum+centered", "full"]
)
def test_fused_and_foreach_agree_over_100_steps(options):
    params = make_params(torch.float32, shapes=((1000,), (37, 5)))
    grads = make_grads(params, steps=100)
    fused, _ = run(lambda p: rmsprop.RMSprop(p, fused=True, **options), params, grads)
    foreach, _ = run(lambda p: rmsprop.RMSprop(p, foreach=True, **options), params, grads)
    # a few fp32 ulps per step, over 100 steps of a contracting update
    for a, b in zip(fused, foreach, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)


def test_found_inf_skips_the_step_exactly():
    params = make_params()
    opt = rmsprop.RMSprop(params, fused=True, **FULL)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = {id(p): (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in params}
    opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(1.0)
    opt.step()
    for p in params:
        value, state = before[id(p)]
        assert torch.equal(p, value)
        assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())  # step counter too


def test_grad_scaler_with_fused_matches_the_unfused_path():
    def train(**kwargs):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 1))
        opt = rmsprop.RMSprop(model.parameters(), lr=0.01, momentum=0.9, **kwargs)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        X, y = torch.randn(32, 10), torch.randn(32, 1)
        skipped = []
        for t in range(6):
            opt.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(model(X), y)).backward()
            if t == 2:
                model[0].weight.grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in model.parameters()]
            scaler.step(opt)
            scaler.update()
            skipped.append(
                all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))
            )
        grads = [p.grad.clone() for p in model.parameters()]
        return [p.detach() for p in model.parameters()], skipped, grads

    fused, skipped, fused_grads = train(fused=True)
    plain, _, plain_grads = train(foreach=False)
    assert skipped == [False, False, True, False, False, False]
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(fused_grads, plain_grads, strict=True):  # unscaled in place, as GradScaler would
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_missing_kernel_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(native, "LIB", None)
    monkeypatch.setattr(native, "_LOAD_ERROR", "simulated: library not built")
    monkeypatch.setattr(rmsprop.functional, "_warned_unavailable", False)
    params = make_params()
    grads = make_grads(params, steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours, _ = run(lambda p: rmsprop.RMSprop(p, momentum=0.9), params, grads)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "simulated: library not built" in messages[0]
    theirs, _ = run(lambda p: rmsprop.RMSprop(p, momentum=0.9, foreach=True), params, grads)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    with pytest.raises(RuntimeError, match="simulated: library not built"):
        run(lambda p: rmsprop.RMSprop(p, fused=True), params, grads)


def test_fused_refuses_what_it_cannot_do():
    with pytest.raises(RuntimeError, match="differentiable"):
        rmsprop.RMSprop(make_params(), fused=True, differentiable=True)
    with pytest.raises(RuntimeError, match="cannot both"):
        rmsprop.RMSprop(make_params(), fused=True, foreach=True)


# ----------------------------------------------------------------------------- the cache
def _reference_run(params, grads, mutate):
    """The same training on the foreach path, with the same mutation applied at step 2."""
    ps = [p.detach().clone().requires_grad_() for p in params]
    opt = rmsprop.RMSprop(ps, foreach=True, **FULL)
    for t, step in enumerate(grads):
        if t == 2:
            mutate(opt, ps)
        for p, g in zip(ps, step, strict=True):
            p.grad = g.clone()
        opt.step()
    return ps, opt


def _replace_state_tensor(opt, ps):
    opt.state[ps[0]]["square_avg"] = opt.state[ps[0]]["square_avg"].clone()


def _replace_state_storage(opt, ps):
    t = opt.state[ps[0]]["momentum_buffer"]
    t.data = t.detach().clone()


def _replace_step_storage(opt, ps):
    t = opt.state[ps[1]]["step"]
    t.data = t.detach().clone().double()


def _replace_param_storage(opt, ps):
    ps[1].data = ps[1].data.clone()


def _reload_state_dict(opt, ps):
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))


def _reset_state(opt, ps):
    opt.state.clear()


# What swap_tensors swapped out stays alive, so that a stale handle would name a live tensor,
# which the step would then update instead of the one the object now holds (a wrong result, not
# a crash; the freed case is test_probes.py's review2-1-swap-tensors, in a subprocess).
_SWAPPED_OUT: list[torch.Tensor] = []


def _swap_param(opt, ps):
    # the object stays and its TensorImpl changes: only the handle comparison sees it
    _SWAPPED_OUT.append(torch.nn.Parameter(ps[1].detach().clone()))
    torch.utils.swap_tensors(ps[1], _SWAPPED_OUT[-1])


def _swap_state_tensor(opt, ps):
    _SWAPPED_OUT.append(opt.state[ps[0]]["square_avg"].clone())
    torch.utils.swap_tensors(opt.state[ps[0]]["square_avg"], _SWAPPED_OUT[-1])


@pytest.mark.parametrize(
    "mutate",
    [
        _replace_state_tensor,
        _replace_state_storage,
        _replace_step_storage,
        _replace_param_storage,
        _reload_state_dict,
        _reset_state,
        _swap_param,
        _swap_state_tensor,
    ],
    ids=[
        "state tensor replaced",
        "state storage replaced",
        "step counter replaced by a float64 one",
        "param storage replaced",
        "state dict reloaded",
        "state cleared",
        "param swapped (swap_tensors)",
        "state tensor swapped (swap_tensors)",
    ],
)
@pytest.mark.parametrize("reader", ["C", "Python"])
def test_the_cache_notices_every_change(mutate, reader, monkeypatch):
    """The fused backend remembers each group's tensors; whatever the user swaps, the right
    tensors update — whether the lists are read in C (native.LIST_READER) or in Python."""
    if reader == "Python":
        monkeypatch.setattr(native, "LIST_READER", None)
    params = make_params(torch.float64)
    grads = make_grads(params, steps=5)
    ps = [p.detach().clone().requires_grad_() for p in params]
    opt = rmsprop.RMSprop(ps, **FULL)  # default: fused, remembered from the first step on
    for t, step in enumerate(grads):
        if t == 2:
            assert len(opt._fused_cache) == 1, "the cache should hold the group by now"
            mutate(opt, ps)
        for p, g in zip(ps, step, strict=True):
            p.grad = g.clone()
        opt.step()
    expected, expected_opt = _reference_run(params, grads, mutate)
    for a, b in zip(ps, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for key in ("square_avg", "momentum_buffer", "grad_avg", "step"):
            torch.testing.assert_close(
                opt.state[a][key].double(), expected_opt.state[b][key].double(), rtol=1e-10, atol=1e-12
            )


def test_the_cache_declines_when_a_grad_disappears():
    params = make_params(torch.float64)
    grads = make_grads(params, steps=4)
    for step in grads[2:]:
        step[0] = None
    ps = [p.detach().clone().requires_grad_() for p in params]
    opt = rmsprop.RMSprop(ps, momentum=0.9)
    for step in grads:
        for p, g in zip(ps, step, strict=True):
            p.grad = None if g is None else g.clone()
        opt.step()
    assert opt.state[ps[0]]["step"].item() == 2 and opt.state[ps[1]]["step"].item() == 4


def test_the_list_reader_is_loaded():
    """Never skip on CPython with a GIL: a suite that silently read the lists in Python would
    leave the C reader untested (test_the_list_reader_answers_as_python_does)."""
    assert native.LIST_READER is not None
    assert native._python_layout() is not None


def test_a_python_layout_that_reads_wrongly_is_refused():
    """Each offset is proved by what it reads: ob_type, ob_size or cdata anywhere else is refused
    (and the C side then never reads a list)."""
    word = ctypes.sizeof(ctypes.c_void_p)
    assert native._python_layout((word, 2 * word, 2 * word)) == native._python_layout()
    wrong = [(0, 2 * word, 2 * word), (word, word, 2 * word), (word, 0, 2 * word), (word, 2 * word, 3 * word),
             (word, 2 * word, word), (word, 2 * word, 0), (word + 4, 2 * word, 2 * word), (word, 2 * word, 99 * word)]  # fmt: skip
    for offsets in wrong:
        assert native._python_layout(offsets) is None, offsets


def test_the_native_layout_setter_refuses_bad_offsets():
    """Refused offsets leave the C reader unset: it answers nothing until a good layout is set."""
    setter = native.LIST_READER.rmsprop_set_py_layout
    good = native._python_layout()
    types = (id(list), id(torch.Tensor), id(torch.nn.Parameter), id(None))
    t = torch.zeros(1)
    out = array.array("q", [0])
    try:
        for bad, objects in [((3, 16, 24, 16), types), ((8, 16, 24, -8), types), ((8, 16, 24, 4096), types),
                             (good, (id(list), None, id(torch.nn.Parameter), id(None)))]:  # fmt: skip
            assert setter(*bad, *objects) == -1, bad
            assert native.LIST_READER.rmsprop_py_handles([t], 1, out.buffer_info()[0]) == -1
            assert native.list_handles([t]) == (array.array("q", [t._cdata]), False)
    finally:
        assert setter(*good, *types) == 0
    assert native.list_handles([t]) == (array.array("q", [t._cdata]), True)


class _Marked(torch.Tensor):
    """A tensor subclass that changes nothing (the kernel must still leave it to torch)."""


def _pool():
    base = torch.randn(6)
    return [base, base[2:], torch.nn.Parameter(torch.randn(3)), torch.randn(2).as_subclass(_Marked),
            torch.nn.Parameter(torch.randn(2)).as_subclass(_Marked), None, 1.5, "x", [base],
            torch.randn(3).to_sparse()]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(picks=st.lists(st.integers(0, 9), max_size=6), container=st.sampled_from([list, tuple]),
       against=st.lists(st.integers(0, 9), max_size=6), swap=st.booleans())  # fmt: skip
def test_the_list_reader_answers_as_python_does(picks, container, against, swap):
    """native.list_handles / all_strided / same_objects against their definitions in Python, on
    lists of plain tensors, parameters, views, subclasses, a sparse tensor, None and things that
    are no tensors."""
    pool = _pool()
    items = container(pool[i] for i in picks)
    handles, plain = native.list_handles(items) if all(isinstance(t, torch.Tensor) for t in items) else (None, None)
    if handles is not None:
        assert list(handles) == [t._cdata for t in items]
        assert plain == (container is list and bool(items) and all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in items))
        assert native.all_strided(items) == (all(t.layout is torch.strided for t in items) if plain else None)
    else:
        assert native.all_strided(items) is None
        out = array.array("q", [0] * max(len(items), 1))
        assert native.LIST_READER.rmsprop_py_handles(items, len(items), out.buffer_info()[0]) == -1
    # same_objects: the reference list holds tensors or None (as an entry's persisted lists do)
    reference = [pool[i] for i in against if isinstance(pool[i], torch.Tensor) or pool[i] is None]
    objects = array.array("q", map(id, reference))
    column = array.array("q", (0 if t is None else t._cdata for t in reference))
    swappable = [t for t in reference if isinstance(t, torch.Tensor) and t is not pool[0] and t.layout is torch.strided]  # (pool[0] has a view)
    if swap and swappable:
        torch.utils.swap_tensors(swappable[0], swappable[0].detach().clone().as_subclass(type(swappable[0])))
    answer = native.same_objects(items, objects, column)
    if not reference or container is tuple:
        assert answer is None
    else:
        expected = len(items) == len(reference) and all(
            a is b and (a is None or a._cdata == h) for a, b, h in zip(items, reference, column, strict=False)
        )
        assert answer == expected


def test_a_gradient_of_a_tensor_subclass_is_left_to_torch(monkeypatch):
    """Step after step (the cached fast path too), a gradient whose type is a subclass goes to
    torch's path: the kernel reads raw memory and would skip whatever the subclass does."""
    calls = spy_kernel(monkeypatch)
    params = make_params(torch.float32)
    grads = make_grads(params, steps=4)
    ps = [p.detach().clone().requires_grad_() for p in params]
    want = [p.detach().clone().requires_grad_() for p in params]
    opt, ref = rmsprop.RMSprop(ps, momentum=0.9), torch.optim.RMSprop(want, momentum=0.9, foreach=False)
    for t, step in enumerate(grads):
        for p, q, g in zip(ps, want, step, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        if t in (1, 2):
            ps[0].grad = ps[0].grad.as_subclass(_Marked)
        opt.step()
        ref.step()
    assert calls == [len(ps), len(ps) - 1, len(ps) - 1, len(ps)]
    for a, b in zip(ps, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="subclass"):
        fused = rmsprop.RMSprop([ps[0]], fused=True)
        ps[0].grad = torch.ones_like(ps[0]).as_subclass(_Marked)
        fused.step()


def test_the_cache_does_not_travel_with_copies():
    params = make_params()
    opt = rmsprop.RMSprop(params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert len(opt._fused_cache) == 1
    assert len(copy.deepcopy(opt)._fused_cache) == 0
    assert len(pickle.loads(pickle.dumps(opt))._fused_cache) == 0


def _convert(name: str, source: torch.Tensor, out: torch.Tensor) -> None:
    keep = (native.handles([source]), native.handles([out]))
    status = getattr(native.LIB, name)(keep[0].buffer_info()[0], keep[1].buffer_info()[0])
    assert status == 0, status


def _rounding_candidates(values: torch.Tensor) -> torch.Tensor:
    """Every representable value, each midpoint between neighbours, the floats next to those
    (both signs), and the extremes: every rounding decision a conversion makes."""
    values = values.double().unique().sort().values
    cand = torch.cat([values, (values[1:] + values[:-1]) / 2]).float()
    cand = torch.cat([cand, torch.nextafter(cand, cand + 1), torch.nextafter(cand, cand - 1)])
    extremes = [float("inf"), -float("inf"), float("nan"), 65504.0, 65519.99, 65520.0, 1e9, 3.4e38,
                -3.4e38, 2.9802322e-08, 1e-45, 0.0, -0.0]  # fmt: skip
    # odd lengths exercise the vector loops' scalar tails
    return torch.cat([cand, torch.tensor(extremes)]).contiguous()[:-1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_conversions_match_torch_exhaustively(dtype, isa):
    """The kernel's fp16 / bf16 <-> fp32 conversions: every 16-bit value loads exactly, and every
    rounding decision stores as torch's round-to-nearest-even does."""
    short = "f16" if dtype == torch.float16 else "bf16"
    halves = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    loaded = torch.empty(halves.numel(), dtype=torch.float32)
    _convert(f"rmsprop_{short}_to_f32", halves, loaded)
    expected = halves.float()
    assert torch.equal(loaded.isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert torch.equal(loaded[finite].view(torch.int32), expected[finite].view(torch.int32))

    cand = _rounding_candidates(halves[~halves.isnan()])
    stored = torch.empty(cand.numel(), dtype=dtype)
    _convert(f"rmsprop_f32_to_{short}", cand, stored)
    want = cand.to(dtype)
    assert torch.equal(stored.isnan(), want.isnan())
    keep = ~want.isnan()
    assert torch.equal(stored[keep].view(torch.int16), want[keep].view(torch.int16))


@pytest.mark.parametrize("options", ["full", "plain", "eps_in_sqrt"])
@pytest.mark.parametrize("dtype", list(HALF_ULP), ids=str)
def test_low_precision_steps_are_bit_identical_on_every_isa(dtype, options, isa):
    """The low-precision loops give the same bits at every instruction-set level (the scalar
    code, eight lanes, sixteen), with the gradient unscaled in place (GradScaler) and every buffer
    in use; 1031 elements leave a tail at each width, and an overflowing gradient checks that the
    NaNs and infinities come out the same."""
    extra = {"full": FULL, "plain": {}, "eps_in_sqrt": {**FULL, "eps_in_sqrt": True, "nesterov": True}}[options]

    def train(chosen):
        native.use_isa(chosen)
        try:
            gen = torch.Generator().manual_seed(0)
            p = torch.randn(1031, generator=gen).to(dtype).requires_grad_()
            opt = rmsprop.RMSprop([p], lr=0.01, fused=True, **extra)
            opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(0.0)
            grads = []
            for step in range(4):
                g = torch.randn(1031, generator=gen) * 8
                if step == 2:  # overflow in the last step: inf - inf in the centered variance, inf / NaN
                    g[[5, 700, 1030]] = torch.tensor([float("inf"), 3e38, -float("inf")])
                p.grad = g.to(dtype)
                opt.step()
                grads.append(p.grad.clone())
            return [p.detach().clone(), *grads, *(opt.state[p][k].clone() for k in sorted(opt.state[p]))]
        finally:
            native.use_isa("best")

    for a, b in zip(train("portable"), train(isa), strict=True):
        assert torch.equal(a.isnan(), b.isnan())  # NaN as NaN (its payload bits may differ by path)
        keep = ~a.isnan()
        assert torch.equal(a[keep].view(torch.int16) if a.dtype == dtype else a[keep], b[keep].view(torch.int16) if b.dtype == dtype else b[keep])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_prefetching_changes_no_bit(dtype, isa):
    """The element loops step the same bits with and without their prefetch (which is chosen per
    CPU: on for Intel), at every instruction-set level; lengths around the loops' chunk of 256
    elements and the vector widths, with every buffer in use and the gradient unscaled in place."""
    lengths = (1, 15, 255, 256, 257, 1031, 4099)

    def train(on):
        native.use_prefetch(on)
        try:
            gen = torch.Generator().manual_seed(0)
            params = [torch.randn(n, generator=gen).to(dtype).requires_grad_() for n in lengths]
            opt = rmsprop.RMSprop(params, lr=0.01, fused=True, **FULL)
            opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(0.0)
            for _ in range(3):
                for p in params:
                    p.grad = (torch.randn(p.numel(), generator=gen) * 8).to(dtype)
                opt.step()
            return [t.detach().clone() for p in params for t in (p, p.grad, *opt.state[p].values())]
        finally:
            native.use_prefetch(None)

    for a, b in zip(train(False), train(True), strict=True):
        assert torch.equal(a, b)


def test_prefetch_is_on_for_intel_cpus_only():
    """The default follows the measurements in the kernel (RMS_AHEAD): it helps on Intel, costs
    on AMD; use_prefetch sets it and None restores the CPU's default."""
    try:
        with open("/proc/cpuinfo") as f:
            vendor = next(line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id"))
    except (OSError, StopIteration):
        pytest.skip("no vendor_id in /proc/cpuinfo")
    assert native.prefetches() == (vendor == "GenuineIntel")
    try:
        assert native.use_prefetch(True) is True and native.prefetches()
        assert native.use_prefetch(False) is False and not native.prefetches()
        with pytest.raises(TypeError, match="use_prefetch takes"):
            native.use_prefetch(1)
    finally:
        restored = native.use_prefetch(None)
    assert restored == (vendor == "GenuineIntel")


def test_the_best_conversions_are_in_use():
    """The kernel picks the best level this CPU has (the benchmark machine: AVX-512)."""
    best = [level for level in ISA_LEVELS if ISA_PRESENT[level]][-1]
    assert native.isa() == best
    with pytest.raises(ValueError, match="use_isa takes"):
        native.use_isa("sse9")


def test_conversion_hooks_refuse_mismatched_tensors():
    with pytest.raises(AssertionError):
        _convert("rmsprop_f32_to_f16", torch.zeros(10), torch.zeros(9, dtype=torch.float16))
    with pytest.raises(AssertionError):
        _convert("rmsprop_f32_to_f16", torch.zeros(10), torch.zeros(10))  # wrong output dtype
    with pytest.raises(AssertionError):
        _convert("rmsprop_f32_to_f16", torch.zeros(20)[::2], torch.zeros(10, dtype=torch.float16))


@pytest.mark.parametrize("layout", ["column-major", "channels-last"])
def test_bf16_state_draws_the_same_bits_on_every_path_for_a_permuted_parameter(layout):
    """Stochastic rounding numbers elements in row-major order on the torch paths; the kernel
    walks memory, so it must leave a permuted parameter to them (it once stepped it, and drew
    other bits: a third of square_avg differed after one step)."""
    g = torch.Generator().manual_seed(0)
    shape = (64, 96) if layout == "column-major" else (4, 8, 6, 5)
    p0, g0 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)

    def permute(t):
        return t.t().contiguous().t() if layout == "column-major" else t.contiguous(memory_format=torch.channels_last)

    results = {}
    for path, kw in {"default": {}, "foreach": {"fused": False, "foreach": True}, "single": {"fused": False}}.items():
        p = torch.nn.Parameter(permute(p0))
        opt = rmsprop.RMSprop([p], lr=1e-2, momentum=0.9, state_dtype=torch.bfloat16, **kw)
        for _ in range(3):
            p.grad = permute(g0)
            opt.step()
        results[path] = (p.detach().clone(), opt.state[p]["square_avg"].clone(), opt.state[p]["momentum_buffer"].clone())
    for path in ("default", "single"):
        assert all(torch.equal(a, b) for a, b in zip(results[path], results["foreach"], strict=True)), path
