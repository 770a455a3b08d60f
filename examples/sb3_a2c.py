"""Stable-Baselines3's A2C with rmsprop.RMSprop, through policy_kwargs, on CartPole (gymnasium;
CPU, a few seconds).

    python examples/sb3_a2c.py                      # the drop-in, then the TensorFlow preset
    python examples/sb3_a2c.py --timesteps 20000    # long enough to learn CartPole

A2C's default optimizer is torch.optim.RMSprop(alpha=0.99, eps=1e-5, weight_decay=0) -- the
original A2C used TensorFlow's RMSProp, whose eps sits inside the square root and whose average
starts at 1. Both are one argument away:

- ``optimizer_class=rmsprop.RMSprop`` with A2C's own kwargs: the same training as torch's
  (bit-identical with ``fused=False``; the default fused kernel rounds once per value).
- ``optimizer_class=functools.partial(rmsprop.from_preset, "tensorflow")``: the TF flavour.
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch
from stable_baselines3 import A2C

import rmsprop

A2C_KWARGS = {"alpha": 0.99, "eps": 1e-5, "weight_decay": 0}  # what A2C gives torch's RMSprop


def train(optimizer_class, optimizer_kwargs: dict, timesteps: int, seed: int = 0) -> A2C:
    model = A2C(
        "MlpPolicy",
        "CartPole-v1",
        seed=seed,
        device="cpu",
        policy_kwargs={"optimizer_class": optimizer_class, "optimizer_kwargs": optimizer_kwargs},
    )
    model.learn(total_timesteps=timesteps)
    return model


def policy_parameters(model: A2C) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.policy.parameters()]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timesteps", type=int, default=1000)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # tiny networks: threads only add overhead
    theirs = train(torch.optim.RMSprop, A2C_KWARGS, args.timesteps)
    ours = train(rmsprop.RMSprop, {**A2C_KWARGS, "fused": False}, args.timesteps)
    assert type(ours.policy.optimizer) is rmsprop.RMSprop
    identical = all(
        torch.equal(a, b) for a, b in zip(policy_parameters(ours), policy_parameters(theirs), strict=True)
    )
    print(f"A2C, {args.timesteps} steps: rmsprop.RMSprop(fused=False) vs torch.optim.RMSprop: "
          f"{'bit-identical' if identical else 'DIFFERENT'} policy parameters")

    tf = train(functools.partial(rmsprop.from_preset, "tensorflow"), {"eps": 1e-5}, args.timesteps)
    options = tf.policy.optimizer.defaults
    print(f"A2C with the tensorflow preset: eps_in_sqrt={options['eps_in_sqrt']}, "
          f"initial_square_avg={options['initial_square_avg']}, lr={options['lr']}")
    return {"identical": identical, "tensorflow": tf}


if __name__ == "__main__":
    sys.exit(0 if main()["identical"] else "rmsprop.RMSprop(fused=False) differed from torch.optim.RMSprop")
