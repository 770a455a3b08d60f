"""The Triton kernel (backends/fused_triton): options, dtypes, sizes, launches, AMP, capturable,
the cache, refusals, torch.compile.

In CI it runs on CPU tensors through Triton's interpreter: the autouse fixture below routes CPU
tensors to the Triton backend (``plan.DEVICE_TYPES``), and the backend runs its kernel
interpreted for CPU tensors (the interpreter ``TRITON_INTERPRET=1`` selects; see loader.py).
``scripts/gpu_check.sh`` runs the same tests on a GPU, compiled, with
``RMSPROP_TRITON_DEVICE=cuda``; tests that only mean something on a GPU (CUDA graphs, host
synchronisation) are in test_triton_cuda.py, collected only then.

The kernel computes operation for operation what the fused CPU kernel computes (unfused float32,
IEEE division and square root, one rounding per stored value), so besides the float64 reference
it is compared with that kernel bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from cases import COMBINATIONS, HALF_ULP, NAMED, tolerance
from helpers import make_grads

import rmsprop
import rmsprop.functional
from rmsprop.backends import fused_cpu, fused_triton
from rmsprop.backends.fused_triton import loader, plan
from rmsprop.reference import ReferenceRMSprop, run_reference
from rmsprop.rule import Rule

DEVICE = os.environ.get("RMSPROP_TRITON_DEVICE", "cpu")
FULL = NAMED["full"]
# Where the default (not capturable, not fused=True) step counters live: on the CPU, as torch's.
# For CPU parameters that is their own device, so the kernel counts (mode 1); for CUDA ones the
# host does (mode 0).
DEFAULT_MODE = 1 if DEVICE == "cpu" else 0
# On a GPU without pytest-xdist, scripts/gpu_check.sh tests every N-th combination (each is a
# kernel specialisation to compile); CI tests all of them.
SAMPLE = int(os.environ.get("RMSPROP_TRITON_SAMPLE", "1"))


@pytest.fixture(autouse=True)
def _route_to_triton(monkeypatch):
    """In CI, CPU tensors take the Triton backend (run by the interpreter) in these tests."""
    monkeypatch.setattr(plan, "DEVICE_TYPES", {"cuda", DEVICE})


@contextmanager
def cpu_kernel():
    """CPU tensors take the fused CPU kernel again (for a comparison run)."""
    saved = set(plan.DEVICE_TYPES)
    plan.DEVICE_TYPES.discard("cpu")
    try:
        yield
    finally:
        plan.DEVICE_TYPES.clear()
        plan.DEVICE_TYPES.update(saved)


@pytest.fixture
def small_blocks(monkeypatch):
    """Programs of 64 elements in blocks of 16: every size below 1000 then spans several
    programs, full blocks and tails, at the interpreter's cost of a few small ones."""
    monkeypatch.setattr(plan, "BLOCK", 16)
    monkeypatch.setattr(plan, "CHUNK", 64)


def spy_launches(monkeypatch) -> list[tuple]:
    """Record every launch: (tensors, programs, storage format, step mode, aligned)."""
    calls: list[tuple] = []
    original = fused_triton._launch

    def launch(la, *args, **kwargs):
        calls.append((len(la.indices), la.programs, la.p_kind, la.step_mode, la.aligned))
        return original(la, *args, **kwargs)

    monkeypatch.setattr(fused_triton, "_launch", launch)
    return calls


def spy_rebuilds(monkeypatch) -> list[int]:
    builds: list[int] = []
    original = plan.build_entry

    def build(lists, **kwargs):
        builds.append(len(lists[0]))
        return original(lists, **kwargs)

    monkeypatch.setattr(plan, "build_entry", build)
    return builds


def params_on(values: list[torch.Tensor]) -> list[torch.Tensor]:
    return [v.detach().clone().to(DEVICE).requires_grad_() for v in values]


def train(make, start: list[torch.Tensor], grads: list[list[torch.Tensor]], lrs=None, device=DEVICE):
    """Run ``make(params)`` over the gradient sequence on copies of ``start`` on ``device``."""
    params = [v.detach().clone().to(device).requires_grad_() for v in start]
    opt = make(params)
    for t, step in enumerate(grads):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[t]
        for p, g in zip(params, step, strict=True):
            p.grad = g.detach().clone().to(device)
        opt.step()
    return params, opt


def with_cpu_kernel(make, start, grads, lrs=None):
    """The same run on CPU tensors with the fused CPU kernel (the bit-for-bit comparison)."""
    require_cpu_kernel()
    with cpu_kernel():
        return train(make, start, grads, lrs, device="cpu")


def require_cpu_kernel():
    """CI always has the CPU kernel (test_fused asserts it); a GPU machine whose torch the
    kernel's loader refuses skips the comparison (after the Triton run itself has run)."""
    if not fused_cpu.is_available():
        if DEVICE == "cpu":
            raise AssertionError(f"the fused CPU kernel is unavailable: {fused_cpu.load_error()}")
        pytest.skip(f"no CPU kernel to compare with here: {fused_cpu.load_error()}")


def assert_bitwise(ours, theirs, opt_a=None, opt_b=None):
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.equal(a.detach().cpu(), b.detach().cpu()), (
            i,
            (a.detach().cpu() - b.detach().cpu()).abs().max(),
        )
        if opt_a is not None:
            sa, sb = opt_a.state[a], opt_b.state[b]
            assert set(sa) == set(sb)
            for key in sa:
                assert torch.equal(sa[key].cpu(), sb[key].cpu()), (i, key)


# ----------------------------------------------------------------------------- presence
def test_triton_is_installed_and_implements_every_option():
    """Never skip: CI installs triton (scripts/setup.sh test); without it these tests would
    test nothing."""
    assert fused_triton.is_available(), fused_triton.load_error()
    from rmsprop.options import RULE_OPTIONS

    assert {o.name for o in RULE_OPTIONS} == loader.IMPLEMENTED | loader.ROUTED_ELSEWHERE
    assert not loader.IMPLEMENTED & loader.ROUTED_ELSEWHERE


def test_triton_refuses_to_load_when_an_option_is_not_implemented(monkeypatch):
    monkeypatch.setattr(loader, "IMPLEMENTED", loader.IMPLEMENTED - {"nesterov"})
    monkeypatch.setattr(loader, "_error", loader._UNCHECKED)
    assert not fused_triton.is_available() and "nesterov" in fused_triton.load_error()
    p = params_on([torch.randn(5)])
    p[0].grad = torch.randn(5, device=DEVICE)
    with pytest.raises(RuntimeError, match="Triton kernel .* unavailable: .*nesterov"):
        rmsprop.RMSprop(p, fused=True).step()


# ----------------------------------------------------------------------------- every option
LRS = [0.01, 0.02, 0.005, 0.03]  # a changing lr exercises lr_in_momentum


def _noise_dominated_first_step(options) -> bool:
    """Centered + bias correction from v0 = 0: the first variance is exactly 0 (see
    test_reference.py); checked with dyadic inputs, for which every step-1 operation is exact."""
    return options["centered"] and options["bias_correction"] and options["initial_square_avg"] == 0


@pytest.mark.parametrize(
    "options",
    COMBINATIONS[::SAMPLE],
    ids=lambda c: "triton-" + ("-".join(f"{k}={v}" for k, v in c.items() if v) or "plain"),
)
def test_triton_every_combination_matches_reference_and_cpu_kernel(options):
    """Every combination of switches, float32, against the float64 reference at float32's
    tolerance, and against the fused CPU kernel bit for bit (state too)."""
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(3, 4, generator=gen)]
    grads = [[torch.randn(3, 4, generator=gen) * (1 + 0.5 * np.sin(t))] for t in range(len(LRS))]
    options = dict(options)
    alpha = 0.9
    if _noise_dominated_first_step(options):
        start = [torch.randint(-8, 8, (3, 4), generator=gen).float() / 8]
        grads[0] = [torch.randint(-8, 8, (3, 4), generator=gen).float() / 4]
        alpha = 0.75
        options["weight_decay"] = 0.25 if options["weight_decay"] else 0.0

    def make(ps):
        return rmsprop.RMSprop(ps, lr=LRS[0], alpha=alpha, fused=True, **options)

    ours, opt = train(make, start, grads, LRS)
    tol = tolerance("fused", torch.float32)
    ref = run_reference(
        start[0].double().numpy(), [g[0].double().numpy() for g in grads], lrs=LRS, alpha=alpha, **options
    )
    np.testing.assert_allclose(
        ours[0].detach().cpu().double().numpy(), ref.param, rtol=tol.rtol, atol=tol.atol
    )
    for key, expected in ref.state().items():
        np.testing.assert_allclose(
            opt.state[ours[0]][key].cpu().double().numpy(), expected, rtol=tol.rtol, atol=tol.atol
        )
    assert opt.state[ours[0]]["step"].item() == len(LRS)
    theirs, their_opt = with_cpu_kernel(make, start, grads, LRS)
    assert_bitwise(ours, theirs, opt, their_opt)


# ----------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", list(HALF_ULP), ids=lambda d: f"triton-{d}")
@pytest.mark.parametrize(
    "options",
    [{}, FULL, {"momentum": 0.9, "nesterov": True, "eps_in_sqrt": True}],
    ids=["plain", "full", "nesterov"],
)
def test_triton_low_precision_within_one_rounding(dtype, options):
    """fp32 math, one rounding (to nearest even) per stored value: every output is within half a
    ulp of the exact result of the same inputs (a truncating conversion fails this for about
    half the elements), and equal to the fused CPU kernel's bit for bit."""
    half_ulp = HALF_ULP[dtype]
    gen = torch.Generator().manual_seed(0)
    n = 1000
    p0 = torch.randn(n, generator=gen).to(dtype)
    g = torch.randn(n, generator=gen).to(dtype)
    fills = {"square_avg": (1.0, 0.5), "grad_avg": (0.1, -0.05), "momentum_buffer": (1.0, -0.5)}
    values = {k: (torch.rand(n, generator=gen) * s + o).to(dtype) for k, (s, o) in fills.items()}

    def second_step(device):
        p = p0.clone().to(device).requires_grad_()
        opt = rmsprop.RMSprop([p], lr=0.01, alpha=0.9, fused=True, **options)
        p.grad = g.to(device)
        opt.step()  # creates the state; now give it arbitrary (representable) values and step again
        for key in fills:
            if key in opt.state[p]:
                opt.state[p][key].copy_(values[key])
        start = {k: v.double().cpu().numpy().copy() for k, v in opt.state[p].items() if k != "step"}
        before = p.detach().double().cpu().numpy().copy()
        p.grad = g.to(device)
        opt.step()
        return p, opt, start, before

    p, opt, start, before = second_step(DEVICE)
    ref = ReferenceRMSprop(before, lr=0.01, alpha=0.9, **options)
    ref.step_count = 1
    ref.square_avg = start["square_avg"]
    ref.grad_avg = start.get("grad_avg", ref.grad_avg)
    ref.momentum_buffer = start.get("momentum_buffer", ref.momentum_buffer)
    ref.step(g.double().numpy())

    def close(actual, expected, what):
        err = np.abs(actual.detach().double().cpu().numpy() - expected)
        bound = half_ulp * np.abs(expected) * (1 + 1e-3) + 1e-30
        tiny = np.abs(expected) < 1e-4  # subnormal-ish region: absolute bound
        assert np.all((err <= bound) | (tiny & (err < 1e-6))), (
            what,
            float(np.max(err / (np.abs(expected) + 1e-30))),
        )

    close(p, ref.param, "param")
    for key, expected in ref.state().items():
        close(opt.state[p][key], expected, key)
    require_cpu_kernel()
    with cpu_kernel():
        q, their_opt, _, _ = second_step("cpu")
    assert_bitwise([p], [q], opt, their_opt)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: f"triton-{d}")
def test_triton_stores_round_exactly_as_torch_for_every_half_value(dtype):
    """With alpha = 0 the new square average is g * g, exact in float32 for a 16-bit g, so the
    stored value is the kernel's rounding of it: for every one of the 65536 bit patterns of g
    (subnormals, ties, overflow to infinity) it must be torch's conversion, bit for bit; NaN stays
    NaN (torch itself stores different NaN bits on different paths: 0x7FC0 scalar, 0xFFFF here)."""
    g = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).clone()
    p = torch.zeros(g.numel(), dtype=dtype, device=DEVICE, requires_grad=True)
    opt = rmsprop.RMSprop([p], lr=0.0, alpha=0.0, fused=True)
    p.grad = g.to(DEVICE)
    opt.step()
    stored = opt.state[p]["square_avg"].cpu()
    expected = (g.float() * g.float()).to(dtype)
    nan = expected.isnan()
    assert torch.equal(stored.isnan(), nan)
    same = stored[~nan].view(torch.int16) == expected[~nan].view(torch.int16)
    assert bool(same.all()), int((~same).sum())


# ----------------------------------------------------------------------------- sizes, programs
SIZES = [0, 1, 15, 16, 17, 64, 65, 200, 1000]


def test_triton_sizes_and_programs(monkeypatch, small_blocks):
    """Empty, one element, below / at / above one block and one program, many programs: all in
    one launch, every tensor right, and every step counter counted once per step (the last
    program of a tensor writes it)."""
    calls = spy_launches(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(n, generator=gen) for n in SIZES]
    grads = make_grads(start, steps=3)
    make = lambda ps: rmsprop.RMSprop(ps, fused=True, **FULL)  # noqa: E731
    ours, opt = train(make, start, grads)
    expected_programs = sum(max(1, -(-n // 64)) for n in SIZES)
    assert calls == [(len(SIZES), expected_programs, 0, 1, True)] * 3
    assert [opt.state[p]["step"].item() for p in ours] == [3.0] * len(SIZES)
    tol = tolerance("fused", torch.float32)
    for i, p in enumerate(ours):
        ref = run_reference(start[i].double().numpy(), [s[i].double().numpy() for s in grads], **FULL)
        np.testing.assert_allclose(p.detach().cpu().double().numpy(), ref.param, rtol=tol.rtol, atol=tol.atol)
    theirs, their_opt = with_cpu_kernel(make, start, grads)
    assert_bitwise(ours, theirs, opt, their_opt)


def test_triton_default_program_size(monkeypatch):
    """The shipped BLOCK and CHUNK: a tensor of two programs and a tail (8192 + 1000 + 7)."""
    calls = spy_launches(monkeypatch)
    start = [torch.randn(8192 + 1007), torch.randn(3)]
    grads = make_grads(start, steps=2)
    make = lambda ps: rmsprop.RMSprop(ps, momentum=0.9, centered=True)  # noqa: E731  the default
    ours, opt = train(make, start, grads)
    assert calls == [(2, 3, 0, DEFAULT_MODE, True)] * 2
    theirs, their_opt = with_cpu_kernel(make, start, grads)
    assert_bitwise(ours, theirs, opt, their_opt)


def test_triton_many_tensors_dtypes_and_alignment_in_several_launches(monkeypatch):
    """32 tensors of 4 dtypes, some views 4 bytes off a 16-byte boundary, one float64: a launch
    per (format, alignment), float64 to torch's path; every tensor within its dtype's rounding
    of the reference (a bound most elements of an un-updated parameter fail), and the kernel's
    results equal to the CPU kernel's bit for bit."""
    calls = spy_launches(monkeypatch)
    gen = torch.Generator().manual_seed(1)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.complex64]
    sizes = torch.randint(1, 100, (32,), generator=gen).tolist()
    start = [torch.randn(n, generator=gen).to(dtypes[i % 4]) for i, n in enumerate(sizes)]
    start.append(torch.randn(50, generator=gen, dtype=torch.float64))
    grads = make_grads(start, steps=5)
    misaligned = {3, 7, 20}  # complex64 / complex64 / float32 views at offset 1 (4 bytes)
    lr = 0.1

    def place(values, device):
        out = []
        for i, v in enumerate(values):
            if i in misaligned:
                buf = torch.zeros(v.numel() + 1, dtype=v.dtype, device=device)
                out.append(buf[1:].view(v.shape).copy_(v))
            else:
                out.append(v.detach().clone().to(device))
        return out

    def run(device):
        ps = [t.requires_grad_() for t in place(start, device)]
        opt = rmsprop.RMSprop(ps, fused=None, lr=lr, **FULL)
        for step in grads:
            for p, g in zip(ps, place(step, device), strict=True):
                p.grad = g
            opt.step()
        return ps, opt

    ours, opt = run(DEVICE)
    launches = {(c[2], c[4]): c[0] for c in calls[: len(calls) // len(grads)]}
    assert len(calls) == len(grads) * len(launches)
    assert launches == {(0, True): 13, (0, False): 3, (1, True): 8, (2, True): 8}
    require_cpu_kernel()
    with cpu_kernel():
        theirs, their_opt = run("cpu")
    relative = {torch.float32: 1e-5, torch.complex64: 1e-5, torch.float64: 1e-12, **HALF_ULP}
    moved: dict[torch.dtype, list[float]] = {}

    def real(t):
        return (torch.view_as_real(t.detach()) if t.is_complex() else t.detach()).cpu().double().numpy()

    for i, (p, q) in enumerate(zip(ours, theirs, strict=True)):
        if p.dtype not in (torch.float16, torch.float64):  # foreach takes these, on one side
            assert torch.equal(p.detach().cpu(), q.detach()), i
        ref = run_reference(real(start[i]), [real(s[i]) for s in grads], lr=lr, **FULL)
        # each step rounds p (and the state feeding it) once: a few half-ulps of |p| per step
        bound = 3 * len(grads) * relative[p.dtype] * (np.abs(ref.param) + lr)
        assert np.all(np.abs(real(p) - ref.param) <= bound), (i, p.dtype)
        moved.setdefault(p.dtype, []).extend((np.abs(real(start[i]) - ref.param) > bound).ravel().tolist())
    assert all(np.mean(flags) > 0.5 for flags in moved.values()), {d: np.mean(f) for d, f in moved.items()}


# ----------------------------------------------------------------------------- AMP
def _amp_state(opt, params):
    return (
        [p.detach().clone() for p in params],
        [{k: v.clone() for k, v in opt.state[p].items()} for p in params],
        [p.grad.clone() for p in params],
    )


@pytest.mark.parametrize("counters", ["device", "host"], ids=lambda c: f"triton-{c}-counters")
def test_triton_found_inf_skips_exactly(monkeypatch, counters):
    """found_inf set: no parameter, state tensor, step counter or gradient changes. With
    counters on the device (fused=True puts them there) the kernel reads found_inf; with
    counters the host keeps (torch's default: on the CPU), the host reads it (one
    synchronisation) before counting the step."""
    if counters == "host":
        monkeypatch.setattr(plan, "HOST_STEP_DEVICES", {"cpu"})
    calls = spy_launches(monkeypatch)
    params = params_on([torch.randn(70), torch.randn(3, 5)])
    opt = rmsprop.RMSprop(params, fused=True if counters == "device" else None, **FULL)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert calls[-1][3] == (1 if counters == "device" else 0)
    before = _amp_state(opt, params)
    opt.grad_scale = torch.tensor(1024.0, device=DEVICE)
    opt.found_inf = torch.tensor(1.0, device=DEVICE)
    opt.step()
    after = _amp_state(opt, params)
    for a, b in zip(before, after, strict=True):
        for x, y in zip(a, b, strict=True):
            if isinstance(x, dict):
                assert all(torch.equal(x[k], y[k]) for k in x)
            else:
                assert torch.equal(x, y)
    opt.found_inf = torch.tensor(0.0, device=DEVICE)
    opt.step()
    assert all(opt.state[p]["step"].item() == 2 for p in params)
    assert not any(torch.equal(a, p.grad) for a, p in zip(after[2], params, strict=True))  # unscaled in place


def test_triton_grad_scaler_training_equals_the_cpu_kernel():
    """A GradScaler run with an overflow at step 2: the skipped step, the unscaled gradients
    written back (as unscale_ leaves them) and every value equal the CPU kernel's."""

    def trainer(device):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 1)).to(
            device
        )
        opt = rmsprop.RMSprop(model.parameters(), lr=0.01, momentum=0.9, fused=True)
        scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
        X, y = torch.randn(32, 10).to(device), torch.randn(32, 1).to(device)
        skipped = []
        for t in range(5):
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
        return (
            [p.detach().cpu() for p in model.parameters()],
            [p.grad.cpu() for p in model.parameters()],
            skipped,
        )

    ours, our_grads, skipped = trainer(DEVICE)
    require_cpu_kernel()
    with cpu_kernel():
        theirs, their_grads, _ = trainer("cpu")
    assert skipped == [False, False, True, False, False]
    if DEVICE == "cpu":  # the same forward and backward: bit for bit
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(our_grads, their_grads, strict=True))
    else:  # cuBLAS and the CPU's BLAS sum differently
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- capturable
def test_triton_capturable_tensor_lr_and_device_counters(monkeypatch, small_blocks):
    """capturable=True: counters on the device, read and written by the kernel (a tensor of
    several programs counts once per step); a tensor lr on the device changed in place between
    steps is read by the kernel, with no rebuild; the result equals the CPU kernel's with the
    same lr sequence as numbers."""
    calls = spy_launches(monkeypatch)
    builds = spy_rebuilds(monkeypatch)
    gen = torch.Generator().manual_seed(2)
    start = [torch.randn(300, generator=gen), torch.randn(7, generator=gen)]
    grads = make_grads(start, steps=4)
    lrs = [2.0**-7, 2.0**-5, 2.0**-9, 2.0**-6]  # float32 numbers: the tensor lr holds them exactly
    options = {"momentum": 0.9, "lr_in_momentum": True, "decoupled_weight_decay": True, "weight_decay": 0.1,
               "bias_correction": True}  # fmt: skip
    params = params_on(start)
    lr = torch.tensor(lrs[0], device=DEVICE)
    opt = rmsprop.RMSprop(params, lr=lr, capturable=True, **options)
    for t, step in enumerate(grads):
        lr.fill_(lrs[t])
        for p, g in zip(params, step, strict=True):
            p.grad = g.to(DEVICE)
        opt.step()
    assert all(opt.state[p]["step"].device == params[0].device for p in params)
    assert [opt.state[p]["step"].item() for p in params] == [4.0, 4.0]
    assert builds == [2] and len(calls) == 4 and calls[0][1] == 5 + 1 and calls[0][3] == 1
    theirs, their_opt = with_cpu_kernel(
        lambda ps: rmsprop.RMSprop(ps, lr=lrs[0], fused=True, **options), start, grads, lrs
    )
    assert_bitwise(params, theirs)


def test_triton_capturable_refuses_counters_on_the_host(monkeypatch):
    """Counters on the CPU (made without capturable), then capturable=True: a captured step
    could not count, so the step refuses, before anything is written."""
    monkeypatch.setattr(plan, "HOST_STEP_DEVICES", {"cpu"})
    params = params_on([torch.randn(5)])
    opt = rmsprop.RMSprop(params)
    params[0].grad = torch.randn(5, device=DEVICE)
    opt.step()
    opt.param_groups[0]["capturable"] = True
    before = params[0].detach().clone(), opt.state[params[0]]["step"].clone()
    with pytest.raises(
        RuntimeError, match="capturable=True: parameter 0's step counter .*nothing was updated"
    ):
        opt.step()
    assert torch.equal(params[0], before[0]) and torch.equal(opt.state[params[0]]["step"], before[1])


def test_triton_fused_true_keeps_counters_on_the_device():
    params = params_on([torch.randn(5)])
    opt = rmsprop.RMSprop(params, fused=True)
    params[0].grad = torch.randn(5, device=DEVICE)
    opt.step()
    assert opt.state[params[0]]["step"].device == params[0].device


# ----------------------------------------------------------------------------- the cache
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


def _misalign_param(opt, ps):
    buf = torch.zeros(ps[0].numel() + 1, device=ps[0].device)
    ps[0].data = buf[1:].view(ps[0].shape).copy_(ps[0].data)
    for key in ("square_avg", "grad_avg", "momentum_buffer"):
        t = opt.state[ps[0]][key]
        buf = torch.zeros(t.numel() + 1, device=t.device)
        t.data = buf[1:].view(t.shape).copy_(t.data)


def _reload_state_dict(opt, ps):
    import copy

    opt.load_state_dict(copy.deepcopy(opt.state_dict()))


def _reset_state(opt, ps):
    opt.state.clear()


MUTATIONS = {
    "state tensor replaced": _replace_state_tensor,
    "state storage replaced": _replace_state_storage,
    "step counter replaced by a float64 one": _replace_step_storage,
    "param storage replaced": _replace_param_storage,
    "param and state moved off 16-byte alignment": _misalign_param,
    "state dict reloaded": _reload_state_dict,
    "state cleared": _reset_state,
}


@pytest.mark.parametrize("mutate", list(MUTATIONS.values()), ids=[f"triton-{m}" for m in MUTATIONS])
def test_triton_cache_notices_every_change(monkeypatch, mutate):
    """The tables are built once and kept; whatever the user swaps, the next step rebuilds them
    (and only then), and the right tensors update: bit for bit the CPU kernel's run with the
    same mutation."""
    builds = spy_rebuilds(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    start = [torch.randn(40, generator=gen), torch.randn(4, 5, generator=gen), torch.randn(3, generator=gen)]
    grads = make_grads(start, steps=5)

    def run(device):
        ps = [v.detach().clone().to(device).requires_grad_() for v in start]
        opt = rmsprop.RMSprop(ps, **FULL)
        for t, step in enumerate(grads):
            if t == 2:
                mutate(opt, ps)
            for p, g in zip(ps, step, strict=True):
                p.grad = g.clone().to(device)
            opt.step()
        return ps, opt

    ours, opt = run(DEVICE)
    assert builds == [3, 3]
    require_cpu_kernel()
    with cpu_kernel():
        theirs, their_opt = run("cpu")
    assert_bitwise(ours, theirs, opt, their_opt)


def test_triton_moved_gradients_are_followed_without_a_rebuild(monkeypatch):
    """New gradient tensors every step (as zero_grad(set_to_none=True) gives): only their
    addresses are copied again; a gradient that is not 16-byte aligned rebuilds."""
    builds = spy_rebuilds(monkeypatch)
    calls = spy_launches(monkeypatch)
    params = params_on([torch.randn(33), torch.randn(8)])
    opt = rmsprop.RMSprop(params)
    keep = []
    for _ in range(3):
        for p in params:
            keep.append(torch.randn(1000, device=DEVICE))  # so the next gradients land elsewhere
            p.grad = torch.randn_like(p)
        opt.step()
    assert builds == [2] and all(c[4] for c in calls)
    buf = torch.randn(34, device=DEVICE)
    params[0].grad = buf[1:]
    opt.step()
    assert builds == [2, 2] and sorted(c[4] for c in calls[-2:]) == [False, True]


@pytest.mark.parametrize("scaled", [False, True], ids=["triton-read", "triton-unscaled-in-place"])
def test_triton_a_gradient_that_starts_aliasing_in_a_steady_loop_is_caught(monkeypatch, scaled):
    """After steady steps, a gradient moved onto memory the step writes (another parameter), or
    with GradScaler (gradients written) onto another gradient: fused=True refuses before
    anything is written; nothing slips through the cached tables."""
    params = params_on([torch.randn(64), torch.randn(64), torch.randn(64)])
    opt = rmsprop.RMSprop(params, fused=True, momentum=0.9)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    if scaled:
        opt.grad_scale = torch.tensor(2.0, device=DEVICE)
        opt.found_inf = torch.tensor(0.0, device=DEVICE)
        shared = torch.randn(64, device=DEVICE)
        params[1].grad, params[2].grad = shared, shared
    else:
        params[2].grad = params[0].detach()  # reads what the same step writes
    before = [p.detach().clone() for p in params], [opt.state[p]["momentum_buffer"].clone() for p in params]
    with pytest.raises(RuntimeError, match="shares memory.*nothing was updated"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before[0], params, strict=True))
    assert all(
        torch.equal(a, opt.state[p]["momentum_buffer"]) for a, p in zip(before[1], params, strict=True)
    )


def test_triton_cache_does_not_travel_with_copies():
    import copy
    import pickle

    params = params_on([torch.randn(4)])
    opt = rmsprop.RMSprop(params)
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert len(opt._fused_cache.others["triton"]) == 1
    assert not copy.deepcopy(opt)._fused_cache.others
    assert not pickle.loads(pickle.dumps(opt))._fused_cache.others


# ----------------------------------------------------------------------------- refusals, routing
def _one(values, **kw):
    params = params_on(values)
    opt = rmsprop.RMSprop(params, **kw)
    return params, opt


@pytest.mark.parametrize(
    "case",
    ["gapped view", "float64", "grad aliases its param", "params overlap", "grad of another layout"],
    ids=lambda c: f"triton-{c}",
)
def test_triton_refusals_with_fused_true_and_routing_with_fused_none(monkeypatch, case):
    """What the kernel cannot step exactly raises before anything is written with fused=True
    (naming the parameter and the reason), and goes to torch's foreach path with fused=None —
    bit for bit what foreach itself computes."""
    calls = spy_launches(monkeypatch)

    def setup():
        ok = torch.randn(6, device=DEVICE)
        if case == "gapped view":
            ps = [ok, torch.randn(12, device=DEVICE)[::2]]
            gs = [torch.randn(6, device=DEVICE), torch.randn(12, device=DEVICE)[::2]]
        elif case == "float64":
            ps = [ok, torch.randn(6, device=DEVICE, dtype=torch.float64)]
            gs = [torch.randn(6, device=DEVICE), torch.randn(6, device=DEVICE, dtype=torch.float64)]
        elif case == "grad aliases its param":
            p = torch.randn(6, device=DEVICE)
            ps, gs = [ok, p], [torch.randn(6, device=DEVICE), p]
        elif case == "params overlap":
            buf = torch.randn(10, device=DEVICE)
            ps, gs = [buf[:6], buf[4:]], [torch.randn(6, device=DEVICE), torch.randn(6, device=DEVICE)]
        else:
            w = torch.randn(4, 3, device=DEVICE)
            ps, gs = [ok, w], [torch.randn(6, device=DEVICE), torch.randn(3, 4, device=DEVICE).t()]
        ps = [p.detach().requires_grad_() for p in ps]
        for p, g in zip(ps, gs, strict=True):
            p.grad = g
        return ps

    reasons = {
        "gapped view": "parameter 1 .*gaps or overlaps",
        "float64": "parameter 1 .*float64",
        "grad aliases its param": "parameter 1 .*shares memory",
        "params overlap": "parameter 0 .*shares memory",
        "grad of another layout": "parameter 1 .*its gradient has sizes",
    }
    ps = setup()
    before = [p.detach().clone() for p in ps]
    opt = rmsprop.RMSprop(ps, fused=True, momentum=0.9)
    with pytest.raises(RuntimeError, match=f"fused=True: {reasons[case]}.*nothing was updated"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, ps, strict=True)) and len(opt.state) == 0
    assert calls == []

    torch.manual_seed(0)
    ours = setup()
    start = [p.detach().clone() for p in ours]
    rmsprop.RMSprop(ours, momentum=0.9).step()
    torch.manual_seed(0)
    theirs = setup()
    torch.optim.RMSprop(theirs, momentum=0.9, foreach=True).step()
    routed = {"params overlap": [0, 1]}.get(case, [1])
    for i in routed:
        assert torch.equal(ours[i], theirs[i]), i
    if case != "params overlap":
        assert calls == [(1, 1, 0, DEFAULT_MODE, True)]
        ref = run_reference(
            start[0].double().cpu().numpy(), [ours[0].grad.double().cpu().numpy()], momentum=0.9
        )
        np.testing.assert_allclose(ours[0].detach().double().cpu().numpy(), ref.param, rtol=2e-5, atol=1e-6)


def test_triton_negative_bit_gradients_take_torch_path():
    g = torch.randn(20, device=DEVICE)._neg_view()
    assert g.is_neg()
    (p,) = params_on([torch.randn(20)])
    q = p.detach().clone().requires_grad_()
    p.grad, q.grad = g, g.resolve_neg()
    rmsprop.RMSprop([p], momentum=0.9).step()
    torch.optim.RMSprop([q], momentum=0.9, foreach=True).step()
    assert torch.equal(p, q)
    p.grad = g
    with pytest.raises(RuntimeError, match="negative bit"):
        rmsprop.RMSprop([p], fused=True).step()


def test_triton_refuses_inference_tensors_and_bumps_versions():
    with torch.inference_mode():
        ip = torch.randn(10, device=DEVICE)
    ip.grad = torch.randn(10, device=DEVICE)
    with pytest.raises(RuntimeError, match="inference tensor"):
        rmsprop.RMSprop([ip], fused=True).step()
    p = torch.randn(100, device=DEVICE, requires_grad=True)
    opt = rmsprop.RMSprop([p], momentum=0.9, fused=True)
    loss = (p * p).sum()  # saves p for the backward
    p.grad = torch.randn(100, device=DEVICE)
    v0 = p._version
    opt.step()
    assert p._version > v0 and all(t._version > 0 for t in opt.state[p].values())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_triton_explicit_torch_paths_stay_bit_identical_to_torch(monkeypatch):
    """foreach=True / False and fused=False keep torch's op paths: no launch, torch's bits."""
    calls = spy_launches(monkeypatch)
    start = [torch.randn(30), torch.randn(4, 4)]
    grads = make_grads(start, steps=3)
    cases = (
        ({"foreach": True}, {"foreach": True}),
        ({"foreach": False}, {"foreach": False}),
        ({"fused": False}, {}),
    )
    for kw, torch_kw in cases:
        ours, _ = train(
            lambda ps, kw=kw: rmsprop.RMSprop(ps, momentum=0.9, centered=True, **kw), start, grads
        )
        theirs, _ = train(
            lambda ps, kw=torch_kw: torch.optim.RMSprop(ps, momentum=0.9, centered=True, **kw), start, grads
        )
        assert_bitwise(ours, theirs)
    assert calls == []


def test_triton_unavailable_falls_back_silently_and_fused_true_says_why(monkeypatch):
    import warnings

    monkeypatch.setattr(loader, "_error", "simulated: no triton")
    calls = spy_launches(monkeypatch)
    start = [torch.randn(30)]
    grads = make_grads(start, steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours, _ = train(lambda ps: rmsprop.RMSprop(ps, momentum=0.9), start, grads)
    theirs, _ = train(lambda ps: torch.optim.RMSprop(ps, momentum=0.9), start, grads)
    assert_bitwise(ours, theirs) and calls == []
    with pytest.raises(
        RuntimeError, match="fused=True: the Triton kernel .* unavailable: simulated: no triton"
    ):
        train(lambda ps: rmsprop.RMSprop(ps, fused=True), start, grads)


def test_triton_absent_costs_cpu_users_nothing():
    """Without triton (made unimportable in a subprocess), CPU training works as before, without
    a warning, and the Triton backend is never even consulted (it would import triton only for a
    tensor on a device it steps). (With triton installed, torch's optimizer base class imports
    it anyway.)"""
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["triton"] = None  # import triton now raises ImportError
        warnings.simplefilter("error")
        import torch, rmsprop
        from rmsprop.backends.fused_triton import loader
        p = torch.randn(10, requires_grad=True); p.grad = torch.randn(10)
        for kw in ({}, {"fused": True}, {"foreach": True}, {"momentum": 0.9, "centered": True}):
            rmsprop.RMSprop([p], **kw).step()
        assert loader._error is loader._UNCHECKED, "the Triton backend was consulted"
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ----------------------------------------------------------------------------- torch.compile
def _compiled_training(make_optimizer, steps=3):
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 1)).to(DEVICE)
    opt = make_optimizer(model.parameters())
    X, y = torch.randn(32, 10).to(DEVICE), torch.randn(32, 1).to(DEVICE)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    @torch.compile(backend=backend)
    def train_step():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(X), y)
        loss.backward()
        opt.step()
        return loss

    for _ in range(steps):
        train_step()
    ops = sum(1 for g in graphs for n in g.graph.nodes if "rmsprop.triton_step" in str(n.target))
    return len(graphs), ops, opt, model


def test_triton_compiled_training_step_has_the_op_and_torchs_graph_count(monkeypatch):
    """A compiled training step: the custom op rmsprop::triton_step is in the graph and runs on
    steps 1-3 (never the eager path), with no more graphs than torch's RMSprop makes."""
    through_op = []
    original = fused_triton.prepare

    def spy(*args, **kwargs):
        through_op.append(kwargs["cache"] is None)
        return original(*args, **kwargs)

    monkeypatch.setattr(fused_triton, "prepare", spy)
    lr = lambda: torch.tensor(0.01, device=DEVICE)  # noqa: E731
    ours, ops, opt, _ = _compiled_training(lambda p: rmsprop.RMSprop(p, momentum=0.9, lr=lr()))
    theirs, _, _, _ = _compiled_training(lambda p: torch.optim.RMSprop(p, momentum=0.9, lr=lr()))
    assert ops >= 1 and through_op == [True] * 3
    assert ours <= theirs, (ours, theirs)
    assert all(s["step"].item() == 3 for s in opt.state.values())


def test_triton_compiled_step_equals_eager_bit_for_bit():
    import torch._dynamo

    start = [torch.randn(3, 4), torch.randn(5)]
    grads = make_grads(start, steps=3)
    eager = params_on(start)
    compiled = params_on(start)
    eager_opt = rmsprop.RMSprop(eager, fused=True, **NAMED["momentum+centered"])
    compiled_opt = rmsprop.RMSprop(compiled, fused=True, **NAMED["momentum+centered"])
    torch._dynamo.reset()
    step = torch.compile(compiled_opt.step)
    for g in grads:
        for p, q, gi in zip(eager, compiled, g, strict=True):
            p.grad, q.grad = gi.clone().to(DEVICE), gi.clone().to(DEVICE)
        eager_opt.step()
        step()
    assert_bitwise(eager, compiled)


# ----------------------------------------------------------------------------- distributed, probes
def test_triton_dtensor_parameters_step_their_local_shards(tmp_path):
    """DTensor parameters (a one-rank gloo mesh, in a subprocess, on the CPU route): the kernel
    steps the local shards, bit for bit the plain tensors' result."""
    code = textwrap.dedent(
        """
        import socket, torch, torch.distributed as dist
        from torch.distributed.tensor import distribute_tensor, Shard
        from torch.distributed.device_mesh import init_device_mesh
        import rmsprop
        from rmsprop.backends.fused_triton import plan
        plan.DEVICE_TYPES.add("cpu")
        s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        start = [torch.randn(8, 3), torch.randn(5)]
        grads = [[torch.randn_like(t) for t in start] for _ in range(3)]
        launches = []
        from rmsprop.backends import fused_triton
        original = fused_triton._launch
        fused_triton._launch = lambda la, *a, **k: (launches.append(len(la.indices)), original(la, *a, **k))[1]
        def run(distributed):
            ps = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)]) if distributed else t.clone())
                  for t in start]
            opt = rmsprop.RMSprop(ps, momentum=0.9, centered=True)
            for step in grads:
                for p, g in zip(ps, step):
                    p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)]) if distributed else g.clone()
                opt.step()
            return [p.full_tensor() if distributed else p.detach() for p in ps]
        a, b = run(True), run(False)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert launches == [2] * 6, launches
        dist.destroy_process_group()
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# The boundary probes of test_probes.py (the "trust the fast path" issue's defects), with CPU
# tensors routed to the Triton backend; in one subprocess, so a crash fails the test.
TRITON_PROBES = ["1-undersized-state", "2-undersized-grad", "3-state-storage-replaced", "4-functional-missing-lists",
                 "5-lr-tensor-shapes", "11-param-grown", "11-version-counters", "11-inference-tensors",
                 "11-neg-conj-bits"]  # fmt: skip


def test_triton_boundary_probes():
    from test_probes import PRELUDE, PROBES

    parts = [PRELUDE, "from rmsprop.backends.fused_triton import plan\nplan.DEVICE_TYPES.add('cpu')\n"]
    for name in TRITON_PROBES:
        parts.append(f"print('probe {name}', flush=True)\n")
        parts.append(f"def _probe():\n{textwrap.indent(PROBES[name], '    ')}\n_probe()\n")
    parts.append("print('all probes passed')\n")
    out = subprocess.run([sys.executable, "-c", "".join(parts)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "all probes passed" in out.stdout, (out.stdout[-2000:], out.stderr[-4000:])


# ----------------------------------------------------------------------------- the compiler
# Specialisations compiled for the GPU in CI (each flag on in at least one, each storage format,
# each step-counter mode, aligned and not); the first is the one whose code is inspected closely.
HOPPER_VARIANTS = {
    "fp32-everything": dict(P=0, STEP=1, CENTERED=True, MOMENTUM=2, DECOUPLED=True, BIAS=True, MAXIMIZE=True,
                            LR_TENSOR=True, HAS_SCALE=True, HAS_INF=True, ALIGNED=True),
    "bf16-momentum-centered": dict(P=1, STEP=1, CENTERED=True, MOMENTUM=1, LR_IN_MOMENTUM=True, ALIGNED=True),
    "fp16-coupled-eps-inside": dict(P=2, STEP=2, COUPLED=True, EPS_IN_SQRT=True, HAS_SCALE=True, ALIGNED=True),
    "bf16-host-counters-bias-unaligned": dict(P=1, STEP=0, BIAS=True, HAS_INF=True, ALIGNED=False),
    "fp32-plain-host-counters": dict(P=0, STEP=0, ALIGNED=True),
}  # fmt: skip


@pytest.mark.parametrize("variant", list(HOPPER_VARIANTS), ids=lambda v: f"triton-{v}")
def test_triton_kernel_compiles_for_hopper_unfused_and_vectorised(variant):
    """What the GPU will run, compiled here for sm_90 (no GPU needed): every variant compiles;
    division and square root are IEEE (div.rn / sqrt.rn), nothing is fused into an FMA or
    flushed to zero (so the GPU rounds as the CPU kernel); aligned launches load and store
    128-bit vectors; counters on the device are handed over with acquire-release atomics."""
    import re

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = loader.kernel(interpret=False)
    signature = {
        "table": "*i64", "grads": "*i64", "blocks": "*i32", "chunks": "*i32", "counters": "*i32",
        "corrections": "*fp32", "lr_ptr": "*fp32", "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32",
        "T": "i32", "B": "i32", "lr": "fp32", "alpha": "fp32", "oma": "fp32", "eps": "fp32", "wd": "fp32",
        "decay": "fp32", "mu": "fp32", "alpha_bits": "i64", "wd_bits": "i64",
    }  # fmt: skip
    flags = {"CENTERED": False, "MOMENTUM": 0, "EPS_IN_SQRT": False, "COUPLED": False, "DECOUPLED": False,
             "BIAS": False, "MAXIMIZE": False, "LR_IN_MOMENTUM": False, "LR_TENSOR": False, "HAS_SCALE": False,
             "HAS_INF": False, "BLOCK": 1024, "CHUNK": 8192, **HOPPER_VARIANTS[variant]}  # fmt: skip
    types = (tl.float32, tl.uint16, tl.float16)
    flags.update(P_TYPE=types[flags["P"]], S=flags["P"], S_TYPE=types[flags["P"]])
    for name in flags:
        signature[name] = "constexpr"
    source = ASTSource(fn=kernel, signature=signature, constexprs=flags)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "enable_fp_fusion": False}
    )
    ptx = compiled.asm["ptx"]
    ops = set(
        re.findall(
            r"\b(?:ld|st)\.global[.\w]*|\bfma\.[\w.]+|\.ftz\b|\bdiv\.[\w.]+|\bsqrt\.[\w.]+|\batom\.[\w.]+",
            ptx,
        )
    )
    assert "div.rn.f32" in ops and "sqrt.rn.f32" in ops, ops
    assert not any(op.startswith("fma") or op == ".ftz" for op in ops), ops
    if flags["ALIGNED"]:
        assert "ld.global.v4.b32" in ops and "st.global.v4.b32" in ops, ops
    if flags["STEP"]:
        assert any(op.startswith("atom.global") and "acq_rel" in op for op in ops), ops
    if flags["STEP"] and flags["BIAS"]:
        assert "div.rn.f64" in ops, ops


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "int8"], ids=str)
def test_a_low_bit_state_never_reaches_the_triton_kernel(monkeypatch, state_dtype):
    """The kernel stores torch's format only: a group with a state_dtype takes the low-bit paths
    (on the CPU here: the fused CPU kernel's low-bit loops), with the same numbers as without the
    routing, and the Triton backend refuses such a Rule should a caller ever hand it one."""
    launches = spy_launches(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    values = [torch.randn(5000, generator=gen), torch.randn(300, generator=gen)]
    grads = [[torch.randn(v.shape, generator=gen) for v in values] for _ in range(3)]

    def train():
        params = params_on(values)
        opt = rmsprop.RMSprop(params, lr=0.01, momentum=0.9, centered=True, state_dtype=state_dtype,
                              int8_min_numel=1000)  # fmt: skip
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone().to(DEVICE)
            opt.step()
        return [p.detach().cpu() for p in params]

    routed = train()
    assert launches == []
    with cpu_kernel():
        direct = train()
    assert all(torch.equal(a, b) for a, b in zip(routed, direct, strict=True))
    rule = Rule.from_group({**rmsprop.RMSprop([torch.zeros(1, requires_grad=True)]).defaults, "state_dtype": state_dtype})
    with pytest.raises(RuntimeError, match="torch's state format only"):
        fused_triton.prepare(tuple([] for _ in range(6)), lr=0.01, rule=rule, capturable=False, required=True,
                             cache=None, torch_path=None)  # fmt: skip
