"""rmsprop.RMSprop under torch.distributed, with real gloo process groups on the CPU.

Every rank sees the same data, so sharded or replicated training must reproduce single-process
training: gradients averaged over identical ranks are the gradients themselves, and the
optimizer's elementwise update on a shard is the update of the whole.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dist_workers import CONFIGS, STEPS, make_model, train

import rmsprop

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="this torch build has no torch.distributed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, out, world=2):
    mp.spawn(fn, args=(world, _free_port(), str(out)), nprocs=world, join=True)


def _single_process(kw, steps=STEPS):
    model = make_model()
    opt = rmsprop.RMSprop(model.parameters(), **kw)
    train(model, opt, steps)
    return [p.detach() for p in model.parameters()]


def _assert_close(got, want):
    # fp32 rounding: the all-reduce/reduce-scatter averages identical gradients, which is exact
    # in binary; the tolerance only allows for a different summation order in the backward.
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    from dist_workers import fsdp_worker

    out = tmp_path_factory.mktemp("fsdp")
    _spawn(fsdp_worker, out)
    return torch.load(out / "fsdp.pt", weights_only=False)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fsdp2_matches_single_process(fsdp, name):
    _assert_close(fsdp[name], _single_process(CONFIGS[name]))
    total = sum(p.numel() for p in make_model().parameters())
    assert fsdp[name + ":local-numel"] < total  # really sharded


def test_fsdp2_runs_the_fused_kernel_on_local_shards(fsdp):
    assert fsdp["kernel_calls"] > 0


@pytest.fixture(scope="module")
def ddp_zero(tmp_path_factory):
    from dist_workers import ddp_zero_worker

    out = tmp_path_factory.mktemp("ddp")
    _spawn(ddp_zero_worker, out)
    return torch.load(out / "ddp_zero.pt", weights_only=False)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ddp_matches_single_process(ddp_zero, name):
    _assert_close(ddp_zero["ddp:" + name], _single_process(CONFIGS[name]))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_zero_redundancy_optimizer_matches_single_process(ddp_zero, name):
    _assert_close(ddp_zero["zero:" + name], _single_process(CONFIGS[name]))
    state = ddp_zero["zero-state:" + name]
    assert state["state"] and all("square_avg" in s for s in state["state"].values())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from dist_workers import dcp_worker

    out = tmp_path_factory.mktemp("dcp")
    _spawn(dcp_worker, out)
    return out


def test_dcp_round_trip_resumes_exactly(checkpoint):
    result = torch.load(checkpoint / "dcp.pt", weights_only=False)
    for a, b in zip(result["uninterrupted"], result["resumed"], strict=True):
        assert torch.equal(a, b)


def test_dcp_reshards_from_two_ranks_to_one(checkpoint):
    from dist_workers import reshard_worker

    _spawn(reshard_worker, checkpoint, world=1)
    got = torch.load(checkpoint / "reshard.pt", weights_only=False)
    _assert_close(got, _single_process(CONFIGS["momentum+centered"], steps=6))


@pytest.fixture(scope="module")
def lowbit(tmp_path_factory):
    from dist_workers import lowbit_worker

    out = tmp_path_factory.mktemp("lowbit")
    _spawn(lowbit_worker, out)
    return out


def test_fsdp2_int8_state_is_sharded_and_resumes_exactly_through_dcp(lowbit):
    """int8 state under FSDP2: codes and scales are DTensors (blocks cut from each rank's local
    shard), the fused kernel steps the local shards, and a DCP round trip at the same world
    size resumes bit for bit."""
    result = torch.load(lowbit / "lowbit.pt", weights_only=False)
    assert result["codes_dtypes"] == ["torch.uint8"] * 4 and result["sharded"] == ["DTensor"] * 4
    assert result["kernel_calls"] > 0
    for a, b in zip(result["uninterrupted"], result["resumed"], strict=True):
        assert torch.equal(a, b)


def test_resharding_int8_state_is_refused(lowbit):
    """Blocks belong to a rank's shard: at another world size the scales have another shape, and
    DCP refuses the load naming the scale (documented: reshard with bf16 or fp32 state)."""
    from dist_workers import lowbit_reshard_worker

    _spawn(lowbit_reshard_worker, lowbit, world=1)
    error = torch.load(lowbit / "lowbit_reshard.pt", weights_only=False)["error"]
    assert error is not None and "_scale" in error and "mismatch" in error, error
