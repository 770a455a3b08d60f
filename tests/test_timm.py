"""rmsprop.integrations.timm against timm's real registry, factory and name parsing.

timm's registry is imported from timm's own files with stand-ins for three package __init__
files that would import torchvision (see tests/timm_standin.py for exactly what is and is not
run). `create_optimizer_v2`, `list_optimizers`, `get_optimizer_class`, the weight-decay parameter
groups, the `lookahead_` prefix and `RMSpropTF` are timm's code, unchanged.
"""

from __future__ import annotations

import functools
import logging
import sys

import pytest
import timm_standin
import torch
from torch import nn

import rmsprop
from rmsprop.integrations.timm import DEFAULT_PREFIX, register_timm, timm_names


@pytest.fixture(scope="module")
def timm_optim():
    with timm_standin.installed() as module:
        yield module


@pytest.fixture(scope="module")
def names(timm_optim):
    return register_timm()


def _model(dtype=torch.float32, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2)).to(dtype)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 10) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen, dtype=dtype)
        y = torch.randn(16, 2, generator=gen, dtype=dtype)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_every_name_survives_timms_name_parsing(timm_optim, names):
    assert names == list(timm_names()) and names[0] == DEFAULT_PREFIX
    assert {n.removeprefix(DEFAULT_PREFIX) for n in names[1:]} == set(rmsprop.PRESETS)
    for name in names:
        assert name.lower().split("_")[-1] == name  # what create_optimizer looks up
    assert timm_optim.list_optimizers(f"{DEFAULT_PREFIX}*") == sorted(names)
    assert "rmsprop" in timm_optim.list_optimizers()  # timm's own torch.optim.RMSprop still there


@pytest.mark.parametrize("preset", [None, *rmsprop.PRESETS])
def test_create_optimizer_v2_builds_the_preset_with_timms_groups(timm_optim, names, preset):
    name = DEFAULT_PREFIX + (preset or "")
    model = _model()
    opt = timm_optim.create_optimizer_v2(model, name, lr=0.05, weight_decay=0.01)
    assert type(opt) is rmsprop.RMSprop
    expected = rmsprop.from_preset(preset, _model().parameters()) if preset else rmsprop.RMSprop(
        _model().parameters()
    )
    decay, no_decay = sorted(opt.param_groups, key=lambda g: -g["weight_decay"])
    # timm's param_groups_weight_decay: matrices decayed, biases and norm weights not.
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    for key, value in expected.defaults.items():
        if key in ("lr", "momentum", "weight_decay"):
            continue
        assert decay[key] == value and no_decay[key] == value, key
    # timm's default momentum (0.9), unless the preset pins one (dqn: none, as DeepMind's DQN)
    pinned = rmsprop.PRESETS[preset].options.get("momentum") if preset else None
    assert decay["lr"] == 0.05 and decay["momentum"] == (0.9 if pinned is None else pinned)


def test_the_timm_preset_trains_like_timms_own_rmsproptf(timm_optim, names):
    """Same model, same batches, both built by create_optimizer_v2; float64 so that only the
    documented EMA rounding deviation (tests/test_presets.py) separates them."""
    kwargs = {"lr": 0.01, "weight_decay": 1e-4}
    ours = _train(m := _model(torch.float64), timm_optim.create_optimizer_v2(m, "rmspropxtimm", **kwargs))
    theirs = _train(m := _model(torch.float64), timm_optim.create_optimizer_v2(m, "rmsproptf", **kwargs))
    start = [p.detach() for p in _model(torch.float64).parameters()]
    for a, b, p0 in zip(ours, theirs, start, strict=True):
        assert not torch.equal(a, p0)  # it trained
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_lookahead_prefix_wraps_it(timm_optim, names):
    model = _model()
    opt = timm_optim.create_optimizer_v2(model, "lookahead_rmspropxkeras", lr=1e-3, momentum=0)
    assert type(opt).__name__ == "Lookahead" and type(opt._base_optimizer) is rmsprop.RMSprop
    assert opt._base_optimizer.defaults["eps_in_sqrt"] and opt._base_optimizer.defaults["momentum"] == 0
    before = [p.detach().clone() for p in model.parameters()]
    after = _train(model, opt, steps=6)  # lookahead syncs every 6 steps by default
    assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_get_optimizer_class_binds_the_preset(timm_optim, names):
    cls = timm_optim.get_optimizer_class("rmspropxoptax")
    assert isinstance(cls, functools.partial) and cls.func is rmsprop.RMSprop
    assert cls.keywords == dict(rmsprop.PRESETS["optax"].options)
    assert timm_optim.get_optimizer_class(DEFAULT_PREFIX) is rmsprop.RMSprop  # no defaults to bind


def test_registering_again_changes_nothing_and_logs_nothing(timm_optim, names, caplog):
    registry = timm_optim._optim_factory.default_registry
    before = {n: registry.get_optimizer_info(n) for n in names}
    with caplog.at_level(logging.WARNING):
        assert register_timm() == names
    assert not caplog.records  # timm warns when a name is overwritten
    assert {n: registry.get_optimizer_info(n) for n in names} == before


def test_taken_names_and_unparsable_prefixes_are_refused_whole(timm_optim):
    registry = timm_optim.OptimizerRegistry()
    registry.register(timm_optim.OptimInfo(name="rmspropseed", opt_class=torch.optim.SGD))
    with pytest.raises(ValueError, match="already has an optimizer named 'rmspropseed'"):
        register_timm(registry, prefix="rmsprop")
    assert registry.list_optimizers() == ["rmspropseed"]  # nothing half-registered
    for bad in ("rms_x", "RMSX", "x-y", "", "1x"):
        with pytest.raises(ValueError, match="lower-case letters and digits"):
            register_timm(registry, prefix=bad)
    assert register_timm(registry, prefix="rmsx") == list(timm_names("rmsx"))
    assert set(registry.list_optimizers()) == {"rmspropseed", *timm_names("rmsx")}


def test_without_timm_the_error_says_what_to_install(monkeypatch):
    for name in ("timm", "timm.optim"):  # as if not installed (None in sys.modules: ImportError)
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install timm"):
        register_timm()
