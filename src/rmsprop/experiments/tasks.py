"""The eight tasks of `rmsprop compare`. Every task makes its data and model from the seed alone,
so every optimizer sees the same problem; all data is generated, ships with Python, or ships
inside a package (scikit-learn's digits, gymnasium's CartPole): nothing is downloaded.

A task returns a dict: ``curve`` (the loss-like quantity at each logged point, lower is better),
``steps`` (the step of each point), ``final`` (the task's metric, lower is better), ``initial``
(that metric before training: what "no progress" scores), ``effective_lr_end`` (quantiles of the
per-parameter step size at the end) and task-specific extras. ``baseline`` on the Task, where
there is one, is the metric of a trivial predictor that needs no training.
"""

from __future__ import annotations

import functools
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
    # Compare and plot the metric on a log axis: its values span decades (losses that go to 0).
    log_scale: bool = False
    # A trivial predictor's metric, and what it is (None: the untrained model is the baseline).
    baseline_label: str | None = None
    # Loss spikes are instability only where the loss should not jump by design; the
    # non-stationary task's target jumps every period.
    spikes_mean_instability: bool = True
    # Steps-to-target is a convergence speed only where training converges to one target.
    has_convergence_speed: bool = True


def _finite(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def quantiles(values: torch.Tensor) -> dict:
    """p10 / median / p90 of a 1-D tensor (the per-parameter effective lr)."""
    if values.numel() == 0:
        return {"p10": math.nan, "median": math.nan, "p90": math.nan}
    q = torch.quantile(values.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"p10": q[0].item(), "median": q[1].item(), "p90": q[2].item()}


def _train(params, make_optimizer, loss_fn, steps, log_every, extra=None) -> tuple[list, list, bool, dict]:
    """Run ``steps`` steps; return the logged losses, their steps, whether training finished
    without the loss turning inf/NaN (a run that does stops there and scores +inf), and the
    quantiles of the effective per-parameter lr at the end."""
    opt = make_optimizer(params)
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
                return curve, at, False, quantiles(effective_lr(opt, params))
    return curve, at, True, quantiles(effective_lr(opt, params))


# --------------------------------------------------------------------------- 1. seed
def seed_regression(make_optimizer: MakeOptimizer, seed: int, quick: bool) -> dict:
    """The seed document's SimpleNet on 100 random samples, full batch, MSE (the training loss:
    this task is about optimisation, not generalisation)."""
    torch.manual_seed(seed)
    model = SimpleNet()
    X, y = torch.randn(100, 10), torch.randn(100, 1)
    steps = 100 if quick else 300
    with torch.no_grad():
        initial = nn.functional.mse_loss(model(X), y).item()
    curve, at, ok, eff = _train(
        list(model.parameters()), make_optimizer, lambda t: nn.functional.mse_loss(model(X), y), steps, 5
    )
    final = sum(curve[-3:]) / 3 if ok else math.inf
    return {"curve": curve, "steps": at, "final": final, "initial": initial, "effective_lr_end": eff}


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
    steps = 300 if quick else 2000
    log_every = 10
    eff_median, eff_p10, eff_p90 = [], [], []

    def record(t, opt):
        if (t % log_every == 0 or t == steps - 1) and t > 0:
            q = quantiles(effective_lr(opt, [w]))
            eff_median.append(q["median"])
            eff_p10.append(q["p10"])
            eff_p90.append(q["p90"])

    def loss(t):
        return nn.functional.binary_cross_entropy_with_logits(X @ w, y)

    initial = math.log(2.0)
    curve, at, ok, eff = _train([w], make_optimizer, loss, steps, log_every, extra=record)
    final = curve[-1] if ok else math.inf
    return {
        "curve": curve,
        "steps": at,
        "final": final,
        "initial": initial,
        "effective_lr_end": eff,
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
    in between; each step sees a fresh minibatch, so the loss is the tracking error. The metric
    is the mean over every logged step; "no progress" is the same mean for weights left at 0."""
    gen = torch.Generator().manual_seed(seed)
    d, batch, period, log_every = 10, 16, 100, 5
    segments = 3 if quick else 15
    steps = segments * period
    w = torch.zeros(d, requires_grad=True)
    targets = [torch.randn(d, generator=gen) * 2 for _ in range(segments)]
    drift = torch.randn(steps, d, generator=gen) * 0.01
    Xs = torch.randn(steps, batch, d, generator=gen)
    noise = torch.randn(steps, batch, generator=gen) * 0.1

    def target(t):
        w_star = targets[t // period] + drift[t - t % period : t + 1].sum(0)
        return Xs[t] @ w_star + noise[t]

    def loss(t):
        return ((Xs[t] @ w - target(t)) ** 2).mean()

    # The zero predictor's loss at the logged steps, averaged as the metric averages them.
    logged = [t for t in range(steps) if t % log_every == 0 or t == steps - 1]
    initial = sum((target(t) ** 2).mean().item() for t in logged) / len(logged)
    curve, at, ok, eff = _train([w], make_optimizer, loss, steps, log_every)
    mean_tracking = sum(curve) / len(curve) if ok else math.inf
    return {
        "curve": curve,
        "steps": at,
        "final": mean_tracking,
        "initial": initial,
        "effective_lr_end": eff,
        "period": period,
    }


# --------------------------------------------------------------------------- 4. RNN
def adding_problem(make_optimizer: MakeOptimizer, seed: int, quick: bool) -> dict:
    """The adding problem: an LSTM reads a sequence of (value, marker) pairs (30 long; 10 in
    quick mode) and must output the sum of the two marked values. Predicting the mean scores
    1/6 ~ 0.167; below that the net has learned to use the markers across the sequence."""
    gen = torch.Generator().manual_seed(seed)
    length, batch, hidden = (10 if quick else 30), 64, 32
    steps = 200 if quick else 500

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

    test_x, test_y = sample(256 if quick else 512)
    train = [sample(batch) for _ in range(steps)]
    with torch.no_grad():
        initial = nn.functional.mse_loss(predict(test_x), test_y).item()
    params = list(lstm.parameters()) + list(head.parameters())
    curve, at, ok, eff = _train(
        params, make_optimizer, lambda t: nn.functional.mse_loss(predict(train[t][0]), train[t][1]), steps, 5
    )
    with torch.no_grad():
        final = _finite(nn.functional.mse_loss(predict(test_x), test_y).item()) if ok else math.inf
    return {"curve": curve, "steps": at, "final": final, "initial": initial, "effective_lr_end": eff}


# --------------------------------------------------------------------------- 5. digits
@functools.lru_cache(maxsize=1)
def _digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16.0, torch.tensor(data.target)


def digits(make_optimizer: MakeOptimizer, seed: int, quick: bool) -> dict:
    """scikit-learn's digits (1797 8x8 images, shipped inside the package): an MLP, minibatches
    of 64; the metric is the test error rate on a held-out 400. Many border pixels are almost
    always blank, so their weights see rare, small gradients."""
    X, y = _digits_data()
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
    curve, at, ok, eff = _train(
        list(model.parameters()),
        make_optimizer,
        lambda t: nn.functional.cross_entropy(model(X[batches[t]]), y[batches[t]]),
        len(batches),
        5,
    )
    final = error() if ok else math.inf
    return {"curve": curve, "steps": at, "final": final, "initial": initial, "effective_lr_end": eff}


# --------------------------------------------------------------------------- 6. Rosenbrock
def rosenbrock(make_optimizer: MakeOptimizer, seed: int, quick: bool) -> dict:
    """f(x, y) = (1 - x)^2 + 100 (y - x^2)^2 from near (-1.2, 1): a curved, ill-conditioned
    valley. The trajectory is recorded for the contour plot."""
    gen = torch.Generator().manual_seed(seed)
    xy = (torch.tensor([-1.2, 1.0]) + 0.05 * torch.randn(2, generator=gen)).requires_grad_()
    steps = 200 if quick else 1500

    def f(t):
        x, y = xy[0], xy[1]
        return (1 - x) ** 2 + 100 * (y - x**2) ** 2

    path = [xy.detach().tolist()]

    def record(t, opt):
        if t % 5 == 0:
            path.append(xy.detach().tolist())

    with torch.no_grad():
        initial = f(0).item()
    curve, at, ok, eff = _train([xy], make_optimizer, f, steps, 5, extra=record)
    path.append(xy.detach().tolist())
    final = curve[-1] if ok else math.inf
    return {
        "curve": curve,
        "steps": at,
        "final": final,
        "initial": initial,
        "effective_lr_end": eff,
        "path": path,
    }


# --------------------------------------------------------------------------- 7. reinforcement learning
CARTPOLE_MAX_RETURN = 500.0  # CartPole-v1 truncates an episode at 500 steps, one reward per step


def a2c_cartpole(make_optimizer: MakeOptimizer, seed: int, quick: bool) -> dict:
    """A2C (synchronous advantage actor-critic, the setting of A3C and Stable-Baselines3's A2C,
    whose default optimizer is RMSProp) on gymnasium's CartPole-v1: 8 environments, 5-step
    returns, separate 64-64 tanh actor and critic, entropy bonus 0.01, value loss 0.5, gradient
    norm clipped at 0.5. The targets move as the policy improves. The metric is the shortfall
    from the maximum return, 500 - (mean return of the episodes finished in the last fifth of
    training): 0 is a perfect policy. An episode cut off at 500 steps is treated as terminal."""
    import numpy as np
    from gymnasium.envs.classic_control.cartpole import CartPoleVectorEnv

    n_envs, n_steps, gamma = 8, 5, 0.99
    updates = 120 if quick else 500
    log_every = 10
    torch.manual_seed(seed)

    def mlp(out):
        return nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, out))

    actor, critic = mlp(2), mlp(1)
    params = [*actor.parameters(), *critic.parameters()]
    sampler = torch.Generator().manual_seed(seed)

    def act(obs):
        with torch.no_grad():
            probs = torch.softmax(actor(torch.from_numpy(obs)), -1)
        return torch.multinomial(probs, 1, generator=sampler).squeeze(-1).numpy()

    def untrained_return() -> float:
        """Mean return of the untrained policy: one full episode in each environment."""
        env = CartPoleVectorEnv(num_envs=n_envs)
        obs, _ = env.reset(seed=seed + 10_000)
        total, alive = np.zeros(n_envs), np.ones(n_envs, bool)
        while alive.any():
            obs, reward, term, trunc, _ = env.step(act(obs))
            total += reward * alive
            alive &= ~(term | trunc)
        return float(total.mean())

    initial = CARTPOLE_MAX_RETURN - untrained_return()
    env = CartPoleVectorEnv(num_envs=n_envs)
    obs, _ = env.reset(seed=seed)
    opt = make_optimizer(params)
    # gymnasium's vector env resets an environment on the step after it ends; that step's
    # transition (reward 0, action ignored) is masked out of the loss.
    prev_done = np.zeros(n_envs, bool)
    running = np.zeros(n_envs)
    episodes: list[tuple[int, float]] = []  # (update at which it ended, return)
    curve, at = [], []
    ok = True
    for update in range(updates):
        obs_b = np.empty((n_steps, n_envs, 4), np.float32)
        act_b = np.empty((n_steps, n_envs), np.int64)
        rew_b = np.empty((n_steps, n_envs), np.float32)
        done_b = np.empty((n_steps, n_envs), np.float32)
        valid_b = np.empty((n_steps, n_envs), np.float32)
        for t in range(n_steps):
            action = act(obs)
            obs_b[t], act_b[t], valid_b[t] = obs, action, ~prev_done
            obs, reward, term, trunc, _ = env.step(action)
            done = term | trunc
            rew_b[t], done_b[t] = reward, done
            running += reward
            for i in np.flatnonzero(done):
                episodes.append((update, float(running[i])))
                running[i] = 0.0
            prev_done = done
        with torch.no_grad():
            ret = critic(torch.from_numpy(obs)).squeeze(-1).numpy()
        returns = np.empty_like(rew_b)
        for t in reversed(range(n_steps)):
            ret = rew_b[t] + gamma * (1.0 - done_b[t]) * ret
            returns[t] = ret
        o = torch.from_numpy(obs_b).reshape(-1, 4)
        a = torch.from_numpy(act_b).reshape(-1)
        target = torch.from_numpy(returns).reshape(-1)
        mask = torch.from_numpy(valid_b).reshape(-1)
        logp_all = torch.log_softmax(actor(o), -1)
        value = critic(o).squeeze(-1)
        logp = logp_all.gather(1, a[:, None]).squeeze(1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        advantage = (target - value).detach()
        n = mask.sum()
        loss = (
            -(logp * advantage * mask).sum() / n
            + 0.5 * ((target - value) ** 2 * mask).sum() / n
            - 0.01 * (entropy * mask).sum() / n
        )
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        if not math.isfinite(loss.item()):  # non-finite weights show here one update later
            ok = False
            curve.append(math.inf)
            at.append(update)
            break
        if update % log_every == 0 or update == updates - 1:
            recent = [r for _, r in episodes[-20:]]
            curve.append(CARTPOLE_MAX_RETURN - (sum(recent) / len(recent) if recent else 0.0))
            at.append(update)
    late = [r for u, r in episodes if u >= updates * 4 // 5]
    final = CARTPOLE_MAX_RETURN - sum(late) / len(late) if ok and late else math.inf
    return {
        "curve": curve,
        "steps": at,
        "final": final,
        "initial": initial,
        "effective_lr_end": quantiles(effective_lr(opt, params)),
    }


# --------------------------------------------------------------------------- 8. text
TEXT_VOCAB = [chr(c) for c in range(32, 127)] + ["\n"]  # printable ASCII; the rest is one token
TEXT_HELD_OUT = 16384  # the first characters, never trained on


@functools.lru_cache(maxsize=1)
def text_corpus() -> torch.Tensor:
    """The help texts of Python's own documentation (`pydoc_data.topics`, in every Python
    install), in topic order, as token ids."""
    from pydoc_data.topics import topics

    class Table(dict):  # str.translate: each vocabulary char to its id, any other char to the last id
        def __missing__(self, key):
            return len(TEXT_VOCAB)

    table = Table({ord(c): i for i, c in enumerate(TEXT_VOCAB)})
    text = "".join(topics[k] for k in sorted(topics))
    ids = text.translate(table).encode("latin-1")  # one byte per char: every id is < 256
    return torch.frombuffer(bytearray(ids), dtype=torch.uint8).long()


def unigram_bits(train: torch.Tensor, val: torch.Tensor, vocab: int) -> float:
    """Bits per char on ``val`` of the character frequencies of ``train`` (add-one smoothing):
    the trivial model that ignores context."""
    counts = torch.bincount(train, minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log2()
    return -logp[val].mean().item()


def char_lm(make_optimizer: MakeOptimizer, seed: int, quick: bool) -> dict:
    """A character-level LSTM language model (embedding 16, one LSTM layer of 64, 32-char
    windows, batches of 32) on the help texts that ship with Python (`pydoc_data.topics`); the
    first 16k characters are held out. The metric is validation bits per character; the
    character-frequency (unigram) model is the trivial baseline."""
    data = text_corpus()
    vocab = len(TEXT_VOCAB) + 1
    n_val, window, batch = TEXT_HELD_OUT, 32, 32
    steps = 60 if quick else 300
    val, train = data[:n_val], data[n_val:]
    # quick mode scores on the first quarter of the held-out text: the same text, less of it
    n_scored = n_val // 4 if quick else n_val
    val_windows = val[: n_scored // (window + 1) * (window + 1)].view(-1, window + 1)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    embed, lstm, head = nn.Embedding(vocab, 16), nn.LSTM(16, 64, batch_first=True), nn.Linear(64, vocab)
    params = [*embed.parameters(), *lstm.parameters(), *head.parameters()]
    starts = torch.randint(0, len(train) - window - 1, (steps, batch), generator=gen)

    def nll(x):
        out, _ = lstm(embed(x[:, :-1]))
        return nn.functional.cross_entropy(head(out).reshape(-1, vocab), x[:, 1:].reshape(-1))

    def bits_per_char() -> float:
        with torch.no_grad():
            return _finite(nll(val_windows).item() / math.log(2))

    initial = bits_per_char()
    offsets = torch.arange(window + 1)
    curve, at, ok, eff = _train(
        params, make_optimizer, lambda t: nll(train[starts[t][:, None] + offsets]) / math.log(2), steps, 5
    )
    final = bits_per_char() if ok else math.inf
    return {"curve": curve, "steps": at, "final": final, "initial": initial, "effective_lr_end": eff}


def trivial_baseline(name: str) -> float | None:
    """The metric of the task's trivial predictor, where it has one (it needs no training run)."""
    if name == "rnn":
        return 1 / 6  # predict the mean sum, 1: the variance of a sum of two U(0, 1)
    if name == "text":
        data = text_corpus()
        return unigram_bits(data[TEXT_HELD_OUT:], data[:TEXT_HELD_OUT], len(TEXT_VOCAB) + 1)
    return None


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            "seed",
            "Seed example: SimpleNet regression",
            "final training MSE",
            seed_regression,
            log_scale=True,
        ),
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
            spikes_mean_instability=False,
            has_convergence_speed=False,
        ),
        Task(
            "rnn",
            "RNN: the adding problem (LSTM)",
            "test MSE",
            adding_problem,
            baseline_label="predict the mean (1/6)",
        ),
        Task("digits", "Classification: scikit-learn digits, MLP", "test error rate", digits),
        Task(
            "rosenbrock",
            "Rosenbrock function (ill-conditioned, 2-D)",
            "final f(x, y)",
            rosenbrock,
            log_scale=True,
        ),
        Task(
            "rl",
            "Reinforcement learning: A2C on CartPole-v1",
            "500 - mean return",
            a2c_cartpole,
        ),
        Task(
            "text",
            "Text: character-level LSTM language model",
            "validation bits per char",
            char_lm,
            baseline_label="character frequencies (unigram)",
        ),
    ]
}
