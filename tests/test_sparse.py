"""Sparse gradients: by default exactly their dense equivalent; with lazy_sparse, TensorFlow's lazy
rows (untouched rows exactly unchanged, touched rows by the formula); malformed ones refused with
nothing changed.

Every option combination of tests/cases.py runs on every backend; each backend's combinations
run inside one test (a loop, the failing combination named), which keeps the grid to seconds.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from cases import BACKENDS, COMBINATIONS, NAMED, tolerance
from helpers import spy_kernel
from peers import tf_sparse_apply_rmsprop

import rmsprop
from rmsprop.reference import LazyRowsReference

ROWS, DIM = 7, 3
# Each step's rows, with duplicates (summed) and out of order (an uncoalesced gradient); row 6
# is never looked up, rows 0 and 4 skip steps.
LOOKUPS = [[0, 2, 2, 5], [3, 1, 3], [0, 5, 4, 1, 1], [2, 3]]
LRS = [0.01, 0.02, 0.005, 0.01]
# The every-combination loops take three of them (row 3 skips a step, row 4 comes in last):
# 3 x (768 + 384) runs per backend stay within seconds.
GRID_STEPS = 3


def _sparse_grads(seed: int = 0, dtype=torch.float64, lookups=LOOKUPS) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for rows in lookups:
        values = torch.randn(len(rows), DIM, generator=gen, dtype=dtype)
        out.append(torch.sparse_coo_tensor(torch.tensor([rows]), values, (ROWS, DIM)))
    return out


def _start(dtype=torch.float64) -> torch.Tensor:
    return torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _run(options: dict, grads, lrs=LRS, start=None, dense_extra: bool = True):
    """An embedding-like weight (sparse gradients) and a dense parameter in one group."""
    weight = (_start() if start is None else start).clone().requires_grad_()
    extra = torch.randn(4, generator=torch.Generator().manual_seed(2), dtype=weight.dtype).requires_grad_()
    params = [weight, extra] if dense_extra else [weight]
    opt = rmsprop.RMSprop(params, lr=lrs[0], alpha=0.9, **options)
    gen = torch.Generator().manual_seed(3)
    for t, g in enumerate(grads):
        opt.param_groups[0]["lr"] = lrs[t]
        weight.grad = g
        if dense_extra:
            extra.grad = torch.randn(4, generator=gen, dtype=weight.dtype)
        opt.step()
    return params, opt


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a, b) or bool(((a == b) | (a.isnan() & b.isnan())).all())


def _label(combo: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in combo.items() if v) or "plain"


# ----------------------------------------------------------------------------- default: the dense equivalent
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_sparse_default_is_its_dense_equivalent_bit_for_bit(backend):
    """For every option combination, a sparse gradient (uncoalesced, with duplicates) gives the
    parameters and state its dense equivalent ``to_dense()`` gives on the same backend."""
    sparse = _sparse_grads()[:GRID_STEPS]
    dense = [g.to_dense() for g in sparse]
    for combo in COMBINATIONS:
        options = {**combo, **BACKENDS[backend]}
        (w_s, x_s), opt_s = _run(options, sparse)
        (w_d, x_d), opt_d = _run(options, dense)
        assert _same(w_s, w_d) and _same(x_s, x_d), _label(combo)
        for key, value in opt_d.state[w_d].items():
            assert _same(opt_s.state[w_s][key], value), (_label(combo), key)


def test_sparse_default_differs_from_lazy_rows():
    """Guard against a vacuous comparison: the default decays and moves rows the gradient does
    not name (its dense zeros), lazy rows do not."""
    sparse = _sparse_grads()
    (w_default, _), _ = _run({"momentum": 0.9}, sparse)
    (w_lazy, _), _ = _run({"momentum": 0.9, "lazy_sparse": True}, sparse)
    assert torch.equal(w_lazy[6], _start()[6]) and not torch.equal(w_default[4], w_lazy[4])


# ----------------------------------------------------------------------------- lazy rows
LAZY_COMBINATIONS = [c for c in COMBINATIONS if not c["bias_correction"]]  # refused with lazy_sparse


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_lazy_rows_every_combination(backend):
    """Rows never looked up keep parameter and state bit for bit; touched rows follow the float64
    reference stepped only on the steps that name them (duplicates summed), within the
    backend's float64 tolerance (tests/cases.py)."""
    tol = tolerance(backend, torch.float64)
    sparse = _sparse_grads()[:GRID_STEPS]
    start = _start()
    for combo in LAZY_COMBINATIONS:
        (w, _), opt = _run({**combo, **BACKENDS[backend], "lazy_sparse": True}, sparse, start=start)
        ref = LazyRowsReference(start.numpy(), {**combo, "alpha": 0.9})
        for g, lr in zip(sparse, LRS[:GRID_STEPS], strict=True):
            ref.step(g._indices()[0].numpy(), g._values().numpy(), lr)
        state = opt.state[w]
        # row 6 is never looked up: exactly its start, and its state exactly the initial state
        assert torch.equal(w[6], start[6]), _label(combo)
        assert torch.all(state["square_avg"][6] == combo["initial_square_avg"]), _label(combo)
        for key in ("grad_avg", "momentum_buffer"):
            if key in state:
                assert torch.all(state[key][6] == 0), (_label(combo), key)
        np.testing.assert_allclose(
            w.detach().numpy(), ref.value(), rtol=tol.rtol, atol=tol.atol, err_msg=_label(combo)
        )
        for key, expected in ref.state().items():
            np.testing.assert_allclose(
                state[key].numpy(), expected, rtol=tol.rtol, atol=tol.atol, err_msg=f"{_label(combo)} {key}"
            )
        assert state["step"].item() == len(sparse)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("name", [n for n, o in NAMED.items() if not o.get("bias_correction")])
def test_lazy_rows_are_the_dense_update_of_those_rows(name, backend):
    """Bit for bit: the rows a gradient names are updated exactly as the same backend updates a
    dense parameter made of those rows (from the same state), and nothing else moves."""
    options = {**NAMED[name], **BACKENDS[backend]}
    start = _start()
    grads = _sparse_grads(lookups=[[0, 2, 5], [1, 2, 4]])
    [w], opt = _run({**options, "lazy_sparse": True}, grads[:1], start=start, dense_extra=False)
    before = {k: v.clone() for k, v in opt.state[w].items()}
    w_before = w.detach().clone()
    w.grad = grads[1]
    opt.step()
    rows = torch.tensor([1, 2, 4])
    twin = w_before[rows].clone().requires_grad_()
    twin_opt = rmsprop.RMSprop([twin], lr=LRS[0], alpha=0.9, **options)
    twin_opt.state[twin] = {k: (v if k == "step" else v[rows]).clone() for k, v in before.items()}
    twin.grad = grads[1]._values().clone()
    twin_opt.step()
    assert torch.equal(w[rows], twin)
    for key, value in twin_opt.state[twin].items():
        if key != "step":
            assert torch.equal(opt.state[w][key][rows], value), key
    others = torch.tensor([0, 3, 5, 6])
    assert torch.equal(w[others], w_before[others])
    for key, value in before.items():
        if key != "step":
            assert torch.equal(opt.state[w][key][others], value[others]), key


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("momentum,centered", [(0.0, False), (0.9, False), (0.0, True), (0.9, True)])
def test_lazy_rows_are_tensorflows_sparse_apply_rmsprop(momentum, centered, backend):
    """The tensorflow preset with lazy_sparse against TF's SparseApplyRMSProp /
    SparseApplyCenteredRMSProp kernels, transcribed (tests/peers.py), over steps with duplicate
    and skipped rows and a changing lr: parameter, ms, mg and mom. float64; TF orders a few
    operations differently (rsqrt(ms + eps - mg^2) * lr * g, mg * rho + g * (1 - rho)): a few
    ulps a step, hence the float64 tolerance of tests/cases.py."""
    tol = tolerance(backend, torch.float64)
    start, grads = _start(), _sparse_grads()
    w = start.clone().requires_grad_()
    opt = rmsprop.from_preset(
        "tensorflow",
        [w],
        lr=LRS[0],
        momentum=momentum,
        centered=centered,
        lazy_sparse=True,
        **BACKENDS[backend],
    )
    for g, lr in zip(grads, LRS, strict=True):
        opt.param_groups[0]["lr"] = lr
        w.grad = g
        opt.step()
    steps = [(g._indices()[0].numpy(), g._values().numpy()) for g in grads]
    tf = tf_sparse_apply_rmsprop(start.numpy(), steps, LRS, momentum=momentum, centered=centered)
    state = opt.state[w]
    np.testing.assert_allclose(w.detach().numpy(), tf["var"], rtol=tol.rtol, atol=tol.atol)
    np.testing.assert_allclose(state["square_avg"].numpy(), tf["ms"], rtol=tol.rtol, atol=tol.atol)
    if centered:
        np.testing.assert_allclose(state["grad_avg"].numpy(), tf["mg"], rtol=tol.rtol, atol=tol.atol)
    if momentum:
        np.testing.assert_allclose(state["momentum_buffer"].numpy(), tf["mom"], rtol=tol.rtol, atol=tol.atol)
    assert torch.equal(w[6], start[6])  # never looked up: TF does not touch it either


def test_lazy_rows_from_an_embedding_module():
    """nn.Embedding(sparse=True) end to end: rows outside every batch keep their weights."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 4, sparse=True)
    head = torch.nn.Linear(4, 1)
    start = emb.weight.detach().clone()
    opt = rmsprop.from_preset(
        "tensorflow", [*emb.parameters(), *head.parameters()], momentum=0.9, lazy_sparse=True
    )
    seen = set()
    for t in range(5):
        batch = torch.randint(0, 40, (8,), generator=torch.Generator().manual_seed(t))
        seen |= set(batch.tolist())
        opt.zero_grad()
        head(emb(batch)).pow(2).mean().backward()
        assert emb.weight.grad.layout is torch.sparse_coo
        opt.step()
    unseen = torch.tensor(sorted(set(range(50)) - seen))
    touched = torch.tensor(sorted(seen))
    assert torch.equal(emb.weight[unseen], start[unseen])
    assert not torch.isclose(emb.weight[touched], start[touched]).all(dim=1).any()


def test_empty_sparse_gradient():
    """No rows: lazy rows change nothing but the step count; the default is a zero gradient."""
    empty = torch.sparse_coo_tensor(
        torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, DIM, dtype=torch.float64), (ROWS, DIM)
    )
    first = _sparse_grads()[:1]
    [w_lazy], opt_lazy = _run({"momentum": 0.9, "lazy_sparse": True}, [*first, empty], dense_extra=False)
    [w_one], _ = _run({"momentum": 0.9, "lazy_sparse": True}, first, dense_extra=False)
    assert torch.equal(w_lazy, w_one) and opt_lazy.state[w_lazy]["step"].item() == 2
    [w_default], _ = _run({"momentum": 0.9}, [*first, empty], dense_extra=False)
    [w_zeros], _ = _run({"momentum": 0.9}, [*first, empty.to_dense()], dense_extra=False)
    assert torch.equal(w_default, w_zeros)


@pytest.mark.parametrize("lazy", [False, True])
def test_compressed_layouts_are_their_coo_equivalent(lazy):
    """CSR and CSC gradients give exactly what the same gradient in COO gives. (The grad setter
    takes only COO for a strided parameter: compressed ones come through the functional API.)"""
    coo = [g.to_dense().to_sparse() for g in _sparse_grads()]  # one sparse dim per axis

    def run(grads):
        w, v, b, step = (
            _start(),
            torch.zeros(ROWS, DIM, dtype=torch.float64),
            torch.zeros(ROWS, DIM, dtype=torch.float64),
            torch.zeros(()),
        )
        for g in grads:
            rmsprop.functional.rmsprop([w], [g], [v], [], [b], [step], lr=0.01, rule=_rule(momentum=0.9),
                                       lazy_sparse=lazy)  # fmt: skip
        return w

    expected = run(coo)
    assert not torch.equal(expected, _start())
    for to in (torch.Tensor.to_sparse_csr, torch.Tensor.to_sparse_csc):
        assert torch.equal(run([to(g) for g in coo]), expected)


@pytest.mark.parametrize("lazy", [False, True])
def test_complex_parameters_with_sparse_gradients(lazy):
    """Complex rows update as (real, imag) pairs, as dense complex parameters do."""
    gen = torch.Generator().manual_seed(4)
    grads = [
        torch.sparse_coo_tensor(torch.tensor([rows]), torch.randn(len(rows), DIM, generator=gen, dtype=torch.complex128),
                                (ROWS, DIM))
        for rows in LOOKUPS
    ]  # fmt: skip
    start = torch.randn(ROWS, DIM, generator=gen, dtype=torch.complex128)
    [w], _ = _run(
        {"momentum": 0.9, "centered": True, "lazy_sparse": lazy}, grads, start=start, dense_extra=False
    )
    if not lazy:
        [w_dense], _ = _run({"momentum": 0.9, "centered": True}, [g.to_dense() for g in grads], start=start,
                               dense_extra=False)  # fmt: skip
        assert torch.equal(w, w_dense)
    else:
        real = [
            torch.sparse_coo_tensor(g._indices(), torch.view_as_real(g._values()), (ROWS, DIM, 2))
            for g in grads
        ]
        ref = LazyRowsReference(
            torch.view_as_real(start).numpy(), {"momentum": 0.9, "centered": True, "alpha": 0.9}
        )
        for g, lr in zip(real, LRS, strict=True):
            ref.step(g._indices()[0].numpy(), g._values().numpy(), lr)
        tol = tolerance("fused", torch.complex128)
        np.testing.assert_allclose(
            torch.view_as_real(w.detach()).numpy(), ref.value(), rtol=tol.rtol, atol=tol.atol
        )


# ----------------------------------------------------------------------------- the kernel takes them
@pytest.mark.parametrize("lazy", [False, True])
def test_the_fused_kernel_steps_sparse_gradients(monkeypatch, lazy):
    """fused=True: the densified gradient, or the gathered rows, go through the kernel."""
    calls = spy_kernel(monkeypatch)
    _run({"fused": True, "lazy_sparse": lazy}, _sparse_grads()[:2])
    # default: one call for the group (weight densified + dense extra); lazy: the rows, then the rest
    assert calls == ([2, 2] if not lazy else [1, 1, 1, 1])


# ----------------------------------------------------------------------------- refused, nothing changed
def _bad_grads() -> dict[str, torch.Tensor]:
    idx, values = torch.tensor([[0, 2]]), torch.ones(2, DIM, dtype=torch.float64)
    return {
        "shape": torch.sparse_coo_tensor(idx, values, (ROWS + 1, DIM)),
        "dtype": torch.sparse_coo_tensor(idx, values.float(), (ROWS, DIM)),
        # built without torch's invariant checks (their default): an index past the last row
        "index out of range": torch.sparse_coo_tensor(torch.tensor([[0, ROWS]]), values, (ROWS, DIM),
                                                      check_invariants=False),
        "negative index": torch.sparse_coo_tensor(torch.tensor([[-1, 2]]), values, (ROWS, DIM), check_invariants=False),
    }  # fmt: skip


MESSAGES = {
    "shape": "has shape",
    "dtype": "has dtype",
    "index out of range": "is malformed",
    "negative index": "is malformed",
}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("what", list(MESSAGES))
def test_a_malformed_sparse_gradient_is_refused_with_nothing_changed(what, lazy, backend):
    """Two groups (the dense one first, after a step): the bad gradient of the second raises
    before anything of either group is written. The grad setter refuses another shape or dtype,
    so those arrive as issue 8's probes did, through ``.grad.data``."""
    dense = torch.randn(5, dtype=torch.float64, requires_grad=True)
    weight = _start().requires_grad_()
    opt = rmsprop.RMSprop([{"params": [dense]}, {"params": [weight]}], momentum=0.9, lazy_sparse=lazy,
                          **BACKENDS[backend])  # fmt: skip
    dense.grad, weight.grad = torch.ones(5, dtype=torch.float64), _sparse_grads()[0]
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    before = [dense.detach().clone(), weight.detach().clone()]
    dense.grad = torch.ones(5, dtype=torch.float64)
    weight.grad = _sparse_grads()[1]
    weight.grad.data = _bad_grads()[what]
    with pytest.raises(
        RuntimeError, match=f"parameter 0 .*sparse gradient {MESSAGES[what]}.*nothing was updated"
    ):
        opt.step()
    assert torch.equal(dense, before[0]) and torch.equal(weight, before[1])
    after = opt.state_dict()
    for pid, entry in saved["state"].items():
        for key, value in entry.items():
            assert torch.equal(after["state"][pid][key], value), (pid, key)


@pytest.mark.parametrize("lazy", [False, True])
def test_a_sparse_gradient_on_another_device_is_refused(lazy):
    """Through the functional API (the grad setter refuses it): nothing is written."""
    weight = _start()
    state = [torch.ones_like(weight)], [torch.zeros(())]
    bad = torch.sparse_coo_tensor(torch.tensor([[0]]), torch.ones(1, DIM, dtype=torch.float64), (ROWS, DIM),
                                  device="meta")  # fmt: skip
    with pytest.raises(RuntimeError, match="sparse gradient is on meta.*nothing was updated"):
        rmsprop.functional.rmsprop(
            [weight], [bad], state[0], [], [], state[1], lr=0.1, rule=_rule(), lazy_sparse=lazy
        )
    assert torch.equal(weight, _start()) and torch.all(state[0][0] == 1) and state[1][0].item() == 0


def _rule(**options):
    from rmsprop.options import DEFAULTS
    from rmsprop.rule import Rule

    return Rule.from_group({**DEFAULTS, **options})


def test_functional_lazy_rows_refuse_differentiable():
    weight, square_avg, step = _start(), torch.zeros(ROWS, DIM, dtype=torch.float64), torch.zeros(())
    with pytest.raises(RuntimeError, match="lazy_sparse=True does not support differentiable"):
        rmsprop.functional.rmsprop(
            [weight], _sparse_grads()[:1], [square_avg], [], [], [step], lr=0.1, rule=_rule(),
            lazy_sparse=True, differentiable=True, foreach=False,
        )  # fmt: skip
    assert torch.equal(weight, _start()) and step.item() == 0


def test_an_unsupported_layout_is_refused():
    """A layout that is neither strided nor one of torch's sparse layouts (mkldnn, which the grad
    setter refuses: through the functional API)."""
    p = torch.zeros(4, 4)
    square_avg, step = torch.zeros(4, 4), torch.zeros(())
    with pytest.raises(RuntimeError, match="layout torch._mkldnn.*nothing was updated"):
        rmsprop.functional.rmsprop(
            [p], [torch.ones(4, 4).to_mkldnn()], [square_avg], [], [], [step], lr=0.1, rule=_rule()
        )
    assert torch.all(p == 0) and torch.all(square_avg == 0) and step.item() == 0


def test_a_compiled_step_with_lazy_sparse_gradients_is_the_eager_step():
    """dynamo does not trace sparse tensors: the step runs eagerly, with the group's lazy_sparse
    honoured (the compiled path would otherwise see only dense lists)."""
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        w = _start().requires_grad_()
        opt = rmsprop.RMSprop([w], momentum=0.9, lazy_sparse=True)
        step = torch.compile(opt.step) if compiled else opt.step
        for g in _sparse_grads()[:2]:
            w.grad = g
            step()
        results.append(w.detach().clone())
    assert torch.equal(results[0], results[1])
    assert torch.equal(results[1][6], _start()[6])
