"""Each preset against its framework: hand-checked numbers, and the real peer where installable.

Tolerances: everything runs in float64. Where a peer computes the same formula in a different
order (TF/timm's v + (1-rho)(g^2 - v), Keras's p - p*wd*lr), the results differ by a few ulps per
step, hence rtol 1e-10 rather than exact equality.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from peers import keras_rmsprop, optax_rmsprop, tf1_documented, timm_rmsprop

from rmsprop import PRESETS, from_preset

RTOL, ATOL = 1e-10, 1e-12


def _grads(n=12, shape=(3, 4), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) * (1 + 0.5 * math.sin(t)) for t in range(n)]


def _start(shape=(3, 4), seed=1):
    return np.random.default_rng(seed).standard_normal(shape)


def ours(preset: str, param, grads, **overrides) -> np.ndarray:
    p = torch.tensor(param, dtype=torch.float64, requires_grad=True)
    opt = from_preset(preset, [p], **overrides)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return p.detach().numpy()


# ----------------------------------------------------------------------------- hand-checked numbers
# One step from theta = 1 with g = 0.5, written straight from each framework's documented
# formula and evaluated in float64 (v0 = 0 unless the framework starts it at 1):
HAND_CHECKED = {
    "torch": 1 - 0.01 * 0.5 / (math.sqrt((1 - 0.99) * 0.25) + 1e-8),  # eps outside the root
    "tensorflow": 1 - 1e-3 * 0.5 / math.sqrt(1 + (0.25 - 1) * (1 - 0.9) + 1e-10),  # ms starts at 1
    "keras": 1 - 1e-3 * 0.5 / math.sqrt((1 - 0.9) * 0.25 + 1e-7),
    "optax": 1 - 1e-3 * 0.5 / math.sqrt((1 - 0.9) * 0.25 + 1e-8),
    "timm": 1 - 1e-2 * 0.5 / math.sqrt(1 + (0.25 - 1) * (1 - 0.9) + 1e-10),
    "seed": 1 - 1e-3 * 0.5 / math.sqrt((1 - 0.9) * 0.25 + 1e-8),
}
# A few float64 ulps of 1 (the implementations order the same operations differently); the
# nearest wrong answers are 4e-10 away (eps 1e-7 for 1e-8 inside the root) and 1e-8 away (eps
# outside the root instead of inside).
HAND_RTOL = 1e-15


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_one_step_hand_checked(name):
    assert name in HAND_CHECKED, "every preset needs a hand-checked number"
    result = ours(name, np.array([1.0]), [np.array([0.5])])
    assert result[0] == pytest.approx(HAND_CHECKED[name], rel=HAND_RTOL, abs=0)


def test_hand_checked_numbers_tell_the_flavours_apart():
    """The tolerance above is far below the distance between the flavours it must tell apart."""
    values = sorted(set(HAND_CHECKED.values()))
    assert abs(HAND_CHECKED["keras"] - HAND_CHECKED["optax"]) > 1e5 * HAND_RTOL
    eps_outside = 1 - 1e-3 * 0.5 / (math.sqrt((1 - 0.9) * 0.25) + 1e-8)
    assert abs(eps_outside - HAND_CHECKED["seed"]) > 1e5 * HAND_RTOL
    assert len(values) == 5  # optax and seed are the same formula; all others differ


def test_presets_are_records_with_peers_and_deviations():
    for name, preset in PRESETS.items():
        assert preset.name == name and preset.peer and preset.deviations
        with pytest.raises(TypeError):
            preset.options["lr"] = 1.0  # read-only data


def test_from_preset_overrides_and_errors():
    p = [torch.zeros(2, requires_grad=True)]
    opt = from_preset("keras", p, lr=0.5, momentum=0.9)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["alpha"], group["eps"]) == (0.5, 0.9, 0.9, 1e-7)
    assert group["eps_in_sqrt"] and group["lr_in_momentum"] and group["decoupled_weight_decay"]
    with pytest.raises(ValueError, match="unknown preset 'pytorch'"):
        from_preset("pytorch", p)
    with pytest.raises(TypeError, match="rho"):
        from_preset("keras", p, rho=0.9)  # overrides use this library's names


def test_torch_preset_is_torch():
    start, grads = _start(), _grads()
    p = torch.tensor(start, requires_grad=True)
    opt = torch.optim.RMSprop([p])
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_array_equal(ours("torch", start, grads), p.detach().numpy())


# ----------------------------------------------------------------------------- TF1: documented ops
@pytest.mark.parametrize("momentum,centered", list(itertools.product([0.0, 0.9], [False, True])))
def test_tensorflow_matches_tf1_op_formula(momentum, centered):
    start, grads = _start(), _grads()
    lrs = 0.01
    expected = tf1_documented(start, grads, lr=lrs, momentum=momentum, centered=centered)
    got = ours("tensorflow", start, grads, lr=lrs, momentum=momentum, centered=centered)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- Keras 3 (torch backend)
def keras_lr(lr: float) -> float:
    """Keras keeps the learning rate in a float32 variable and casts it to the parameter's dtype,
    so a float64 parameter sees lr rounded to float32 (1e-3 -> 0.0010000000474974513)."""
    return float(np.float32(lr))


@pytest.mark.parametrize(
    "momentum,centered,weight_decay", list(itertools.product([0.0, 0.9], [False, True], [0.0, 0.05]))
)
def test_keras_matches_real_keras(momentum, centered, weight_decay):
    start, grads = _start(), _grads()
    # Keras's torch backend decays weights by the factor 1 - wd * lr computed with its float32 lr,
    # so the factor itself is rounded to float32. lr = 2^-7 and wd = 2^-4 make it exact there.
    lr = 2.0**-7
    weight_decay = 2.0**-4 if weight_decay else 0.0
    kw = {"learning_rate": lr, "momentum": momentum, "centered": centered}
    if weight_decay:
        kw["weight_decay"] = weight_decay
    expected = keras_rmsprop(start, grads, **kw)
    got = ours("keras", start, grads, lr=lr, momentum=momentum, centered=centered, weight_decay=weight_decay)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def test_keras_defaults_match():
    start, grads = _start(), _grads()
    expected = keras_rmsprop(start, grads)
    np.testing.assert_allclose(ours("keras", start, grads, lr=keras_lr(1e-3)), expected, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- optax (CPU jax, float64)
OPTAX_GRID = [
    dict(
        zip(
            ("centered", "momentum", "nesterov", "bias_correction", "eps_in_sqrt", "initial_scale"),
            v,
            strict=True,
        )
    )
    for v in itertools.product(
        [False, True], [None, 0.9], [False, True], [False, True], [False, True], [0.0, 1.0]
    )
    if not (v[2] and v[1] is None)
]


@pytest.mark.parametrize("options", OPTAX_GRID, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_optax_matches_real_optax(options):
    start, grads = _start(), _grads()
    if options["centered"] and options["bias_correction"] and options["initial_scale"] == 0:
        # zero variance at t=1 in exact arithmetic: both sides would divide by rounding noise
        # (see tests/test_reference.py); start from dyadic values so step 1 is exact on both.
        rng = np.random.default_rng(5)
        start = rng.integers(-8, 8, start.shape) / 8
        grads = [rng.integers(-8, 8, start.shape) / 4, *grads[1:]]
        decay = 0.75
    else:
        decay = 0.9
    expected = optax_rmsprop(start, grads, learning_rate=0.01, decay=decay, **options)
    mapped = {
        "centered": options["centered"],
        "momentum": options["momentum"] or 0.0,
        "nesterov": options["nesterov"],
        "bias_correction": options["bias_correction"],
        "eps_in_sqrt": options["eps_in_sqrt"],
        "initial_square_avg": options["initial_scale"],
    }
    got = ours("optax", start, grads, lr=0.01, alpha=decay, **mapped)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def test_optax_defaults_match():
    start, grads = _start(), _grads()
    np.testing.assert_allclose(
        ours("optax", start, grads), optax_rmsprop(start, grads, learning_rate=1e-3), rtol=RTOL, atol=ATOL
    )


# ----------------------------------------------------------------------------- timm RMSpropTF
@pytest.mark.parametrize(
    "momentum,centered,weight_decay,decoupled,lr_in_momentum",
    [
        v
        for v in itertools.product([0.0, 0.9], [False, True], [0.0, 0.05], [False, True], [False, True])
        if not (v[3] and v[2] == 0)
    ],
)
def test_timm_matches_real_rmsprop_tf(momentum, centered, weight_decay, decoupled, lr_in_momentum):
    start, grads = _start(), _grads()
    lrs = [0.01 * 0.8**t for t in range(len(grads))]  # a changing lr tells lr_in_momentum apart
    kw = dict(momentum=momentum, centered=centered, weight_decay=weight_decay, lr_in_momentum=lr_in_momentum)

    cls = __import__("peers").load_timm_rmsprop_tf()
    p_timm = torch.tensor(start, requires_grad=True)
    opt_timm = cls([p_timm], lr=lrs[0], decoupled_decay=decoupled, **kw)
    p_ours = torch.tensor(start, requires_grad=True)
    opt_ours = from_preset("timm", [p_ours], lr=lrs[0], decoupled_weight_decay=decoupled, **kw)
    for t, g in enumerate(grads):
        for opt, p in ((opt_timm, p_timm), (opt_ours, p_ours)):
            opt.param_groups[0]["lr"] = lrs[t]
            p.grad = torch.tensor(g)
            opt.step()
    np.testing.assert_allclose(p_ours.detach().numpy(), p_timm.detach().numpy(), rtol=RTOL, atol=ATOL)


def test_timm_defaults_match():
    start, grads = _start(), _grads()
    np.testing.assert_allclose(ours("timm", start, grads), timm_rmsprop(start, grads), rtol=RTOL, atol=ATOL)


def test_seed_preset_is_the_seed_formula():
    start, grads = _start(), _grads()
    theta, v = start.copy(), np.zeros_like(start)
    for g in grads:
        v = 0.9 * v + 0.1 * g * g
        theta = theta - 1e-3 * g / np.sqrt(v + 1e-8)
    np.testing.assert_allclose(ours("seed", start, grads), theta, rtol=RTOL, atol=ATOL)


def test_a_peer_difference_really_shows():
    """Guard against a vacuous comparison: torch's and Keras's flavours do differ."""
    start, grads = _start(), _grads()
    assert not np.allclose(
        ours("keras", start, grads, lr=0.01, alpha=0.99, eps=1e-8), ours("torch", start, grads)
    )
