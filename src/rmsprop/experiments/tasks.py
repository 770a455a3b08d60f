"""The six tasks of `rmsprop compare`. Every task makes its data and model from the seed alone,
so every optimizer sees the same problem; all data is generated or shipped in a package.

A task returns a dict: ``curve`` (the loss at each logged point, lower is better), ``steps`` (the
step of each point), ``final`` (the task's metric, lower is better), ``initial`` (that metric
before training: what "no progress" scores) and task-specific extras.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..demo import SimpleNet
from .optimizers import effective_lr

MakeOptimizer = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    metric: str  # what `final` measures (lower is better)
    run: Callable[[MakeOptimizer, int, bool], dict]
    log_scale: bool = False  # plot the curve on a log axis


def _finite(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def _train(model_params, make_optimizer, loss_fn, steps, log_every, extra=None) -> tuple[list, list, bool]:
    """Run ``steps`` steps; return the logged losses, their steps, and whether training finished
    without the loss turning inf/NaN (a diverged run stops there and scores +inf)."""
    opt = make_optimizer(model_params)
    curve, at = [], []
    for t in range(steps):
        opt.zero_grad()
        loss = loss_fn(t)
        loss.backward()
        if extra is not None:
            extra(t, opt)
        opt.step()
        if t % log_every == 0 or t == steps - 1:
            value = loss.item()
            curve.append(_finite(value))
            at.append(t)
            if not math.isfinite(value):
                return curve, at, False
    return curve, at, True


# --------------------------------------------------------------------------- 1. seed
def seed_regression(make_optimizer: MakeOptimizer, seed: int, quick: bool) -> dict:
    """The seed document's SimpleNet on 100 random samples, full batch, MSE."""
    torch.manual_seed(seed)
    model = SimpleNet()
    X, y = torch.randn(100, 10), torch.randn(100, 1)
    steps = 100 if quick else 300
    with torch.no_grad():
        initial = nn.functional.mse_loss(model(X), y).item()
    curve, at, ok = _train(
        list(model.parameters()), make_optimizer, lambda t: nn.functional.mse_loss(model(X), y), steps, 5
    )
    final = sum(curve[-3:]) / 3 if ok else math.inf
    return {"curve": curve, "steps": at, "final": final, "initial": initial}


# --------------------------------------------------------------------------- 2. long horizon
def long_horizon(make_optimizer: MakeOptimizer, seed: int, quick: bool) -> dict:
    """Logistic regression on separable data for many steps. The gradients shrink as the margin
    grows: Adagrad's accumulated sum keeps its step size at the scale of the first, large
    gradients (and below), while an exponential average lets the step size grow again. The
    effective per-parameter lr is recorded over time."""
    gen = torch.Generator().manual_seed(seed)
    n, d = 256, 20
    w_true = torch.randn(d, generator=gen)
    X = torch.randn(n, d, generator=gen) * torch.logspace(0, -1, d)  # features of unequal scale
    y = (X @ w_true > 0).float()
    w = torch.zeros(d, requires_grad=True)
    steps = 600 if quick else 2000
    log_every = 10
    eff_median, eff_p10, eff_p90 = [], [], []

    def record(t, opt):
        if t % log_every == 0 or t == steps - 1:
            if t > 0:
                e = effective_lr(opt, [w])
                eff_median.append(e.median().item())
                eff_p10.append(e.quantile(0.1).item())
                eff_p90.append(e.quantile(0.9).item())

    def loss(t):
        return nn.functional.binary_cross_entropy_with_logits(X @ w, y)

    initial = math.log(2.0)
    curve, at, ok = _train([w], make_optimizer, loss, steps, log_every, extra=record)
    final = curve[-1] if ok else math.inf
    return {
        "curve": curve,
        "steps": at,
        "final": final,
        "initial": initial,
        "effective_lr": {
            "steps": at[1 : 1 + len(eff_median)],
            "median": eff_median,
            "p10": eff_p10,
            "p90": eff_p90,
        },
    }


# --------------------------------------------------------------------------- 3. non-stationary
def non_stationary(make_optimizer: MakeOptimizer, seed: int, quick: bool) -> dict:
    """Online linear regression whose true weights jump to new values every 100 steps and drift
    in between; each step sees a fresh minibatch, so the loss is the tracking error."""
    gen = torch.Generator().manual_seed(seed)
    d, batch, period = 10, 16, 100
    segments = 5 if quick else 15
    w = torch.zeros(d, requires_grad=True)
    targets = [torch.randn(d, generator=gen) * 2 for _ in range(segments)]
    drift = torch.randn(segments * period, d, generator=gen) * 0.01
    Xs = torch.randn(segments * period, batch, d, generator=gen)
    noise = torch.randn(segments * period, batch, generator=gen) * 0.1

    def loss(t):
        w_star = targets[t // period] + drift[t - t % period : t + 1].sum(0)
        y = Xs[t] @ w_star + noise[t]
        return ((Xs[t] @ w - y) ** 2).mean()

    initial = (targets[0] ** 2).sum().item() + 0.01
    curve, at, ok = _train([w], make_optimizer, loss, segments * period, 5)
    mean_tracking = sum(curve) / len(curve) if ok else math.inf
    return {"curve": curve, "steps": at, "final": mean_tracking, "initial": initial, "period": period}


# --------------------------------------------------------------------------- 4. RNN
def adding_problem(make_optimizer: MakeOptimizer, seed: int, quick: bool) -> dict:
    """The adding problem: an LSTM reads 50 (value, marker) pairs and must output the sum of the
    two marked values. Predicting the mean scores 1/6 ~ 0.167; below that the net has learned to
    use the markers across the sequence."""
    gen = torch.Generator().manual_seed(seed)
    length, batch, hidden = 50, 64, 16 if quick else 32
    steps = 60 if quick else 400

    def sample(n):
        values = torch.rand(n, length, generator=gen)
        marks = torch.zeros(n, length)
        first = torch.randint(0, length // 2, (n,), generator=gen)
        second = torch.randint(length // 2, length, (n,), generator=gen)
        marks[torch.arange(n), first] = 1.0
        marks[torch.arange(n), second] = 1.0
        return torch.stack([values, marks], -1), (values * marks).sum(1, keepdim=True)

    torch.manual_seed(seed)
    lstm, head = nn.LSTM(2, hidden, batch_first=True), nn.Linear(hidden, 1)

    def predict(x):
        out, _ = lstm(x)
        return head(out[:, -1])

    test_x, test_y = sample(512)
    train = [sample(batch) for _ in range(steps)]
    with torch.no_grad():
        initial = nn.functional.mse_loss(predict(test_x), test_y).item()
    params = list(lstm.parameters()) + list(head.parameters())
    curve, at, ok = _train(
        params, make_optimizer, lambda t: nn.functional.mse_loss(predict(train[t][0]), train[t][1]), steps, 5
    )
    with torch.no_grad():
        final = _finite(nn.functional.mse_loss(predict(test_x), test_y).item()) if ok else math.inf
    return {"curve": curve, "steps": at, "final": final, "initial": initial, "baseline": 1 / 6}


# --------------------------------------------------------------------------- 5. digits
def digits(make_optimizer: MakeOptimizer, seed: int, quick: bool) -> dict:
    """scikit-learn's digits (1797 8x8 images, shipped inside the package): an MLP, minibatches;
    the metric is the test error rate on a held-out 400."""
    from sklearn.datasets import load_digits

    data = load_digits()
    X = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(X), generator=gen)
    test, train = order[:400], order[400:]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    epochs, batch = (4 if quick else 20), 64
    batches = [
        train[torch.randperm(len(train), generator=gen)][i : i + batch]
        for _ in range(epochs)
        for i in range(0, len(train), batch)
    ]

    def error():
        with torch.no_grad():
            return (model(X[test]).argmax(1) != y[test]).float().mean().item()

    initial = error()
    curve, at, ok = _train(
        list(model.parameters()),
        make_optimizer,
        lambda t: nn.functional.cross_entropy(model(X[batches[t]]), y[batches[t]]),
        len(batches),
        5,
    )
    final = error() if ok else math.inf
    return {"curve": curve, "steps": at, "final": final, "initial": initial, "test_accuracy": 1 - final}


# --------------------------------------------------------------------------- 6. Rosenbrock
def rosenbrock(make_optimizer: MakeOptimizer, seed: int, quick: bool) -> dict:
    """f(x, y) = (1 - x)^2 + 100 (y - x^2)^2 from near (-1.2, 1): a curved, ill-conditioned
    valley. The trajectory is recorded for the contour plot."""
    gen = torch.Generator().manual_seed(seed)
    xy = (torch.tensor([-1.2, 1.0]) + 0.05 * torch.randn(2, generator=gen)).requires_grad_()
    steps = 400 if quick else 1500

    def f(t):
        x, y = xy[0], xy[1]
        return (1 - x) ** 2 + 100 * (y - x**2) ** 2

    path = [xy.detach().tolist()]

    def record(t, opt):
        if t % 5 == 0:
            path.append(xy.detach().tolist())

    with torch.no_grad():
        initial = f(0).item()
    curve, at, ok = _train([xy], make_optimizer, f, steps, 5, extra=record)
    path.append(xy.detach().tolist())
    final = curve[-1] if ok else math.inf
    return {"curve": curve, "steps": at, "final": final, "initial": initial, "path": path}


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("seed", "Seed example: SimpleNet regression", "final training MSE", seed_regression),
        Task(
            "long-horizon",
            "Long horizon: separable logistic regression",
            "final training loss",
            long_horizon,
            log_scale=True,
        ),
        Task(
            "non-stationary",
            "Non-stationary target: switching linear regression",
            "mean tracking MSE",
            non_stationary,
            log_scale=True,
        ),
        Task("rnn", "RNN: the adding problem, length 50 (LSTM)", "test MSE", adding_problem),
        Task("digits", "Classification: scikit-learn digits, MLP", "test error rate", digits),
        Task(
            "rosenbrock",
            "Rosenbrock function (ill-conditioned, 2-D)",
            "final f(x, y)",
            rosenbrock,
            log_scale=True,
        ),
    ]
}
