"""Each preset against its framework: hand-checked numbers, and the real peer where installable.

Tolerances: everything runs in float64. Where a peer computes the same formula in a different
order (TF/timm's v + (1-rho)(g^2 - v), Keras's p - p*wd*lr), the results differ by a few ulps per
step, hence rtol 1e-10 rather than exact equality.
"""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from peers import (
    a3c_paper,
    dqn_transcribed,
    keras_rmsprop,
    optax_rmsprop,
    sb3_rmsprop_tf_like,
    tf1_documented,
    timm_rmsprop,
)

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
    "sb3": 1 - 1e-2 * 0.5 / math.sqrt(0.99 * 1 + (1 - 0.99) * 0.25 + 1e-8),  # v starts at 1
    # centered: g = 0.05 * 0.5, g2 = 0.05 * 0.25, 0.01 inside the root
    "dqn": 1 - 2.5e-4 * 0.5 / math.sqrt(0.05 * 0.25 - (0.05 * 0.5) ** 2 + 0.01),
    "a3c": 1 - 7e-4 * 0.5 / math.sqrt((1 - 0.99) * 0.25 + 0.1),
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
    # DQN's flavour without centering, and SB3's with v0 = 0 (torch's start), are far away
    dqn_uncentered = 1 - 2.5e-4 * 0.5 / math.sqrt(0.05 * 0.25 + 0.01)
    assert abs(dqn_uncentered - HAND_CHECKED["dqn"]) > 1e5 * HAND_RTOL
    sb3_from_zero = 1 - 1e-2 * 0.5 / math.sqrt((1 - 0.99) * 0.25 + 1e-8)
    assert abs(sb3_from_zero - HAND_CHECKED["sb3"]) > 1e5 * HAND_RTOL
    assert len(values) == 8  # optax and seed are the same formula; all others differ


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


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("decoupled", [False, True])
def test_timm_state_dict_loads_and_training_continues_like_timm(decoupled, centered):
    """RMSpropTF's state dict through PRESETS["timm"].complete_state_dict: its own names
    (decoupled_decay) are translated, so the run continues as timm's to the tolerance of the
    parity test above, lr schedule included. The optimizer it loads into is built with the
    preset's defaults only: every value comes from the checkpoint. Before, decoupled_decay was
    dropped and the run continued with coupled (L2) decay."""
    start, grads = _start(), _grads()
    lrs = [0.01 * 0.8**t for t in range(len(grads))]
    kw = dict(momentum=0.9, centered=centered, weight_decay=0.05)
    cls = __import__("peers").load_timm_rmsprop_tf()
    p_timm = torch.tensor(start, requires_grad=True)
    opt_timm = cls([p_timm], lr=lrs[0], decoupled_decay=decoupled, **kw)
    for t, g in enumerate(grads[:6]):
        opt_timm.param_groups[0]["lr"] = lrs[t]
        p_timm.grad = torch.tensor(g)
        opt_timm.step()
    saved = copy.deepcopy(opt_timm.state_dict())
    saved_group = dict(saved["param_groups"][0])
    completed = PRESETS["timm"].complete_state_dict(saved)
    assert saved["param_groups"][0] == saved_group  # the input is not modified
    assert "decoupled_decay" not in completed["param_groups"][0]
    p_ours = p_timm.detach().clone().requires_grad_()
    opt_ours = from_preset("timm", [p_ours])
    opt_ours.load_state_dict(completed)
    group = opt_ours.param_groups[0]
    assert group["decoupled_weight_decay"] is decoupled and group["weight_decay"] == 0.05
    assert group["momentum"] == 0.9 and group["centered"] is centered
    for t, g in enumerate(grads[6:], start=6):
        for opt, p in ((opt_timm, p_timm), (opt_ours, p_ours)):
            opt.param_groups[0]["lr"] = lrs[t]
            p.grad = torch.tensor(g)
            opt.step()
    np.testing.assert_allclose(p_ours.detach().numpy(), p_timm.detach().numpy(), rtol=RTOL, atol=ATOL)


def test_timm_state_dicts_with_unsupported_options_are_refused():
    """caution and corrected_weight_decay are timm options this library does not have: a
    checkpoint that turns one on is refused, naming it (continuing it here would be another
    algorithm); turned off (timm's default), it loads. Two values for one option are refused."""
    cls = __import__("peers").load_timm_rmsprop_tf()
    p = torch.tensor(_start(), requires_grad=True)
    opt = cls([p], lr=0.01, momentum=0.9, weight_decay=0.05, decoupled_decay=True)
    p.grad = torch.tensor(_grads()[0])
    opt.step()
    good = opt.state_dict()
    assert good["param_groups"][0]["caution"] is False
    assert good["param_groups"][0]["corrected_weight_decay"] is False
    PRESETS["timm"].complete_state_dict(good)
    turned_on = {"caution": True, "corrected_weight_decay": True, "decoupled_weight_decay": False}
    for key, value in turned_on.items():
        bad = copy.deepcopy(good)
        bad["param_groups"][0][key] = value
        with pytest.raises(ValueError, match=key):
            PRESETS["timm"].complete_state_dict(bad)


def test_seed_preset_is_the_seed_formula():
    start, grads = _start(), _grads()
    theta, v = start.copy(), np.zeros_like(start)
    for g in grads:
        v = 0.9 * v + 0.1 * g * g
        theta = theta - 1e-3 * g / np.sqrt(v + 1e-8)
    np.testing.assert_allclose(ours("seed", start, grads), theta, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- SB3 RMSpropTFLike
SB3_GRID = list(itertools.product([0.0, 0.9], [False, True], [0.0, 0.05]))


def _run_against_sb3(start, grads, lrs, fused, **kw):
    cls = sb3_rmsprop_tf_like()
    p_sb3 = torch.tensor(start, requires_grad=True)
    opt_sb3 = cls([p_sb3], lr=lrs[0], **kw)
    p_ours = torch.tensor(start, requires_grad=True)
    opt_ours = from_preset("sb3", [p_ours], lr=lrs[0], fused=fused, **kw)
    for t, g in enumerate(grads):
        for opt, p in ((opt_sb3, p_sb3), (opt_ours, p_ours)):
            opt.param_groups[0]["lr"] = lrs[t]
            p.grad = torch.tensor(g)
            opt.step()
    return (p_ours, opt_ours), (p_sb3, opt_sb3)


@pytest.mark.parametrize("fused", [False, None], ids=["torch-ops", "fused-default"])
@pytest.mark.parametrize("momentum,centered,weight_decay", SB3_GRID)
def test_sb3_matches_real_rmsprop_tf_like(momentum, centered, weight_decay, fused):
    """The real class over 12 steps with a changing lr (which tells lr inside the buffer apart).
    SB3's ops are this library's per-tensor ops except the centered grad average (mul/add, not
    lerp) and the clamp: without centered and with fused=False, bit for bit; otherwise RTOL."""
    start, grads = _start(), _grads()
    lrs = [0.01 * 0.8**t for t in range(len(grads))]
    kw = dict(momentum=momentum, centered=centered, weight_decay=weight_decay)
    (p_ours, opt_ours), (p_sb3, opt_sb3) = _run_against_sb3(start, grads, lrs, fused, **kw)
    exact = fused is False and not centered
    for key in ("square_avg", "momentum_buffer", "grad_avg"):
        assert (key in opt_ours.state[p_ours]) == (key in opt_sb3.state[p_sb3]), key
    pairs = [(p_ours, p_sb3)] + [
        (opt_ours.state[p_ours][k], opt_sb3.state[p_sb3][k]) for k in opt_sb3.state[p_sb3] if k != "step"
    ]
    for a, b in pairs:
        if exact:
            assert torch.equal(a.detach(), b.detach())
        else:
            np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=RTOL, atol=ATOL)
    assert opt_ours.state[p_ours]["step"].item() == opt_sb3.state[p_sb3]["step"] == len(grads)


def test_sb3_defaults_match():
    start, grads = _start(), _grads()
    p = torch.tensor(start, requires_grad=True)
    opt = sb3_rmsprop_tf_like()([p])
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_array_equal(ours("sb3", start, grads, fused=False), p.detach().numpy())


def test_sb3_is_not_the_tensorflow_flavour():
    """The issue's finding: TF's lr inside the buffer differs from SB3 once momentum meets a
    changing lr (by about 1e-2 here), so the sb3 preset must keep lr outside."""
    start, grads = _start(), _grads()
    lrs = [0.01 * 0.8**t for t in range(len(grads))]
    (p_ours, _), (p_sb3, _) = _run_against_sb3(start, grads, lrs, False, momentum=0.9)
    assert torch.equal(p_ours, p_sb3)
    cls = sb3_rmsprop_tf_like()
    p_tf, p_ref = torch.tensor(start, requires_grad=True), torch.tensor(start, requires_grad=True)
    opt_tf = from_preset("sb3", [p_tf], momentum=0.9, lr_in_momentum=True, fused=False)
    opt_ref = cls([p_ref], momentum=0.9)
    for t, g in enumerate(grads):
        for opt, p in ((opt_tf, p_tf), (opt_ref, p_ref)):
            opt.param_groups[0]["lr"] = lrs[t]
            p.grad = torch.tensor(g)
            opt.step()
    assert (p_tf - p_ref).abs().max().item() > 1e-3


def test_sb3_state_dict_loads_and_training_continues_identically():
    """RMSpropTFLike's state dict (an int step, the same tensor keys), completed with the
    preset's switches, loads into the preset and the next steps are SB3's, bit for bit. Loaded as
    it is, it reads as a torch checkpoint (eps outside the root): the completion is needed."""
    start, grads = _start(), _grads()
    cls = sb3_rmsprop_tf_like()
    p_sb3 = torch.tensor(start, requires_grad=True)
    opt_sb3 = cls([p_sb3], momentum=0.9)
    for g in grads[:6]:
        p_sb3.grad = torch.tensor(g)
        opt_sb3.step()
    p_ours, p_plain = (p_sb3.detach().clone().requires_grad_() for _ in range(2))
    opt_ours = from_preset("sb3", [p_ours], momentum=0.9, fused=False)
    # deep copies: load_state_dict keeps the loaded tensors themselves (as torch's does)
    opt_ours.load_state_dict(PRESETS["sb3"].complete_state_dict(copy.deepcopy(opt_sb3.state_dict())))
    opt_plain = from_preset("sb3", [p_plain], momentum=0.9, fused=False)
    opt_plain.load_state_dict(copy.deepcopy(opt_sb3.state_dict()))
    assert opt_plain.param_groups[0]["eps_in_sqrt"] is False
    for g in grads[6:]:
        for opt, p in ((opt_sb3, p_sb3), (opt_ours, p_ours), (opt_plain, p_plain)):
            p.grad = torch.tensor(g)
            opt.step()
    assert torch.equal(p_ours, p_sb3)
    assert not torch.equal(p_plain, p_sb3)


# ----------------------------------------------------------------------------- DQN (transcribed)
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_dqn_matches_its_transcribed_update(weight_decay):
    """Nature DQN's centered RMSProp, op by op (tests/peers.py), with a linearly annealed lr as
    its code allows and its weight cost wc as coupled weight decay."""
    start, grads = _start(), _grads()
    lrs = [2.5e-4 - t * 1.5e-5 for t in range(len(grads))]
    expected = dqn_transcribed(start, grads, lrs, wc=weight_decay)
    p = torch.tensor(start, requires_grad=True)
    opt = from_preset("dqn", [p], weight_decay=weight_decay)
    for t, g in enumerate(grads):
        opt.param_groups[0]["lr"] = lrs[t]
        p.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=RTOL, atol=ATOL)
    assert not np.allclose(ours("dqn", start, grads, centered=False), expected, rtol=1e-6)


# ----------------------------------------------------------------------------- A3C
def test_a3c_matches_the_papers_shared_rmsprop():
    """The paper's formula (eps inside the root, no momentum), lr annealed linearly as there."""
    start, grads = _start(), _grads()
    lrs = [7e-4 * (1 - t / len(grads)) for t in range(len(grads))]
    p = torch.tensor(start, requires_grad=True)
    opt = from_preset("a3c", [p])
    for t, g in enumerate(grads):
        opt.param_groups[0]["lr"] = lrs[t]
        p.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(p.detach().numpy(), a3c_paper(start, grads, lrs), rtol=RTOL, atol=ATOL)


def test_a3c_with_eps_outside_is_the_common_pytorch_shared_rmsprop():
    """The widely copied SharedRMSprop runs torch's formula with A3C's hyperparameters: the
    preset with eps_in_sqrt=False is torch.optim.RMSprop(lr=7e-4, alpha=0.99, eps=0.1) exactly."""
    start, grads = _start(), _grads()
    p = torch.tensor(start, requires_grad=True)
    opt = torch.optim.RMSprop([p], lr=7e-4, alpha=0.99, eps=0.1)
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    got = ours("a3c", start, grads, eps_in_sqrt=False, fused=False)
    np.testing.assert_array_equal(got, p.detach().numpy())
    assert not np.allclose(ours("a3c", start, grads), got, rtol=1e-6)


def test_a_peer_difference_really_shows():
    """Guard against a vacuous comparison: torch's and Keras's flavours do differ."""
    start, grads = _start(), _grads()
    assert not np.allclose(
        ours("keras", start, grads, lr=0.01, alpha=0.99, eps=1e-8), ours("torch", start, grads)
    )
