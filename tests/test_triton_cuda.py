"""The Triton kernel on a real GPU: what only a GPU can show — CUDA-graph capture and replay, no
host synchronisation in a step, one kernel launch per group, large tensors compiled.

Collected only with ``RMSPROP_TRITON_DEVICE=cuda`` (``scripts/gpu_check.sh``), or with
``RMSPROP_GPU_DRY_RUN=1`` (``scripts/gpu_check.sh --dry-run``), which runs the same code on CPU
tensors through the interpreter with stand-ins for what the CPU lacks (no capture: the step
itself; no sync detector; launches counted by the backend instead of the profiler): a check of
these tests' own code, not of the GPU.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch
from cases import NAMED

import rmsprop
from rmsprop.backends import fused_triton
from rmsprop.backends.fused_triton import plan

DRY = os.environ.get("RMSPROP_GPU_DRY_RUN") == "1"
DEVICE = "cpu" if DRY else "cuda"


@pytest.fixture(autouse=True)
def _route(monkeypatch):
    monkeypatch.setattr(plan, "DEVICE_TYPES", {"cuda", DEVICE})


def _params(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device=DEVICE, dtype=dtype).requires_grad_() for s in shapes]


def _twin(params):
    return [p.detach().clone().requires_grad_() for p in params]


def _capture(step):
    """The step captured in a CUDA graph after a warm-up on a side stream (torch's recipe);
    returns the replay. Dry run: one step for the warm-up, then the step itself."""
    if DRY:
        step()
        return step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up: builds the tables and compiles the kernel outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    replay = graph.replay
    replay.graph = graph  # type: ignore[attr-defined]
    return replay


@contextmanager
def no_sync():
    """Any synchronising CUDA call inside raises (torch's sync debug mode)."""
    if DRY:
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _kernels_in(fn) -> list[str]:
    """Names of the GPU kernels ``fn`` launches (dry run: the backend's launches)."""
    if DRY:
        names = []
        original = fused_triton._launch

        def spy(*args, **kwargs):
            names.append("rmsprop_kernel")
            return original(*args, **kwargs)

        fused_triton._launch = spy
        try:
            fn()
        finally:
            fused_triton._launch = original
        return names
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [
        e.name
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and "emcpy" not in e.name
    ]


def test_triton_cuda_graph_replays_the_step():
    """A capturable step captured once and replayed: each replay reads the static gradients and
    the device lr as they are then (both changed in place), counts its steps on the device, and
    equals an eager twin bit for bit."""
    options = {**NAMED["full"], "eps_in_sqrt": True}
    params = _params([(1000,), (33, 7), (9000,)])
    twins = _twin(params)
    for p in params + twins:
        p.grad = torch.zeros_like(p)
    lr, twin_lr = torch.tensor(0.01, device=DEVICE), torch.tensor(0.01, device=DEVICE)
    opt = rmsprop.RMSprop(params, lr=lr, capturable=True, **options)
    twin = rmsprop.RMSprop(twins, lr=twin_lr, capturable=True, **options)
    gen = torch.Generator().manual_seed(1)

    def feed(t):
        for p, q in zip(params, twins, strict=True):
            g = torch.randn(p.shape, generator=gen).to(DEVICE)
            p.grad.copy_(g)
            q.grad.copy_(g)
        lr.fill_(0.01 / (t + 1))
        twin_lr.fill_(0.01 / (t + 1))

    feed(0)
    replay = _capture(opt.step)  # the warm-up and the capture are steps 1 (and 2: capture runs nothing)
    twin.step()
    for t in range(1, 6):
        feed(t)
        replay()
        twin.step()
    for p, q in zip(params, twins, strict=True):
        assert torch.equal(p, q)
        for key in opt.state[p]:
            assert torch.equal(opt.state[p][key], twin.state[q][key]), key
    assert all(opt.state[p]["step"].item() == 6 for p in params)


def test_triton_cuda_steps_make_no_host_synchronisation():
    """Steady-state steps with fused=True (counters on the device), GradScaler's tensors and a
    device lr; and the default (counters on the CPU, bias correction from the host): no call
    synchronises with the GPU."""
    params = _params([(1000,), (5, 7)])
    opt = rmsprop.RMSprop(params, fused=True, lr=torch.tensor(0.01, device=DEVICE), **NAMED["full"])
    default = _params([(300,)], seed=1)
    opt2 = rmsprop.RMSprop(default, bias_correction=True, momentum=0.9)
    for p in params + default:
        p.grad = torch.randn_like(p)
    opt.step()
    opt2.step()  # first steps build the tables
    opt.grad_scale = torch.tensor(4.0, device=DEVICE)
    opt.found_inf = torch.tensor(0.0, device=DEVICE)
    with no_sync():
        for _ in range(3):
            for p in params + default:
                p.grad = torch.randn_like(p)
            opt.step()
            opt2.step()
    assert all(opt.state[p]["step"].item() == 4 for p in params)


def test_triton_cuda_one_kernel_launch_per_group():
    """Ten tensors, momentum and centered: one kernel a step (no foreach for the counters, no
    copies when the gradients stay where they were); torch's foreach launches dozens."""
    params = _params([(100_000,)] * 10)
    for p in params:
        p.grad = torch.randn_like(p)
    opt = rmsprop.RMSprop(params, fused=True, momentum=0.9, centered=True)
    opt.step()
    kernels = _kernels_in(opt.step)
    assert len(kernels) == 1 and "rmsprop_kernel" in kernels[0], kernels
    theirs = torch.optim.RMSprop(_twin(params), foreach=True, momentum=0.9, centered=True)
    for p in theirs.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    theirs.step()
    if not DRY:
        assert len(_kernels_in(theirs.step)) > 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_triton_cuda_large_tensor_equals_the_cpu_kernel(dtype):
    """One tensor of 2^22 + 5 elements (513 programs, a tail), compiled: bit for bit the CPU
    kernel's result."""
    n = 2**22 + 5 if not DRY else 2**12 + 5
    options = {"momentum": 0.9, "centered": True, "weight_decay": 0.01}
    (p,) = _params([(n,)], dtype=dtype)
    q = p.detach().cpu().clone().requires_grad_()
    opt = rmsprop.RMSprop([p], fused=True, **options)
    gen = torch.Generator().manual_seed(5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plan, "DEVICE_TYPES", {"cuda"})  # the CPU tensors take the CPU kernel
        ref = rmsprop.RMSprop([q], fused=True, **options)
    for _ in range(3):
        g = torch.randn(n, generator=gen).to(dtype)
        p.grad, q.grad = g.to(DEVICE), g.clone()
        opt.step()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(plan, "DEVICE_TYPES", {"cuda"})
            ref.step()
    assert torch.equal(p.detach().cpu(), q.detach())
    for key in ("square_avg", "grad_avg", "momentum_buffer"):
        assert torch.equal(opt.state[p][key].cpu(), ref.state[q][key]), key


def test_triton_cuda_graph_capture_keeps_its_tables_alive():
    """Tensors replaced after a capture rebuild the tables for eager steps; the captured graph
    still reads the old ones, which the cache keeps alive (replaying it must not touch freed
    memory: the replay still updates the tensors it captured)."""
    params = _params([(500,)])
    params[0].grad = torch.randn_like(params[0])
    opt = rmsprop.RMSprop(params, capturable=True, lr=torch.tensor(0.01, device=DEVICE))
    replay = _capture(opt.step)
    old = params[0].detach()
    kept = len(opt._fused_cache.others["triton"].captured)
    params[0].data = params[0].data.clone()  # eager steps now use a new table
    params[0].grad = torch.randn_like(params[0])
    opt.step()
    before = old.clone()
    replay()
    if not DRY:
        assert kept > 0
        assert not torch.equal(old, before)  # the replay updated the captured tensor
