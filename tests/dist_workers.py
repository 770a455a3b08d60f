"""Worker functions for tests/test_distributed.py, spawned as real gloo process groups on the
CPU (loopback only). Each writes its results under ``out`` for the parent test to check."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import rmsprop
from rmsprop.backends.fused_cpu import kernel, native

sys.path.insert(0, os.path.dirname(__file__))
from cases import NAMED  # noqa: E402

CONFIGS = {name: NAMED[name] for name in ("plain", "momentum+centered", "eps_in_sqrt+nesterov+wd")}
STEPS = 4


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def batches(steps: int, start: int = 0):
    """The same data on every rank, so distributed training must equal single-process training."""
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)) for _ in range(start + steps)]
    return data[start:]


def train(model, opt, steps: int, start: int = 0) -> None:
    for x, y in batches(steps, start):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _init(rank: int, world: int, port: int) -> None:
    # loopback only: gloo would otherwise pick the interface of the machine's hostname
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)


def _finish() -> None:
    """Both ranks finish every collective, tear the group down, and leave without running the
    interpreter's shutdown: under CPU contention C++ destructors at exit occasionally raced the
    backend's threads and aborted a worker ('terminate called without an active exception')
    after its results were already written. Everything the parent needs is on disk by now."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _count_kernel_calls() -> list[int]:
    """Steps the native kernel ran (local shards reach it as plain tensors)."""
    calls = []
    original = kernel._Call.invoke

    def counting(self, columns, grad_column, n, mode, records, status):
        rc = original(self, columns, grad_column, n, mode, records, status)
        if mode & 0xFF == native.MODE_RUN and rc == native.OK:
            calls.append(n)
        return rc

    kernel._Call.invoke = counting
    return calls


def _shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    _init(rank, world, port)
    calls = _count_kernel_calls()
    results = {}
    for name, kw in CONFIGS.items():
        model = _shard(make_model())
        opt = rmsprop.RMSprop(model.parameters(), **kw)
        train(model, opt, STEPS)
        results[name] = [p.full_tensor() for p in model.parameters()]
        results[name + ":local-numel"] = sum(p.to_local().numel() for p in model.parameters())
    results["kernel_calls"] = len(calls)
    if rank == 0:
        torch.save(results, Path(out) / "fsdp.pt")
    _finish()


def ddp_zero_worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    _init(rank, world, port)
    results = {}
    for name, kw in CONFIGS.items():
        model = DistributedDataParallel(make_model())
        opt = rmsprop.RMSprop(model.parameters(), **kw)
        train(model, opt, STEPS)
        results["ddp:" + name] = [p.detach().clone() for p in model.parameters()]

        model = make_model()
        zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=rmsprop.RMSprop, **kw)
        train(model, zero, STEPS)
        zero.consolidate_state_dict(to=0)
        results["zero:" + name] = [p.detach().clone() for p in model.parameters()]
        if rank == 0:
            results["zero-state:" + name] = zero.state_dict()
    if rank == 0:
        torch.save(results, Path(out) / "ddp_zero.pt")
    _finish()


def dcp_worker(rank: int, world: int, port: int, out: str) -> None:
    """Train, checkpoint with torch.distributed.checkpoint, train on; then a fresh model and
    optimizer load the checkpoint and train the same steps: both must end identical."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _init(rank, world, port)
    kw = CONFIGS["momentum+centered"]
    model = _shard(make_model())
    opt = rmsprop.RMSprop(model.parameters(), **kw)
    train(model, opt, 3)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(Path(out) / "ckpt"))
    train(model, opt, 3, start=3)
    uninterrupted = [p.full_tensor() for p in model.parameters()]

    fresh = _shard(make_model())
    fresh_opt = rmsprop.RMSprop(fresh.parameters(), lr=123.0, **kw)  # lr comes from the checkpoint
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(Path(out) / "ckpt"))
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(fresh, fresh_opt, 3, start=3)
    resumed = [p.full_tensor() for p in fresh.parameters()]
    if rank == 0:
        torch.save({"uninterrupted": uninterrupted, "resumed": resumed}, Path(out) / "dcp.pt")
    _finish()


def reshard_worker(rank: int, world: int, port: int, out: str) -> None:
    """World size 1 loads the checkpoint written by two ranks and trains on."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _init(rank, world, port)
    kw = CONFIGS["momentum+centered"]
    model = make_model()  # not sharded at all
    opt = rmsprop.RMSprop(model.parameters(), **kw)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(Path(out) / "ckpt"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(model, opt, 3, start=3)
    torch.save([p.detach().clone() for p in model.parameters()], Path(out) / "reshard.pt")
    _finish()


LOWBIT = {"lr": 0.01, "momentum": 0.9, "centered": True, "state_dtype": "int8", "int8_min_numel": 0}


def lowbit_worker(rank: int, world: int, port: int, out: str) -> None:
    """int8 state under FSDP2: blocks cut from each rank's local shard; a DCP round trip at the
    same world size resumes exactly; the checkpoint is kept for the resharding test."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _init(rank, world, port)
    calls = _count_kernel_calls()
    model = _shard(make_model())
    opt = rmsprop.RMSprop(model.parameters(), **LOWBIT)
    train(model, opt, 3)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(Path(out) / "ckpt8"))
    train(model, opt, 3, start=3)
    uninterrupted = [p.full_tensor() for p in model.parameters()]
    codes = [s["square_avg" if "square_avg" in s else "grad_var"] for s in opt.state.values()]

    fresh = _shard(make_model())
    fresh_opt = rmsprop.RMSprop(fresh.parameters(), **LOWBIT)
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(Path(out) / "ckpt8"))
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(fresh, fresh_opt, 3, start=3)
    resumed = [p.full_tensor() for p in fresh.parameters()]
    if rank == 0:
        torch.save(
            {"uninterrupted": uninterrupted, "resumed": resumed, "kernel_calls": len(calls),
             "codes_dtypes": [str(c.dtype) for c in codes], "sharded": [type(c).__name__ for c in codes]},
            Path(out) / "lowbit.pt",
        )  # fmt: skip
    _finish()


def lowbit_reshard_worker(rank: int, world: int, port: int, out: str) -> None:
    """World size 1 loads the int8 checkpoint of two ranks: refused with a clear error."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _init(rank, world, port)
    model = make_model()
    opt = rmsprop.RMSprop(model.parameters(), **LOWBIT)
    error = None
    try:
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(Path(out) / "ckpt8"))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    except BaseException as exc:  # noqa: BLE001 (DCP's CheckpointException is a BaseException)
        error = f"{type(exc).__name__}: {exc}"
    torch.save({"error": error}, Path(out) / "lowbit_reshard.pt")
    _finish()
