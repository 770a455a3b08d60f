"""The sweeps of `rmsprop bench`: step time against tensor size and thread count, and the
optimizer's share of a whole training step. Every point measures its implementations side by
side, interleaved (runner._measure_side_by_side), so the ratios within a point hold even on a
machine whose speed drifts.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch

from ..optimizer import RMSprop

__all__ = ["SIZES", "size_sweep", "thread_sweep", "training_share"]

SIZES = (1_000, 10_000, 100_000, 1_000_000, 10_000_000, 100_000_000)
QUICK_SIZES = (1_000, 100_000, 10_000_000)
SWEEP_IMPLEMENTATIONS = ("rmsprop fused", "torch foreach", "bandwidth bound")


def size_sweep(measure: Callable, config_cls, quick: bool, log: Callable[[str], None]) -> list[dict]:
    """One fp32 tensor of each size: how the fixed costs of a step fade into the memory bound."""
    rows = []
    for n in QUICK_SIZES if quick else SIZES:
        config = config_cls(f"1x{n:g} fp32 plain", ((n,),), compile_torch=False)
        log(f"  size sweep: {n:,} elements ...")
        rows.append({"sizes": n, "results": measure(config, list(SWEEP_IMPLEMENTATIONS), quick)})
    return rows


def thread_sweep(measure: Callable, config, quick: bool, log: Callable[[str], None]) -> list[dict]:
    """The same configuration at 1 .. all cores' torch threads."""
    before = torch.get_num_threads()
    counts = sorted({1, *range(2, (os.cpu_count() or 1) + 1)})
    rows = []
    try:
        for threads in counts:
            torch.set_num_threads(threads)
            log(f"  thread sweep: {threads} thread(s) ...")
            rows.append({"threads": threads, "results": measure(config, list(SWEEP_IMPLEMENTATIONS), quick)})
    finally:
        torch.set_num_threads(before)
    return rows


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
        torch.nn.Linear(1024, 10),
    )  # fmt: skip


TRAINING_OPTIMIZERS: dict[str, Callable] = {
    "rmsprop (default: fused)": lambda ps: RMSprop(ps, lr=1e-3),
    "torch.optim.RMSprop (foreach)": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, foreach=True),
}


def training_share(quick: bool, log: Callable[[str], None]) -> dict:
    """A whole CPU training step of an MLP (784-1024-1024-10, 1.9M parameters, batch 64): forward
    and backward, then the optimizer step, each timed; the optimizer's share of the step, for
    this library's default and torch's RMSprop, measured round-robin."""
    log("  training step share ...")
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 784, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    setups = {}
    for name, make in TRAINING_OPTIMIZERS.items():
        model = _mlp()
        setups[name] = (model, make(model.parameters()))
    repeats, per = (5, 5) if quick else (15, 10)
    samples = {name: {"forward+backward": [], "optimizer step": []} for name in setups}
    for _ in range(2):  # warm-up: state creation, allocator, thread pool
        for model, opt in setups.values():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for _ in range(repeats):
        for name, (model, opt) in setups.items():
            fb = st = 0.0
            for _ in range(per):
                start = time.perf_counter()
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                mid = time.perf_counter()
                opt.step()
                fb += mid - start
                st += time.perf_counter() - mid
            samples[name]["forward+backward"].append(fb / per)
            samples[name]["optimizer step"].append(st / per)
    out = {
        "model": "MLP 784-1024-1024-10, batch 64",
        "parameters": sum(p.numel() for p in _mlp().parameters()),
    }
    for name, parts in samples.items():
        fb_ms = statistics.median(parts["forward+backward"]) * 1e3
        st_ms = statistics.median(parts["optimizer step"]) * 1e3
        out[name] = {"forward_backward_ms": fb_ms, "step_ms": st_ms, "share": st_ms / (fb_ms + st_ms)}
    return out
