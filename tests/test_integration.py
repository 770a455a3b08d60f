"""rmsprop.RMSprop inside the rest of torch: schedulers, GradScaler, torch.compile, param groups,
and the seed document's example."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch._dynamo
from cases import NAMED
from helpers import make_grads, make_params

import rmsprop
from rmsprop.demo import SimpleNet, train_seed_example


def _train(opt_cls, scheduler_cls, **kwargs):
    torch.manual_seed(0)
    model = SimpleNet()
    opt = opt_cls(model.parameters(), **kwargs)
    sched = scheduler_cls(opt)
    X, y = torch.randn(64, 10), torch.randn(64, 1)
    for _ in range(12):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X), y).backward()
        opt.step()
        sched.step()
    return [p.detach().clone() for p in model.parameters()]


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=12),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=12),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_lr_schedulers_drive_it_exactly_like_torch(name):
    kw = {"lr": 0.01, "momentum": 0.9}  # OneCycleLR also cycles momentum
    ours = _train(lambda p, **k: rmsprop.RMSprop(p, fused=False, **k), SCHEDULERS[name], **kw)
    theirs = _train(torch.optim.RMSprop, SCHEDULERS[name], **kw)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_grad_scaler_skips_inf_steps_and_matches_torch():
    def run(opt_cls):
        torch.manual_seed(0)
        model = SimpleNet()
        opt = opt_cls(model.parameters(), lr=0.01, momentum=0.9)
        if isinstance(opt, rmsprop.RMSprop):
            opt.param_groups[0]["fused"] = False  # bit-exact path here; fused + AMP: test_fused.py
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        X, y = torch.randn(32, 10), torch.randn(32, 1)
        snapshots = []
        for t in range(6):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(X), y)
            scaler.scale(loss).backward()
            if t == 3:
                model.fc1.weight.grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in model.parameters()]
            scaler.step(opt)
            scaler.update()
            after = [p.detach().clone() for p in model.parameters()]
            snapshots.append(all(torch.equal(a, b) for a, b in zip(before, after, strict=True)))
        return after, snapshots, scaler.get_scale()

    ours, unchanged, scale = run(rmsprop.RMSprop)
    theirs, _, their_scale = run(torch.optim.RMSprop)
    assert unchanged == [False, False, False, True, False, False]  # only the inf step is skipped
    assert scale == their_scale
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


# initial_square_avg=1: centered + bias correction from v0 = 0 has a variance of exactly 0 at
# t=1 and divides by rounding noise (see tests/test_reference.py), which no two programs agree on.
COMPILE_OPTIONS = {"lr": 0.01, **NAMED["everything"], "maximize": False, "decoupled_weight_decay": False,
                   "weight_decay": 0.0}  # fmt: skip


def test_foreach_step_traces_as_one_graph_without_breaks():
    """torch.optim's step wrapper deliberately breaks the graph around the whole step (see
    torch.optim.optimizer._use_grad_for_differentiable); inside it, ours must be one graph."""
    import torch._dynamo

    params = make_params()
    for p in params:
        p.grad = torch.randn_like(p)
    opt = rmsprop.RMSprop(params, foreach=True, **COMPILE_OPTIONS)
    opt.step()  # create the state eagerly, as torch's own compile tests do
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(opt.step)()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_torch_compiled_step_matches_eager():
    params = make_params()
    grads = make_grads(params, steps=3)
    eager = [p.detach().clone().requires_grad_() for p in params]
    compiled = [p.detach().clone().requires_grad_() for p in params]
    eager_opt = rmsprop.RMSprop(eager, foreach=True, **COMPILE_OPTIONS)
    compiled_opt = rmsprop.RMSprop(compiled, foreach=True, **COMPILE_OPTIONS)
    step = torch.compile(compiled_opt.step)
    for g in grads:
        for p, q, gi in zip(eager, compiled, g, strict=True):
            p.grad, q.grad = gi.clone(), gi.clone()
        eager_opt.step()
        step()
    # Inductor fuses and reorders the float32 math: agreement to float32 rounding, not bits
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_per_group_options_and_add_param_group():
    a, b, c = make_params()[:3]
    opt = rmsprop.RMSprop(
        [{"params": [a]}, {"params": [b], "eps_in_sqrt": True, "momentum": 0.9, "lr_in_momentum": True}],
        lr=0.01,
    )
    opt.add_param_group({"params": [c], "initial_square_avg": 1.0, "lr": 0.1})
    for p in (a, b, c):
        p.grad = torch.ones_like(p)
    opt.step()
    assert set(opt.state[a]) == {"step", "square_avg"}
    assert set(opt.state[b]) == {"step", "square_avg", "momentum_buffer"}
    assert torch.allclose(opt.state[c]["square_avg"], torch.full_like(c, 0.99 + 0.01))
    opt.zero_grad()
    assert a.grad is None and b.grad is None


def test_seed_example_prints_the_same_losses_as_torch():
    kw = {"lr": 0.01, "alpha": 0.9, "eps": 1e-8}
    fused = train_seed_example(lambda m: rmsprop.RMSprop(m.parameters(), **kw), log=None)
    exact = train_seed_example(lambda m: rmsprop.RMSprop(m.parameters(), fused=False, **kw), log=None)
    theirs = train_seed_example(lambda m: torch.optim.RMSprop(m.parameters(), **kw), log=None)
    assert exact == theirs  # torch's path: bit for bit
    assert [f"{x:.4f}" for x in fused] == [f"{x:.4f}" for x in theirs]  # default path: as printed
    assert theirs[-1] < theirs[0]


def test_seed_document_code_runs_unchanged_but_for_the_import(tmp_path):
    """The seed document's script, with optim.RMSprop -> rmsprop.RMSprop, prints torch's losses."""
    script = """
import torch
import torch.nn as nn
import torch.optim as optim
import rmsprop
torch.manual_seed(0)
class SimpleNet(nn.Module):
    def __init__(self):
        super(SimpleNet, self).__init__()
        self.fc1 = nn.Linear(10, 50)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(50, 1)
    def forward(self, x):
        x = self.relu(self.fc1(x))
        x = self.fc2(x)
        return x
model = SimpleNet()
criterion = nn.MSELoss()
optimizer = OPTIMIZER(model.parameters(), lr=0.01, alpha=0.9, eps=1e-08)
X = torch.randn(100, 10)
y = torch.randn(100, 1)
for epoch in range(10):
    optimizer.zero_grad()
    outputs = model(X)
    loss = criterion(outputs, y)
    loss.backward()
    optimizer.step()
    print(f"Epoch [{epoch+1}/10], Loss: {loss.item():.4f}")
"""
    outputs = []
    for name in ("rmsprop.RMSprop", "optim.RMSprop"):
        path = tmp_path / "seed.py"
        path.write_text(script.replace("OPTIMIZER", name))
        outputs.append(
            subprocess.run([sys.executable, str(path)], capture_output=True, text=True, check=True).stdout
        )
    assert outputs[0] == outputs[1]
    assert outputs[0].count("Epoch [") == 10


def test_cli_demo_prints_ten_epochs():
    out = subprocess.run(
        [sys.executable, "-m", "rmsprop", "demo", "--epochs", "3", "--preset", "seed"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Epoch [3/3], Loss:" in out


# ----------------------------------------------------------------------------- torch.compile
def _compiled_training(make_optimizer, steps=3, scheduler=False):
    """Compile a whole training step (zero_grad, forward, backward, step) and count the graphs
    dynamo makes over ``steps`` steps, and the custom-op nodes in them."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 1))
    opt = make_optimizer(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.9) if scheduler else None
    X, y = torch.randn(32, 10), torch.randn(32, 1)
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
        if sched is not None:
            sched.step()
    ops = sum(1 for g in graphs for n in g.graph.nodes if "rmsprop.fused_step" in str(n.target))
    return len(graphs), ops, opt


def _groups(params, **kw):
    params = list(params)
    return [{"params": params[:2], **kw}, {"params": params[2:], "momentum": 0.5}]


COMPILE_CASES = {
    "default": ({}, False),
    "momentum+centered": (NAMED["momentum+centered"], False),
    "tensor lr and a scheduler": ({"lr": torch.tensor(0.01)}, True),
    "float lr and a scheduler": ({"lr": 0.01}, True),
}


@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_a_compiled_training_step_has_no_more_graphs_than_with_torch(case):
    kwargs, scheduler = COMPILE_CASES[case]
    ours, ops, _ = _compiled_training(lambda p: rmsprop.RMSprop(p, **kwargs), scheduler=scheduler)
    theirs, _, _ = _compiled_training(lambda p: torch.optim.RMSprop(p, **kwargs), scheduler=scheduler)
    assert ours <= theirs, (ours, theirs)
    assert ops >= 1  # the fused kernel is in the graph, not a fallback


def test_a_tensor_lr_scheduler_causes_no_recompile():
    plain, _, _ = _compiled_training(lambda p: rmsprop.RMSprop(p, lr=torch.tensor(0.01)))
    scheduled, _, opt = _compiled_training(
        lambda p: rmsprop.RMSprop(p, lr=torch.tensor(0.01)), scheduler=True
    )
    assert scheduled == plain
    assert opt.param_groups[0]["lr"].item() == pytest.approx(0.01 * 0.9**3)


def test_two_groups_compile_like_torch():
    ours, ops, _ = _compiled_training(lambda p: rmsprop.RMSprop(_groups(p)))
    theirs, _, _ = _compiled_training(lambda p: torch.optim.RMSprop(_groups(p)))
    assert ours <= theirs and ops >= 1


def test_the_custom_op_runs_on_every_compiled_step(monkeypatch):
    """Steps 1-3 of a compiled step each run the kernel through the custom op (whose
    implementation calls kernel.prepare without a cache), never the eager path."""
    from rmsprop.backends.fused_cpu import kernel

    through_op = []
    original = kernel.prepare

    def spy(*args, **kwargs):
        through_op.append(kwargs["cache"] is None)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernel, "prepare", spy)
    graphs, ops, opt = _compiled_training(lambda p: rmsprop.RMSprop(p, momentum=0.9), steps=3)
    assert through_op == [True] * 3
    assert ops >= 1 and len(opt._fused_cache) == 0
    assert all(s["step"].item() == 3 for s in opt.state.values())


def test_compiled_fused_step_equals_eager_bit_for_bit():
    """The same kernel runs inside the opaque op: compiling only opt.step changes no bit."""
    params = make_params()
    grads = make_grads(params, steps=3)
    eager = [p.detach().clone().requires_grad_() for p in params]
    compiled = [p.detach().clone().requires_grad_() for p in params]
    eager_opt = rmsprop.RMSprop(eager, fused=True, **NAMED["momentum+centered"])
    compiled_opt = rmsprop.RMSprop(compiled, fused=True, **NAMED["momentum+centered"])
    torch._dynamo.reset()
    step = torch.compile(compiled_opt.step)
    for g in grads:
        for p, q, gi in zip(eager, compiled, g, strict=True):
            p.grad, q.grad = gi.clone(), gi.clone()
        eager_opt.step()
        step()
    for a, b in zip(eager, compiled, strict=True):
        assert torch.equal(a, b)
