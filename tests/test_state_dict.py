"""Checkpoints: torch <-> rmsprop interop both ways, exact resume for every option, and a
load_state_dict that checks everything before it changes anything."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from cases import NAMED
from helpers import make_grads, make_params

import rmsprop

# the options a checkpoint must carry: one case per extension, and all of them at once
EXTENSIONS = {k: NAMED[k] for k in ("plain", "eps_in_sqrt", "nesterov", "decoupled", "lr_in_momentum",
                                    "initial_square_avg", "full", "everything")}  # fmt: skip


def _drive(opt, params, grads, lrs=None):
    for t, step in enumerate(grads):
        if lrs:
            opt.param_groups[0]["lr"] = lrs[t]
        for p, g in zip(params, step, strict=True):
            p.grad = g.clone()
        opt.step()


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", list(EXTENSIONS))
def test_resume_is_bit_identical(name, foreach):
    kwargs = {**EXTENSIONS[name], "foreach": foreach}
    start = make_params()
    grads = make_grads(start, steps=10)
    lrs = [0.01 * 0.9**t for t in range(10)]

    straight = [p.detach().clone().requires_grad_() for p in start]
    opt = rmsprop.RMSprop(straight, **kwargs)
    _drive(opt, straight, grads, lrs)

    first = [p.detach().clone().requires_grad_() for p in start]
    opt1 = rmsprop.RMSprop(first, **kwargs)
    _drive(opt1, first, grads[:5], lrs[:5])
    checkpoint = _roundtrip({"params": [p.detach() for p in first], "opt": opt1.state_dict()})

    resumed = [p.clone().requires_grad_() for p in checkpoint["params"]]
    opt2 = rmsprop.RMSprop(resumed, lr=123.0)  # hyperparameters come from the checkpoint
    opt2.load_state_dict(checkpoint["opt"])
    _drive(opt2, resumed, grads[5:], lrs[5:])
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed, strict=True))


@pytest.mark.parametrize("direction", ["torch->rmsprop", "rmsprop->torch"])
@pytest.mark.parametrize(
    "kwargs", [{}, {"momentum": 0.9, "centered": True, "weight_decay": 0.01}], ids=["plain", "full"]
)
def test_checkpoints_move_between_torch_and_rmsprop(direction, kwargs):
    start = make_params()
    grads = make_grads(start, steps=8)

    def exact(params, **kw):  # torch's op path: the bit-exact claim
        return rmsprop.RMSprop(params, fused=False, **kw)

    first_cls, second_cls = (
        (torch.optim.RMSprop, exact) if direction == "torch->rmsprop" else (exact, torch.optim.RMSprop)
    )

    reference = [p.detach().clone().requires_grad_() for p in start]
    _drive(torch.optim.RMSprop(reference, **kwargs), reference, grads)

    ps = [p.detach().clone().requires_grad_() for p in start]
    opt = first_cls(ps, **kwargs)
    _drive(opt, ps, grads[:4])
    saved = _roundtrip(opt.state_dict())
    opt2 = second_cls(ps, **kwargs)
    opt2.load_state_dict(saved)
    _drive(opt2, ps, grads[4:])
    assert all(torch.equal(a, b) for a, b in zip(reference, ps, strict=True))


def test_loading_a_torch_checkpoint_keeps_the_kernel_choice():
    ps = make_params()
    torch_opt = torch.optim.RMSprop(ps)
    for fused in (False, True, None):
        ours = rmsprop.RMSprop(ps, fused=fused)
        ours.load_state_dict(torch_opt.state_dict())
        assert ours.param_groups[0]["fused"] is fused


def test_torch_checkpoint_gets_extension_defaults():
    ps = make_params()
    opt = torch.optim.RMSprop(ps)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    ours = rmsprop.RMSprop(ps, eps_in_sqrt=True)
    ours.load_state_dict(opt.state_dict())
    group = ours.param_groups[0]
    assert group["eps_in_sqrt"] is False  # the checkpoint is torch's algorithm
    assert group["initial_square_avg"] == 0.0 and group["fused"] is None


def _trained(**kwargs):
    ps = make_params()
    opt = rmsprop.RMSprop(ps, **kwargs)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    return ps, opt


def _bad_shape(sd):
    sd["state"][0]["square_avg"] = torch.zeros(7)


def _bad_kind(sd):
    sd["state"][0]["square_avg"] = torch.zeros(3, 4, dtype=torch.int64)


def _bad_complex(sd):
    sd["state"][0]["square_avg"] = torch.zeros(3, 4, dtype=torch.complex64)


def _missing_buffer(sd):
    del sd["state"][1]["momentum_buffer"]


def _too_few_params(sd):
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (_bad_shape, "shape"),
        (_bad_kind, "dtype"),
        (_bad_complex, "dtype"),
        (_missing_buffer, "momentum_buffer"),
        (_too_few_params, "parameters"),
    ],
    ids=["shape", "integer dtype", "complex for real", "missing buffer", "count"],
)
def test_bad_state_dict_raises_and_changes_nothing(corrupt, message):
    ps, opt = _trained(momentum=0.9)
    good = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(opt.state_dict())
    corrupt(bad)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    for pid, entry in good["state"].items():
        for key, value in entry.items():
            assert torch.equal(after["state"][pid][key], value)


def test_float_state_is_cast_to_param_dtype_like_torch():
    ps, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["square_avg"] = sd["state"][0]["square_avg"].double()
    opt.load_state_dict(sd)
    assert opt.state[ps[0]]["square_avg"].dtype == torch.float32


def test_deepcopy_and_pickle_keep_state_and_options():
    ps, opt = _trained(momentum=0.9, nesterov=True, eps_in_sqrt=True)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.param_groups[0]["nesterov"] and clone.param_groups[0]["eps_in_sqrt"]
        states = list(clone.state.values())
        assert len(states) == len(ps)
        assert torch.equal(states[0]["momentum_buffer"], opt.state[ps[0]]["momentum_buffer"])


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16, "int8"], ids=str)
def test_plain_number_step_counters_load_as_torch_converts_them(state_dtype):
    """Old torch checkpoints keep each step counter as a Python number; torch's loader turns it
    into a float tensor (torch.tensor(float(step), dtype=_get_scalar_dtype()), on the CPU). Here
    too, whatever the state format: a bf16 / int8 optimizer loaded such a checkpoint, kept the
    number, and then refused every step ("its step is a int"). The run continues bit for bit as
    from the same checkpoint with tensor counters."""
    ps = make_params(shapes=((80, 64), (5,)))
    grads = make_grads(ps, steps=4)
    source = torch.optim.RMSprop([p.detach().clone().requires_grad_() for p in ps], momentum=0.9)
    _drive(source, source.param_groups[0]["params"], grads[:2])
    with_tensors = source.state_dict()
    with_numbers = copy.deepcopy(with_tensors)
    for entry, number in zip(with_numbers["state"].values(), (2, 2.0), strict=True):
        entry["step"] = number  # an int and a float, as old checkpoints have them
    runs = []
    for sd in (with_tensors, with_numbers):
        qs = [p.detach().clone().requires_grad_() for p in source.param_groups[0]["params"]]
        opt = rmsprop.RMSprop(qs, momentum=0.9, state_dtype=state_dtype, int8_min_numel=1000, fused=False)
        opt.load_state_dict(copy.deepcopy(sd))
        for q in qs:
            step = opt.state[q]["step"]
            assert isinstance(step, torch.Tensor) and step.dtype == torch.float32
            assert step.device.type == "cpu" and step.item() == 2.0
        _drive(opt, qs, grads[2:])
        runs.append((qs, opt))
    (qa, oa), (qb, ob) = runs
    assert all(torch.equal(a, b) for a, b in zip(qa, qb, strict=True))
    for a, b in zip(qa, qb, strict=True):
        assert set(oa.state[a]) == set(ob.state[b])
        assert all(torch.equal(oa.state[a][k], ob.state[b][k]) for k in oa.state[a])
