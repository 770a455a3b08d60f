"""Side by side with bitsandbytes' RMSprop8bit, where it is installed (not a dependency of the
library or its tests): step time on 10 x 1M fp32 parameters, interleaved round-robin as in
`rmsprop bench`, and accuracy against the float64 reference after a fixed gradient sequence.

    pip install bitsandbytes && python scripts/compare_bitsandbytes.py

Prints one JSON object. bitsandbytes 0.50 runs its 8-bit optimizers on the CPU.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

import rmsprop
from rmsprop.reference import ReferenceRMSprop


def _params(n_tensors=10, numel=1_000_000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(numel, generator=gen).requires_grad_() for _ in range(n_tensors)]
    for p in ps:
        p.grad = torch.randn(numel, generator=gen)
    return ps


def step_times(factories: dict, repeats: int = 7, per: int = 3) -> dict:
    steps = {}
    for name, make in factories.items():
        opt = make(_params())
        opt.step()
        steps[name] = opt.step
    samples = {name: [] for name in factories}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(per):
                step()
            samples[name].append((time.perf_counter() - start) / per)
    base = statistics.median(samples["rmsprop fp32 state, fused"])
    return {
        name: {"step_ms": 1e3 * statistics.median(s), "ratio_to_fp32_state": statistics.median(s) / base}
        for name, s in samples.items()
    }


def accuracy(factories: dict, options: dict, steps: int = 200, numel: int = 65536) -> dict:
    """Relative error of the parameter after ``steps`` steps against the float64 reference,
    max over elements of |p - ref| / max|ref - p0| (the distance travelled)."""
    gen = torch.Generator().manual_seed(1)
    p0 = torch.randn(numel, generator=gen)
    mag = 10.0 ** (-3 * torch.rand(numel, generator=gen))
    grads = [mag * torch.randn(numel, generator=gen) for _ in range(steps)]
    ref = ReferenceRMSprop(p0.double().numpy(), **options)
    for g in grads:
        ref.step(g.double().numpy())
    want = torch.from_numpy(ref.param)
    travelled = (want - p0.double()).abs().max().item()
    out = {}
    for name, make in factories.items():
        p = p0.clone().requires_grad_()
        opt = make([p], options)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        err = (p.detach().double() - want).abs()
        out[name] = {"max_error_over_travel": err.max().item() / travelled,
                     "mean_error_over_travel": err.mean().item() / travelled}  # fmt: skip
    return out


def main() -> None:
    import bitsandbytes as bnb

    lr = 1e-3
    timing = {
        "rmsprop fp32 state, fused": lambda ps: rmsprop.RMSprop(ps, lr=lr, fused=True),
        "rmsprop int8 state, fused": lambda ps: rmsprop.RMSprop(ps, lr=lr, fused=True, state_dtype="int8"),
        "rmsprop bf16 state, fused": lambda ps: rmsprop.RMSprop(ps, lr=lr, fused=True, state_dtype=torch.bfloat16),
        "bitsandbytes RMSprop8bit": lambda ps: bnb.optim.RMSprop8bit(ps, lr=lr),
        "bitsandbytes RMSprop32bit": lambda ps: bnb.optim.RMSprop32bit(ps, lr=lr),
        "torch foreach": lambda ps: torch.optim.RMSprop(ps, lr=lr, foreach=True),
    }
    result = {"bitsandbytes": bnb.__version__, "torch_threads": torch.get_num_threads(), "step_time": step_times(timing)}
    factories = {
        "rmsprop fp32 state": lambda ps, o: rmsprop.RMSprop(ps, **o),
        "rmsprop int8 state": lambda ps, o: rmsprop.RMSprop(ps, state_dtype="int8", **o),
        "rmsprop bf16 state": lambda ps, o: rmsprop.RMSprop(ps, state_dtype=torch.bfloat16, **o),
        "bitsandbytes RMSprop8bit": lambda ps, o: bnb.optim.RMSprop8bit(ps, min_8bit_size=0, **o),
    }
    result["accuracy_plain"] = accuracy(factories, {"lr": lr, "alpha": 0.99})
    result["accuracy_momentum_0.9"] = accuracy(factories, {"lr": lr, "alpha": 0.99, "momentum": 0.9})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
