"""Bad input raises a clear error naming the problem, and nothing is half-applied."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_params

import rmsprop

BAD_HYPERPARAMETERS = [
    ({"lr": -1e-3}, "learning rate"),
    ({"lr": math.nan}, "learning rate"),
    ({"lr": torch.tensor([0.1, 0.2])}, "Tensor lr must be 1-element"),
    ({"eps": -1e-8}, "epsilon"),
    ({"eps": math.nan}, "epsilon"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"weight_decay": math.nan}, "weight_decay"),
    ({"momentum": -1.0}, "Invalid momentum value: -1.0"),  # torch's own message
    ({"momentum": math.nan}, "momentum"),
    ({"initial_square_avg": -1.0}, "initial_square_avg"),
    ({"initial_square_avg": math.nan}, "initial_square_avg"),
    ({"alpha": -0.1}, "alpha"),
    ({"alpha": 1.5}, "alpha"),
    ({"alpha": math.nan}, "alpha"),
    ({"nesterov": True}, "nesterov=True requires momentum > 0"),
    ({"bias_correction": True, "alpha": 1.0}, "bias_correction=True requires alpha < 1"),
]


@pytest.mark.parametrize("kwargs,message", BAD_HYPERPARAMETERS, ids=[str(k) for k, _ in BAD_HYPERPARAMETERS])
def test_bad_hyperparameters_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rmsprop.RMSprop(make_params(), **kwargs)


@pytest.mark.parametrize(
    "kwargs,message", BAD_HYPERPARAMETERS[:6], ids=[str(k) for k, _ in BAD_HYPERPARAMETERS[:6]]
)
def test_bad_param_group_is_refused_and_not_added(kwargs, message):
    opt = rmsprop.RMSprop(make_params()[:1])
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": make_params()[1:2], **kwargs})
    assert len(opt.param_groups) == 1


def test_sparse_gradient_raises_before_anything_changes():
    dense = make_params()
    sparse_param = torch.zeros(5, 3, requires_grad=True)
    opt = rmsprop.RMSprop([{"params": dense}, {"params": [sparse_param]}], momentum=0.9)
    for p in dense:
        p.grad = torch.ones_like(p)
    sparse_param.grad = torch.sparse_coo_tensor([[0, 2]], torch.ones(2, 3), (5, 3))
    before = [p.detach().clone() for p in dense]
    with pytest.raises(RuntimeError, match="sparse gradients.*nothing was updated"):
        opt.step()
    # the first group was not updated even though only the second group is bad
    assert all(torch.equal(a, b) for a, b in zip(before, dense, strict=True))
    assert len(opt.state) == 0


def test_capturable_on_cpu_is_refused_clearly():
    opt = rmsprop.RMSprop(make_params(), capturable=True)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="capturable=True requires"):
        opt.step()


def test_foreach_with_differentiable_is_refused():
    p = torch.zeros(3, requires_grad=True)
    opt = rmsprop.RMSprop([p], foreach=True, differentiable=True)
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="differentiable"):
        opt.step()
