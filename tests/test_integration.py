"""rmsprop.RMSprop inside the rest of torch: schedulers, GradScaler, torch.compile, param groups,
and the seed document's example."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
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
COMPILE_OPTIONS = {
    "lr": 0.01,
    "momentum": 0.9,
    "centered": True,
    "nesterov": True,
    "eps_in_sqrt": True,
    "bias_correction": True,
    "initial_square_avg": 1.0,
}


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
