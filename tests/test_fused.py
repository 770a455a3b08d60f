"""The fused CPU kernel: presence, dtypes, sizes, layouts, AMP, fallback, cached plans, compile.

Its agreement with the float64 reference for every combination of options is in
test_reference.py (the "fused" backend there).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import make_grads, make_params, run

import rmsprop
import rmsprop.functional
from rmsprop.backends import fused_cpu
from rmsprop.reference import ReferenceRMSprop

FULL = {
    "momentum": 0.9,
    "centered": True,
    "weight_decay": 0.01,
    "initial_square_avg": 0.5,
    "bias_correction": True,
}


def test_native_kernel_is_built_and_loaded():
    """Never skip: a suite that silently tested foreach instead would hide a broken build."""
    assert fused_cpu.is_available(), fused_cpu.load_error()


def test_fp16_is_fused_only_on_request(monkeypatch):
    calls = []
    original = fused_cpu._run
    monkeypatch.setattr(fused_cpu, "_run", lambda *a, **k: (calls.append(a[1]), original(*a, **k)))
    params = [torch.randn(10, dtype=torch.float16, requires_grad=True), torch.randn(10, requires_grad=True)]
    grads = make_grads(params, 2)
    run(lambda p: rmsprop.RMSprop(p), params, grads)
    assert calls == [1, 1]  # default: the fp32 tensor fused, the fp16 one to foreach
    calls.clear()
    run(lambda p: rmsprop.RMSprop(p, fused=True), params, grads)
    assert calls == [2, 2]


def test_default_on_cpu_is_the_fused_kernel(monkeypatch):
    calls = []
    original = fused_cpu._run
    monkeypatch.setattr(fused_cpu, "_run", lambda *a, **k: (calls.append(1), original(*a, **k)))
    params = make_params()
    run(lambda p: rmsprop.RMSprop(p), params, make_grads(params, 3))
    assert len(calls) == 3  # one native call per group per step


@pytest.mark.parametrize("dtype,half_ulp", [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)])
@pytest.mark.parametrize("options", [{}, FULL, {"momentum": 0.9, "nesterov": True, "eps_in_sqrt": True}])
def test_low_precision_within_one_rounding(dtype, half_ulp, options):
    """fp32 math, one rounding per stored value: every output is within half a ulp of the exact
    result of the same inputs (plus fp32's own error, far smaller)."""
    gen = torch.Generator().manual_seed(0)
    n = 4096
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


def test_non_contiguous_params_go_to_foreach_and_stay_correct():
    view_param = torch.randn(5, 6).t().detach().requires_grad_()  # a non-contiguous leaf
    assert not view_param.is_contiguous()
    contiguous_param = torch.randn(4, requires_grad=True)
    params = [view_param, contiguous_param]
    grads = make_grads(params, steps=4)
    ours, _ = run(lambda p: rmsprop.RMSprop(p, **FULL), params, grads)  # default: fused + foreach
    theirs, _ = run(lambda p: rmsprop.RMSprop(p, foreach=True, **FULL), params, grads)
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0)  # the view went to foreach itself
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match="fused=True supports dense CPU tensors"):
        run(lambda p: rmsprop.RMSprop(p, fused=True), params, grads)


def test_fused_true_refusal_happens_before_any_group_steps():
    ok = torch.randn(4, requires_grad=True)
    view = torch.randn(5, 6).t().detach().requires_grad_()
    opt = rmsprop.RMSprop([{"params": [ok]}, {"params": [view], "fused": True}])
    ok.grad, view.grad = torch.ones(4), torch.ones(6, 5)
    before = ok.detach().clone()
    with pytest.raises(RuntimeError, match="contiguous: False.*nothing was updated"):
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
    calls = []
    original = fused_cpu._run
    monkeypatch.setattr(fused_cpu, "_run", lambda *a, **k: (calls.append(a[1]), original(*a, **k)))
    gen = torch.Generator().manual_seed(0)
    params = [
        torch.randn(50, generator=gen, dtype=d).requires_grad_()
        for d in (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64)
    ]
    grads = make_grads(params, steps=5)
    ours, _ = run(lambda p: rmsprop.RMSprop(p, fused=True, **FULL), params, grads)
    assert calls == [5] * 5  # five tensors, one native call per step
    theirs, _ = run(lambda p: rmsprop.RMSprop(p, foreach=True, **FULL), params, grads)
    tolerances = {
        torch.float32: 1e-5,
        torch.float64: 1e-12,
        torch.bfloat16: 3e-2,
        torch.float16: 5e-3,
        torch.complex64: 1e-5,
    }
    for a, b in zip(ours, theirs, strict=True):
        # bf16/fp16: foreach rounds after every op, fused once per value: they differ by a few ulps
        torch.testing.assert_close(a, b, rtol=tolerances[a.dtype], atol=tolerances[a.dtype])


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
    monkeypatch.setattr(fused_cpu, "_LIB", None)
    monkeypatch.setattr(fused_cpu, "_LOAD_ERROR", "simulated: library not built")
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


# ----------------------------------------------------------------------------- cached plans
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


def _replace_param_storage(opt, ps):
    ps[1].data = ps[1].data.clone()


def _reload_state_dict(opt, ps):
    opt.load_state_dict(opt.state_dict())


def _reset_state(opt, ps):
    opt.state.clear()


@pytest.mark.parametrize(
    "mutate",
    [_replace_state_tensor, _replace_param_storage, _reload_state_dict, _reset_state],
    ids=["state tensor replaced", "param storage replaced", "state dict reloaded", "state cleared"],
)
def test_cached_plan_notices_every_change(mutate):
    """The fused path caches tensor addresses; whatever the user swaps, the right tensors update."""
    params = make_params(torch.float64)
    grads = make_grads(params, steps=5)
    ps = [p.detach().clone().requires_grad_() for p in params]
    opt = rmsprop.RMSprop(ps, **FULL)  # default: fused, with a cached plan from step 2 on
    for t, step in enumerate(grads):
        if t == 2:
            assert opt._step_cache._plans, "the plan should exist by now"
            mutate(opt, ps)
        for p, g in zip(ps, step, strict=True):
            p.grad = g.clone()
        opt.step()
    expected, expected_opt = _reference_run(params, grads, mutate)
    for a, b in zip(ps, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(ps, expected, strict=True):
        torch.testing.assert_close(
            opt.state[a]["square_avg"], expected_opt.state[b]["square_avg"], rtol=1e-10, atol=1e-12
        )


def test_cached_plan_declines_when_a_grad_disappears():
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


def test_torch_compile_with_the_fused_op():
    params = make_params()
    grads = make_grads(params, steps=3)
    eager = [p.detach().clone().requires_grad_() for p in params]
    compiled = [p.detach().clone().requires_grad_() for p in params]
    eager_opt = rmsprop.RMSprop(eager, fused=True, momentum=0.9, centered=True)
    compiled_opt = rmsprop.RMSprop(compiled, fused=True, momentum=0.9, centered=True)
    step = torch.compile(compiled_opt.step)
    for g in grads:
        for p, q, gi in zip(eager, compiled, g, strict=True):
            p.grad, q.grad = gi.clone(), gi.clone()
        eager_opt.step()
        step()
    for a, b in zip(eager, compiled, strict=True):
        assert torch.equal(a, b)  # the same kernel runs inside the opaque op


def test_fp16_conversions_match_torch_exhaustively():
    """The kernel's integer fp16 <-> fp32 conversions: every half loads exactly, and every
    rounding decision (each half, each midpoint between neighbours, and the floats next to
    them, both signs, inf, NaN, overflow) stores as torch's round-to-nearest-even does."""
    import ctypes

    lib = fused_cpu._LIB
    halves = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    loaded = torch.empty(halves.numel(), dtype=torch.float32)
    lib.rmsprop_f16_to_f32(
        ctypes.c_void_p(halves.data_ptr()), ctypes.c_void_p(loaded.data_ptr()), ctypes.c_int64(halves.numel())
    )
    expected = halves.float()
    assert torch.equal(loaded.isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert torch.equal(loaded[finite].view(torch.int32), expected[finite].view(torch.int32))

    values = halves[~halves.isnan()].double().unique().sort().values
    cand = torch.cat([values, (values[1:] + values[:-1]) / 2]).float()
    cand = torch.cat([cand, torch.nextafter(cand, cand + 1), torch.nextafter(cand, cand - 1)])
    extremes = [
        float("inf"),
        -float("inf"),
        float("nan"),
        65504.0,
        65519.99,
        65520.0,
        1e9,
        2.9802322e-08,
        0.0,
        -0.0,
    ]
    cand = torch.cat([cand, torch.tensor(extremes)]).contiguous()
    stored = torch.empty(cand.numel(), dtype=torch.float16)
    lib.rmsprop_f32_to_f16(
        ctypes.c_void_p(cand.data_ptr()), ctypes.c_void_p(stored.data_ptr()), ctypes.c_int64(cand.numel())
    )
    want = cand.half()
    assert torch.equal(stored.isnan(), want.isnan())
    keep = ~want.isnan()
    assert torch.equal(stored[keep].view(torch.int16), want[keep].view(torch.int16))
