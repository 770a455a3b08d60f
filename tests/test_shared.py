"""RMSprop.share_memory(): the state made now, in shared memory, stepped by spawned workers.

Two processes started with torch.multiprocessing's spawn receive a model and its optimizers whose
tensors are all in shared memory, and take turns stepping them (A3C's shared RMSProp, made
deterministic by the turns). The parent, which never steps, then holds exactly what one process
stepping the same gradients in the same order holds: the workers updated one set of parameters
and one set of statistics. The default optimizer runs the fused kernel on that memory.
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from cases import NAMED
from shared_workers import SHAPES, STEPS_PER_WORKER, grads_for, take_turns

import rmsprop

OPTIONS = {
    "fused default, momentum+centered": {**NAMED["momentum+centered"]},
    "foreach, everything but bias correction": {
        **{k: v for k, v in NAMED["everything"].items() if k != "bias_correction"},
        "fused": False,
        "foreach": True,
    },
    "a3c preset": {**rmsprop.PRESETS["a3c"].options},
}


def _params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]


@pytest.mark.parametrize("name", list(OPTIONS))
def test_share_memory_creates_the_first_steps_state_without_stepping(name):
    params = _params()
    before = [p.detach().clone() for p in params]
    opt = rmsprop.RMSprop(params, **OPTIONS[name])
    assert opt.share_memory() is opt
    twin_params = _params()
    twin = rmsprop.RMSprop(twin_params, **OPTIONS[name])
    for p, t in zip(params, twin_params, strict=True):
        twin.state[t] = twin._new_state(twin.param_groups[0], t, {})  # what a first step creates
        state = opt.state[p]
        assert set(state) == set(twin.state[t])
        for key, value in state.items():
            assert value.is_shared(), key
            assert torch.equal(value, twin.state[t][key]), key
        assert state["step"].item() == 0
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    # and the first step afterwards is the first step of an optimizer that never shared
    plain_params = _params()
    plain = rmsprop.RMSprop(plain_params, **OPTIONS[name])
    for o, ps in ((opt, params), (plain, plain_params)):
        for p, g in zip(ps, grads_for(0, ps), strict=True):
            p.grad = g
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(params, plain_params, strict=True))


def test_share_memory_keeps_existing_state_and_the_shared_tensors():
    params = _params()
    opt = rmsprop.RMSprop(params, momentum=0.9)
    for p, g in zip(params, grads_for(0, params), strict=True):
        p.grad = g
    opt.step()
    values = {k: v.clone() for k, v in opt.state[params[0]].items()}
    opt.share_memory()
    state = opt.state[params[0]]
    assert all(torch.equal(state[k], v) and state[k].is_shared() for k, v in values.items())
    tensors = {k: v for k, v in state.items()}
    opt.share_memory()  # again: the same shared tensors
    assert all(opt.state[params[0]][k] is t for k, t in tensors.items())


def test_two_spawned_workers_step_one_shared_optimizer():
    """Both workers' steps land in the parent's parameters and statistics, bit for bit what a
    single process stepping the same gradients in the same order gets (with the fused kernel,
    and with foreach). The guard, in the same run: an optimizer over shared parameters whose
    state was not made before the workers started gets private state in each worker, and the
    parent's stays empty (the pitfall share_memory() exists for)."""
    world = 2
    params = {name: _params() for name in OPTIONS}
    optimizers = []
    for name, ps in params.items():
        for p in ps:
            p.share_memory_()
        optimizers.append(rmsprop.RMSprop(ps, **OPTIONS[name]).share_memory())
    unshared_params = _params()
    for p in unshared_params:
        p.share_memory_()
    unshared = rmsprop.RMSprop(unshared_params, momentum=0.9)
    ctx = mp.get_context("spawn")
    turn = ctx.Value("i", 0)
    workers = [
        ctx.Process(target=take_turns, args=(rank, world, [*optimizers, unshared], turn)) for rank in range(world)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    assert [w.exitcode for w in workers] == [0] * world
    assert turn.value == world * STEPS_PER_WORKER

    for name, opt in zip(OPTIONS, optimizers, strict=True):
        replay_params = _params()
        replay = rmsprop.RMSprop(replay_params, **OPTIONS[name])
        for t in range(world * STEPS_PER_WORKER):
            for p, g in zip(replay_params, grads_for(t, replay_params), strict=True):
                p.grad = g
            replay.step()
        for p, r in zip(params[name], replay_params, strict=True):
            assert torch.equal(p, r), name
            for key, value in replay.state[r].items():
                assert torch.equal(opt.state[p][key], value), (name, key)
        assert opt.state[params[name][0]]["step"].item() == world * STEPS_PER_WORKER

    assert len(unshared.state) == 0  # each worker kept its own statistics
    assert not any(torch.equal(p, q) for p, q in zip(unshared_params, _params(), strict=True))
