"""Worker functions for tests/test_shared.py, started with torch.multiprocessing's spawn. They
step optimizers whose parameters and state the parent put in shared memory; the parent reads the
results from those same tensors."""

from __future__ import annotations

import time

import torch

SHAPES = ((5, 4), (4,), (300,))
STEPS_PER_WORKER = 4


def grads_for(turn: int, params) -> list[torch.Tensor]:
    """The gradients of global step ``turn``: the same in a worker and in the parent's replay."""
    gen = torch.Generator().manual_seed(1000 + turn)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


def take_turns(rank: int, world: int, optimizers, turn, steps: int = STEPS_PER_WORKER) -> None:
    """Step every optimizer on global steps rank, rank + world, ...: the workers alternate, so the
    shared result is one deterministic sequence (turn is a shared counter)."""
    torch.set_num_threads(1)
    for t in range(steps):
        mine = t * world + rank
        deadline = time.monotonic() + 120
        while turn.value != mine:
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {rank} waited too long for turn {mine} (at {turn.value})")
            time.sleep(0.001)
        for opt in optimizers:
            params = opt.param_groups[0]["params"]
            for p, g in zip(params, grads_for(mine, params), strict=True):
                p.grad = g
            opt.step()
        with turn.get_lock():
            turn.value += 1
