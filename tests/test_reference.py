"""Every backend against the float64 NumPy reference, for every combination of options.

The combinations and the tolerances (with the rounding each allows) come from tests/cases.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cases import BACKENDS, COMBINATIONS, PROPERTY_TOLERANCE, SWITCHES, tolerance
from helpers import make_grads, make_params, run, to_real_numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rmsprop
from rmsprop.reference import run_reference

LRS = [0.01, 0.01, 0.02, 0.02, 0.005, 0.005, 0.01, 0.03]  # a changing lr exercises lr_in_momentum


def _compare_with_reference(params, grads, options, lrs, backend, rtol=None, atol=None):
    if rtol is None:
        tol = tolerance(backend, params[0].dtype)
        rtol, atol = tol.rtol, tol.atol
    alpha = options.pop("alpha", 0.9)
    ours, opt = run(
        lambda p: rmsprop.RMSprop(p, lr=lrs[0], alpha=alpha, **BACKENDS[backend], **options),
        params,
        grads,
        lrs,
    )
    for i, p in enumerate(ours):
        ref = run_reference(
            to_real_numpy(params[i]),
            [to_real_numpy(step[i]) for step in grads],
            lrs=lrs,
            alpha=alpha,
            **options,
        )
        np.testing.assert_allclose(to_real_numpy(p), ref.param, rtol=rtol, atol=atol)
        for key, expected in ref.state().items():
            np.testing.assert_allclose(to_real_numpy(opt.state[p][key]), expected, rtol=rtol, atol=atol)


def _noise_dominated_first_step(options) -> bool:
    """Centered + bias correction from v0 = 0: at t=1, v_hat - m_hat^2 is 0 in exact arithmetic,
    so the computed value is +-1e-18 of rounding noise. With eps outside the root the first update
    is g / (sqrt(noise) + eps), sqrt(1e-18) ~ 1e-9 being comparable to eps = 1e-8: two correct
    implementations, the reference included, disagree by tens of percent. With eps inside it is
    g / sqrt(noise + eps): noise/eps ~ 1e-10 relative, then amplified by later cancellation.
    """
    return options["centered"] and options["bias_correction"] and options["initial_square_avg"] == 0


def _exact_first_step(params, grads):
    """Dyadic parameters and first gradients (k/8, k/4) and alpha=0.75, weight decay 0.25: every
    step-1 operation is then exact, the variance is exactly 0 on both sides, and the family above
    can be checked to full precision. Later steps use the ordinary random gradients."""
    gen = torch.Generator().manual_seed(7)
    params = [torch.randint(-8, 8, p.shape, generator=gen).to(p.dtype) / 8 for p in params]
    grads = [[torch.randint(-8, 8, g.shape, generator=gen).to(g.dtype) / 4 for g in grads[0]], *grads[1:]]
    return params, grads


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize(
    "options", COMBINATIONS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if v) or "plain"
)
def test_every_combination_matches_reference(options, backend):
    params = make_params(torch.float64, shapes=((4, 3), (5,)))
    grads = make_grads(params, steps=len(LRS))
    options = dict(options)
    if _noise_dominated_first_step(options):
        params, grads = _exact_first_step(params, grads)
        options.update(alpha=0.75, weight_decay=0.25 if options["weight_decay"] else 0.0)
    _compare_with_reference(params, grads, options, LRS, backend)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", [torch.complex128, torch.float32])
def test_all_switches_on_other_dtypes(dtype, backend):
    """Complex params update (real, imag) as two reals; float32 agrees to float32 rounding."""
    options = {k: v[-1] for k, v in SWITCHES.items()}
    params = make_params(dtype)
    grads = make_grads(params, steps=len(LRS))
    _compare_with_reference(params, grads, options, LRS, backend)


def test_combination_count_covers_every_switch():
    # 2^10 combinations, minus the 2^8 with nesterov on and no momentum
    assert len(COMBINATIONS) == 2**10 - 2**8


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_centered_variance_is_clamped_where_torch_returns_nan(backend):
    """Constant gradients: v - m^2 = alpha^t (1 - alpha^t) g^2 sinks below float32 rounding and
    comes out negative for some elements. torch takes its square root (NaN); the clamp keeps ours
    finite. While the variance is still far above rounding (the first 40 steps: alpha^40 = 1.5e-2)
    every backend follows the float64 reference; torch's op paths then stay bit-identical to
    torch wherever torch is finite (same ops, same rounding noise)."""
    values = torch.rand(2000, generator=torch.Generator().manual_seed(0)) * 3
    lr, alpha, early, late = 1e-3, 0.9, 40, 300

    def drive(cls, steps):
        p = torch.zeros(2000, requires_grad=True)
        if cls is torch.optim.RMSprop:
            opt = cls([p], lr=lr, alpha=alpha, centered=True, foreach=backend == "foreach")
        else:
            opt = cls([p], lr=lr, alpha=alpha, centered=True, **BACKENDS[backend])
        for _ in range(steps):
            p.grad = values.clone()
            opt.step()
        return p.detach()

    ref = run_reference(np.zeros(2000), [values.double().numpy()] * early, lr=lr, alpha=alpha, centered=True)
    # float32 rounding of v - m^2 relative to the variance grows as alpha^-t: 1e-7 / 1.5e-2 at t=40
    np.testing.assert_allclose(
        drive(rmsprop.RMSprop, early).double().numpy(), ref.param, rtol=2e-4, atol=1e-7
    )
    ours, theirs = drive(rmsprop.RMSprop, late), drive(torch.optim.RMSprop, late)
    assert theirs.isnan().sum() > 100  # the scenario really is one where torch fails
    assert torch.isfinite(ours).all()
    if backend != "fused":
        finite = theirs.isfinite()
        assert torch.equal(ours[finite], theirs[finite])


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_centered_alpha_zero_with_exact_inputs(backend):
    """alpha = 0, centered: v - m^2 = g^2 - g^2 is 0 at every step, so each update is g / eps.
    Dyadic gradients make every operation exact, so both sides compute exactly that."""
    params = make_params(torch.float64, shapes=((4, 3), (5,)))
    gen = torch.Generator().manual_seed(3)
    params = [torch.randint(-8, 8, p.shape, generator=gen).double() / 8 for p in params]
    grads = [[torch.randint(-8, 8, p.shape, generator=gen).double() / 4 for p in params] for _ in range(4)]
    options = {"alpha": 0.0, "centered": True, "eps": 0.5, "momentum": 0.5}
    _compare_with_reference(params, grads, options, [0.25] * 4, backend, rtol=0, atol=0)


shapes = st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=shapes,
    lr=st.floats(1e-4, 1.0),
    alpha=st.floats(0.0, 0.999),
    eps=st.floats(1e-8, 1e-1),
    momentum=st.sampled_from([0.0, 0.5, 0.99]),
    weight_decay=st.floats(0.0, 0.5),
    initial_square_avg=st.floats(0.0, 2.0),
    flags=st.fixed_dictionaries(
        {
            k: st.booleans()
            for k in (
                "eps_in_sqrt",
                "centered",
                "lr_in_momentum",
                "decoupled_weight_decay",
                "bias_correction",
                "maximize",
                "nesterov",
            )
        }
    ),
    backend=st.sampled_from(list(BACKENDS)),
    seed=st.integers(0, 2**16),
)
def test_property_any_shape_and_hyperparameters(
    shape, lr, alpha, eps, momentum, weight_decay, initial_square_avg, flags, backend, seed
):
    if flags["nesterov"] and momentum == 0:
        flags = {**flags, "nesterov": False}
    if flags["centered"] and flags["bias_correction"]:
        # see _noise_dominated_first_step: that family is covered with exact inputs above
        initial_square_avg = max(initial_square_avg, 0.5)
    if flags["centered"]:
        # alpha ~ 0 makes m = g and v = g^2: a variance of pure rounding noise at every step
        # (see test_centered_alpha_zero_with_exact_inputs for that case, checked exactly)
        alpha = max(alpha, 1e-3)
    params = make_params(torch.float64, shapes=(shape, (3,)), seed=seed)
    grads = make_grads(params, steps=5, seed=seed + 1)
    options = dict(
        alpha=alpha,
        eps=eps,
        momentum=momentum,
        weight_decay=weight_decay,
        initial_square_avg=initial_square_avg,
        **flags,
    )
    tol = PROPERTY_TOLERANCE
    _compare_with_reference(params, grads, options, [lr] * 5, backend, rtol=tol.rtol, atol=tol.atol)
