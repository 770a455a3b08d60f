"""timm's optimizer factory with rmsprop's optimizer and presets (CPU, a second).

    python examples/timm_create_optimizer.py

After ``register_timm()``, ``timm.optim.create_optimizer_v2`` (and timm's train.py, ``--opt``)
know ``rmspropx`` (RMSprop with this library's defaults) and ``rmspropx<preset>`` for every preset
(``rmspropxtimm``, ``rmspropxkeras``, ...), with or without timm's ``lookahead_`` prefix. A tiny
MLP stands in for a timm model here (``timm.create_model(...)`` works the same way) so that the
example runs where torchvision, which timm's models need, is not installed.
"""

from __future__ import annotations

import sys

import timm.optim
import torch
from torch import nn

import rmsprop
from rmsprop.integrations.timm import register_timm


def main() -> dict[str, float]:
    names = register_timm()
    print("registered in timm:", ", ".join(names))
    results = {}
    for name in ("rmspropxtimm", "lookahead_rmspropxkeras"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 1))
        # weight decay goes to the weight matrices only (timm's filter_bias_and_bn), momentum
        # defaults to 0.9 as for every timm optimizer with momentum.
        opt = timm.optim.create_optimizer_v2(model, name, lr=3e-3, weight_decay=1e-4)
        inner = getattr(opt, "_base_optimizer", opt)  # Lookahead wraps it
        assert isinstance(inner, rmsprop.RMSprop)
        x = torch.randn(256, 8)
        y = x.sum(dim=1, keepdim=True)
        losses = []
        for _ in range(60):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        print(f"{name}: {type(opt).__name__}({type(inner).__name__}), loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        results[name] = losses[-1] / losses[0]
    return results


if __name__ == "__main__":
    sys.exit(0 if all(r < 0.5 for r in main().values()) else "the loss did not fall by half")
