"""A3C on CartPole-v1 with shared RMSProp: every worker steps one model and one set of statistics.

The asynchronous advantage actor-critic of Mnih et al. (2016): N worker processes each run their
own environment and a local copy of the model, compute n-step advantage actor-critic gradients,
and apply them, without a lock, to one shared model through one shared optimizer — the paper's
"shared RMSProp" (the `a3c` preset: alpha 0.99, eps 0.1 inside the root), whose statistics live
in shared memory thanks to ``optimizer.share_memory()``.

    pip install -e ".[rl]"                          # gymnasium
    python examples/a3c_cartpole.py                 # 4 workers, about a minute on 2 cores
    python examples/a3c_cartpole.py --quick         # what CI runs: seconds of training (lr 3e-3)

It prints the greedy policy's mean return on fixed evaluation episodes before and after
training (CartPole-v1 caps an episode at 500), and ``--json PATH`` writes the summary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.multiprocessing as mp
from torch import nn

import rmsprop

EVAL_SEEDS = range(10_000, 10_010)


class ActorCritic(nn.Module):
    """A small MLP with a policy head (action logits) and a value head."""

    def __init__(self, obs_dim: int = 4, actions: int = 2, hidden: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.policy = nn.Linear(hidden, actions)
        self.value = nn.Linear(hidden, 1)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(obs)
        return self.policy(h), self.value(h).squeeze(-1)


def evaluate(model: ActorCritic, episodes=EVAL_SEEDS) -> float:
    """Mean return of the greedy policy over fixed episodes (deterministic given the model)."""
    import gymnasium as gym

    env = gym.make("CartPole-v1")
    total = 0.0
    with torch.no_grad():
        for seed in episodes:
            obs, _ = env.reset(seed=seed)
            done = False
            while not done:
                logits, _ = model(torch.as_tensor(obs, dtype=torch.float32))
                obs, reward, terminated, truncated, _ = env.step(int(logits.argmax()))
                total += float(reward)
                done = terminated or truncated
    env.close()
    return total / len(episodes)


def worker(rank: int, args, shared: ActorCritic, optimizer: rmsprop.RMSprop, counter, losses, returns, ready) -> None:
    """One A3C worker: n-step rollouts in its own environment, gradients applied to the shared
    model by the shared optimizer (no lock: Hogwild, as in the paper)."""
    import gymnasium as gym

    torch.set_num_threads(1)
    torch.manual_seed(args.seed + rank)
    env = gym.make("CartPole-v1")
    obs, _ = env.reset(seed=args.seed + rank)
    local = ActorCritic()
    episode_return = 0.0
    ready.wait()  # start together, once every process has imported and built its environment
    for _ in range(args.updates):
        local.load_state_dict(shared.state_dict())
        # The rollout only samples actions; the loss then takes one batched forward pass over
        # its observations (the local model does not change during the rollout).
        observations, actions, rewards, masks = [], [], [], []
        with torch.no_grad():
            for _ in range(args.n_steps):
                observations.append(torch.as_tensor(obs, dtype=torch.float32))
                logits, _ = local(observations[-1])
                # inverse-CDF sampling: torch.multinomial costs more than the whole step here
                action = int((logits.softmax(-1).cumsum(-1) < torch.rand(())).sum().clamp(max=logits.numel() - 1))
                obs, reward, terminated, truncated, _ = env.step(action)
                episode_return += float(reward)
                actions.append(action)
                rewards.append(float(reward))
                masks.append(0.0 if terminated else 1.0)  # a time limit is no terminal state
                if terminated or truncated:
                    break
            _, target = local(torch.as_tensor(obs, dtype=torch.float32))  # bootstrap value
        if terminated or truncated:
            returns.put(episode_return)
            episode_return = 0.0
            obs, _ = env.reset()
        targets = []
        for r, m in zip(reversed(rewards), reversed(masks), strict=True):
            target = r + args.gamma * m * target
            targets.append(target)
        targets = torch.stack(targets[::-1])

        logits, values = local(torch.stack(observations))
        log_probs = logits.log_softmax(-1)
        chosen = log_probs.gather(1, torch.tensor(actions).unsqueeze(1)).squeeze(1)
        entropy = -(log_probs.exp() * log_probs).sum(-1).mean()
        advantages = targets - values
        policy_loss = -(chosen * advantages.detach()).mean()
        value_loss = advantages.pow(2).mean()
        loss = policy_loss + 0.5 * value_loss - args.entropy * entropy

        local.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(local.parameters(), 40.0)
        for shared_p, local_p in zip(shared.parameters(), local.parameters(), strict=True):
            shared_p.grad = local_p.grad  # this process's view of the shared model gets the grads
        optimizer.step()
        losses.put(loss.item())
        with counter.get_lock():
            counter.value += 1
    env.close()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--updates", type=int, default=2500, help="updates per worker")
    parser.add_argument("--n-steps", type=int, default=20, help="rollout length (the paper's t_max: 5 or 20)")
    parser.add_argument("--lr", type=float, default=rmsprop.PRESETS["a3c"].options["lr"])
    parser.add_argument("--gamma", type=float, default=0.99)
    parser.add_argument("--entropy", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="what CI runs: 2 workers, 150 updates each, lr 3e-3 (a larger step than the preset's, so that "
        "seconds of training show)",
    )
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args(argv)
    if args.quick:
        args.workers, args.updates, args.lr = 2, 150, 3e-3

    torch.manual_seed(args.seed)
    shared = ActorCritic()
    shared.share_memory()  # the parameters, for every worker
    optimizer = rmsprop.from_preset("a3c", shared.parameters(), lr=args.lr)
    optimizer.share_memory()  # the statistics too: the paper's shared RMSProp
    before = evaluate(shared)

    ctx = mp.get_context("spawn")
    counter = ctx.Value("i", 0)
    losses, returns = ctx.Queue(), ctx.Queue()
    ready = ctx.Barrier(args.workers + 1)
    launched = time.perf_counter()
    procs = [
        ctx.Process(target=worker, args=(rank, args, shared, optimizer, counter, losses, returns, ready))
        for rank in range(args.workers)
    ]
    for p in procs:
        p.start()
    ready.wait(timeout=600)
    start = time.perf_counter()
    loss_values, episode_returns = [], []
    while any(p.is_alive() for p in procs) or not losses.empty() or not returns.empty():
        for queue, out in ((losses, loss_values), (returns, episode_returns)):
            while not queue.empty():
                out.append(queue.get())
        time.sleep(0.05)
    for p in procs:
        p.join()
    seconds = time.perf_counter() - start
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"a worker failed: exit codes {[p.exitcode for p in procs]}")

    after = evaluate(shared)
    first = episode_returns[: min(20, len(episode_returns))]
    last = episode_returns[-min(20, len(episode_returns)) :]
    summary = {
        "workers": args.workers,
        "updates": counter.value,
        "shared_step_counter": int(optimizer.state[next(shared.parameters())]["step"].item()),
        "startup_seconds": round(start - launched, 2),
        "training_seconds": round(seconds, 2),
        "episodes": len(episode_returns),
        "mean_return_first_20_episodes": sum(first) / max(len(first), 1),
        "mean_return_last_20_episodes": sum(last) / max(len(last), 1),
        "greedy_return_before": before,
        "greedy_return_after": after,
        "losses_finite": all(math.isfinite(v) for v in loss_values),
        "n_losses": len(loss_values),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
