"""Bit-exact parity with torch.optim.RMSprop on its whole option table, both paths, all dtypes.

The option cases are tests/cases.py's TORCH_CASES: torch's own ``optim_inputs_func_rmsprop``
plus tensor lr, momentum alone and the combinations torch's table skips.
"""

from __future__ import annotations

import pytest
import torch
from cases import TORCH_CASES
from helpers import assert_states_equal, make_grads, make_params, run

import rmsprop

DTYPES = [torch.float32, torch.float64, torch.complex64, torch.complex128]


@pytest.mark.parametrize("foreach", [False, True], ids=["per-tensor", "foreach"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("desc", list(TORCH_CASES))
def test_bit_identical_to_torch(desc, dtype, foreach):
    kwargs = TORCH_CASES[desc]
    params = make_params(dtype)
    grads = make_grads(params, steps=12)
    ours, our_opt = run(lambda p: rmsprop.RMSprop(p, foreach=foreach, **kwargs), params, grads)
    theirs, their_opt = run(lambda p: torch.optim.RMSprop(p, foreach=foreach, **kwargs), params, grads)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    assert_states_equal(our_opt, their_opt, ours, theirs)


@pytest.mark.parametrize("foreach", [False, True])
def test_bit_identical_with_a_scheduler_changing_lr(foreach):
    params = make_params(torch.float32)
    grads = make_grads(params, steps=10)
    lrs = [0.01 * 0.7**t for t in range(10)]
    kw = {"momentum": 0.9, "centered": True, "weight_decay": 0.01}
    ours, _ = run(lambda p: rmsprop.RMSprop(p, foreach=foreach, **kw), params, grads, lrs)
    theirs, _ = run(lambda p: torch.optim.RMSprop(p, foreach=foreach, **kw), params, grads, lrs)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_fused_false_default_path_is_torch_default_path():
    """fused=False, foreach=None picks what torch picks (per-tensor on CPU): bit for bit."""
    params = make_params(torch.float32)
    grads = make_grads(params, steps=5)
    ours, _ = run(lambda p: rmsprop.RMSprop(p, momentum=0.9, fused=False), params, grads)
    theirs, _ = run(lambda p: torch.optim.RMSprop(p, momentum=0.9), params, grads)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_default_fused_path_matches_torch_to_fp32_rounding():
    """The default on CPU is the fused kernel: one rounding per value instead of one per op."""
    params = make_params(torch.float32)
    grads = make_grads(params, steps=20)
    ours, _ = run(lambda p: rmsprop.RMSprop(p, momentum=0.9, centered=True), params, grads)
    theirs, _ = run(lambda p: torch.optim.RMSprop(p, momentum=0.9, centered=True), params, grads)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_parameters_without_grad_are_skipped_like_torch():
    params = make_params(torch.float32)
    grads = make_grads(params, steps=4)
    for step in grads[:2]:
        step[1] = None  # the second parameter gets no gradient in the first two steps

    def drive(opt_cls):
        ps = [p.detach().clone().requires_grad_() for p in params]
        opt = opt_cls(ps, momentum=0.5)
        for step in grads:
            for p, g in zip(ps, step, strict=True):
                p.grad = None if g is None else g.clone()
            opt.step()
        return ps, opt

    ours, our_opt = drive(lambda ps, **kw: rmsprop.RMSprop(ps, fused=False, **kw))
    theirs, their_opt = drive(torch.optim.RMSprop)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    assert our_opt.state[ours[1]]["step"].item() == 2.0
    assert_states_equal(our_opt, their_opt, ours, theirs)


DUPLICATE_CASES = {"plain": {}, "momentum+centered+wd": {"momentum": 0.9, "centered": True, "weight_decay": 0.1}}


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate parameters")
@pytest.mark.parametrize("path", ["per-tensor", "foreach", "default"])
@pytest.mark.parametrize("case", list(DUPLICATE_CASES))
def test_a_parameter_listed_twice_is_stepped_twice_with_one_state_like_torch(case, path):
    """torch warns about a parameter listed twice in a group and steps it twice, with one state:
    its step counter counts both. On torch's paths the values are torch's, bit for bit; the
    default path (the fused kernel cannot write one tensor from two records: it hands both to
    the foreach path, as it does any aliasing tensors) is torch's foreach path, bit for bit —
    torch's own default on the CPU, its per-tensor loop, updates each copy in turn instead, a
    different result that torch's two paths already disagree on. Before, the first step gave
    each listing a fresh state of its own, so the parameter was stepped twice from zero state."""
    kw = DUPLICATE_CASES[case]
    ours_kw = {"per-tensor": {"fused": False, "foreach": False}, "foreach": {"fused": False, "foreach": True},
               "default": {}}[path]  # fmt: skip
    theirs_kw = {"foreach": path != "per-tensor"}
    params = make_params(torch.float32)
    grads = make_grads(params, steps=4)

    def listed_twice(ps):
        return [p for p in ps for _ in range(2)]

    def drive(make):
        ps = [p.detach().clone().requires_grad_() for p in params]
        opt = make(listed_twice(ps))
        for step in grads:
            for p, g in zip(ps, step, strict=True):
                p.grad = g.clone()
            opt.step()
        return ps, opt

    ours, our_opt = drive(lambda ps: rmsprop.RMSprop(ps, **ours_kw, **kw))
    theirs, their_opt = drive(lambda ps: torch.optim.RMSprop(ps, **theirs_kw, **kw))
    assert len(our_opt.state) == len(params)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
        assert our_opt.state[a]["step"].item() == their_opt.state[b]["step"].item() == 2 * len(grads)
    assert_states_equal(our_opt, their_opt, ours, theirs)


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate parameters")
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "int8"], ids=str)
@pytest.mark.parametrize("path", [{"fused": False, "foreach": False}, {"fused": False, "foreach": True}, {}],
                         ids=["per-tensor", "foreach", "default"])  # fmt: skip
def test_a_parameter_listed_twice_gets_one_low_bit_state(state_dtype, path):
    """The same with a state_dtype (no torch counterpart): one state, stepped by both listings."""
    p = torch.randn(5000).requires_grad_()
    opt = rmsprop.RMSprop([p, p], momentum=0.9, centered=True, state_dtype=state_dtype, **path)
    for _ in range(2):
        p.grad = torch.randn(5000)
        opt.step()
    assert len(opt.state) == 1 and opt.state[p]["step"].item() == 4.0


def test_fused_true_refuses_a_parameter_listed_twice():
    p = torch.randn(10).requires_grad_()
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = rmsprop.RMSprop([p, p], fused=True)
    p.grad = torch.ones(10)
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="shares memory with another tensor"):
        opt.step()
    assert torch.equal(p, before) and not opt.state


@pytest.mark.parametrize("fused", [False, None])
def test_state_created_out_of_parameter_order_is_still_each_parameters_own(fused):
    """The step reads the state in insertion order when its keys are the groups' parameters in
    order, and looks parameters up otherwise. Here the state is created b, c, a (a has no grad at
    first) across two groups, then a's group steps alone: every parameter must get its own
    square average, as with torch, at every step."""
    torch.manual_seed(0)
    shapes = [(3,), (4,), (5,)]
    initial = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(4)]
    masks = [(0, 1, 1), (1, 1, 1), (1, 1, 0), (1, 1, 1)]  # which parameters get a gradient

    def drive(make):
        ps = [t.clone().requires_grad_() for t in initial]
        opt = make([{"params": ps[:2]}, {"params": ps[2:], "alpha": 0.9}])
        for step, mask in zip(grads, masks, strict=True):
            for p, g, m in zip(ps, step, mask, strict=True):
                p.grad = g.clone() if m else None
            opt.step()
        return ps, opt

    foreach = False if fused is False else None
    ours, our_opt = drive(lambda groups: rmsprop.RMSprop(groups, lr=0.01, fused=fused, foreach=foreach))
    theirs, their_opt = drive(lambda groups: torch.optim.RMSprop(groups, lr=0.01, foreach=False))
    assert list(map(id, our_opt.state)) == [id(ours[1]), id(ours[2]), id(ours[0])]  # the order the test is about
    for a, b in zip(ours, theirs, strict=True):
        if fused is False:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    if fused is False:
        assert_states_equal(our_opt, their_opt, ours, theirs)


def test_state_order_reads_in_order_across_groups_and_falls_back_to_lookups():
    """The optimizer's state reader: in insertion order while the keys are the groups' parameters
    (a frozen group in between keeps the order), lookups for a group that does not match and for
    every group after it, and each parameter its own state either way."""
    from collections import defaultdict

    from rmsprop.optimizer import _NO_STATE, _StateOrder

    a, b, c, d = (torch.zeros(1) for _ in range(4))
    state = defaultdict(dict)
    for p in (a, b, c):
        state[p] = {"who": p}
    order = _StateOrder(state)
    assert [s["who"] for s in order.states_of([a, b])] == [a, b] and order._cursor == 2
    assert order.states_of([]) == [] and order._cursor == 2  # a frozen group
    assert [s["who"] for s in order.states_of([c])] == [c] and order._cursor == 3

    order = _StateOrder(state)
    got = order.states_of([b, a, d])  # not the keys' order, and d has no state
    assert [s.get("who") for s in got] == [b, a, None] and got[2] is _NO_STATE and order._cursor == -1
    assert [s["who"] for s in order.states_of([c])] == [c]  # found by lookup after a mismatch

    class Remapped(dict):  # a state dict whose lookups mean something else is read through them
        def get(self, key, default=None):
            return {"who": "remapped"}

    remapped = Remapped(state)
    assert [s["who"] for s in _StateOrder(remapped).states_of([a, b, c])] == ["remapped"] * 3


def test_differentiable_matches_torch_values_and_gradients():
    """differentiable=True: same values as torch, and gradients flow through the update."""

    def unrolled(opt_cls):
        w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
        p = w.clone()  # non-leaf: the update stays in the graph
        opt = opt_cls([p], lr=0.1, momentum=0.5, centered=True, differentiable=True)
        state = opt.state[p]
        state["step"] = torch.tensor(0.0)
        sq0 = torch.full_like(p, 0.2).requires_grad_()
        state["square_avg"] = sq0.clone()  # non-leaf copy: in-place updates keep the graph
        state["momentum_buffer"] = torch.zeros_like(p)
        state["grad_avg"] = torch.zeros_like(p)
        p.grad = torch.tensor([0.3, -0.1, 0.2], dtype=torch.float64)
        opt.step()
        (p * p).sum().backward()
        return p.detach(), w.grad, sq0.grad

    ours = unrolled(rmsprop.RMSprop)
    theirs = unrolled(torch.optim.RMSprop)
    assert torch.equal(ours[0], theirs[0])
    assert torch.equal(ours[1], theirs[1])
    assert torch.equal(ours[2], theirs[2])
    assert ours[2].abs().sum() > 0  # the gradient really flows back into the state
