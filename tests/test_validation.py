"""Bad input raises a clear error naming the problem, where it enters, and nothing is half-applied.

The cases are tests/cases.py's ERROR_CASES; the adversarial ones at the native boundary are the
subprocess probes of test_probes.py.
"""

from __future__ import annotations

import copy
import inspect
import io

import pytest
import torch
from cases import ERROR_CASES, NUMPY_CASES
from helpers import make_params

import rmsprop
from rmsprop import options
from rmsprop.rule import Rule

IDS = [f"{k}-{e.__name__}" for k, e, _ in ERROR_CASES]


@pytest.mark.parametrize("kwargs,error,message", ERROR_CASES, ids=IDS)
def test_bad_options_are_refused_by_the_constructor(kwargs, error, message):
    with pytest.raises(error, match=message):
        rmsprop.RMSprop(make_params(), **kwargs)


@pytest.mark.parametrize("kwargs,error,message", ERROR_CASES, ids=IDS)
def test_bad_param_group_is_refused_and_not_added(kwargs, error, message):
    opt = rmsprop.RMSprop(make_params()[:1])
    with pytest.raises(error, match=message):
        opt.add_param_group({"params": make_params()[1:2], **kwargs})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("kwargs,error,message", ERROR_CASES, ids=IDS)
def test_bad_options_in_a_loaded_state_dict_are_refused_and_change_nothing(kwargs, error, message):
    params = make_params()
    opt = rmsprop.RMSprop(params, momentum=0.5)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    good = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(good)
    bad["param_groups"][0].update(kwargs)
    if kwargs.get("nesterov"):
        bad["param_groups"][0]["momentum"] = 0
    with pytest.raises(error, match=message):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert {k: v for k, v in after["param_groups"][0].items() if k != "params"} == {
        k: v for k, v in good["param_groups"][0].items() if k != "params"
    }


@pytest.mark.parametrize("name", list(NUMPY_CASES))
def test_numpy_scalars_are_accepted_and_stored_as_python_numbers(name):
    params = make_params()
    opt = rmsprop.RMSprop(params, **NUMPY_CASES[name])
    for key in NUMPY_CASES[name]:
        assert type(opt.param_groups[0][key]) in (int, float, bool)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)


def test_the_constructor_signature_is_the_option_table():
    """torch's eleven arguments in torch's order, then the extensions (keyword-only), every
    default the table's: the signature cannot drift from the table."""
    signature = inspect.signature(rmsprop.RMSprop.__init__)
    names = [n for n in signature.parameters if n not in ("self", "params")]
    assert names == [o.name for o in options.OPTIONS]
    for option in options.OPTIONS:
        parameter = signature.parameters[option.name]
        assert parameter.default == option.default, option.name
        keyword_only = parameter.kind is inspect.Parameter.KEYWORD_ONLY
        assert keyword_only == (not option.torch), option.name
    torch_names = [
        n for n in inspect.signature(torch.optim.RMSprop.__init__).parameters if n not in ("self", "params")
    ]
    assert [o.name for o in options.OPTIONS if o.torch] == torch_names
    torch_defaults = {
        n: p.default for n, p in inspect.signature(torch.optim.RMSprop.__init__).parameters.items()
    }
    for option in options.OPTIONS:
        if option.torch:
            assert option.default == torch_defaults[option.name], option.name


def test_rule_fields_are_the_tables_rule_options():
    assert list(Rule.__dataclass_fields__) == [o.name for o in options.RULE_OPTIONS]
    rule = Rule.from_group({**options.DEFAULTS, "momentum": 1, "centered": True})
    assert type(rule.momentum) is float and rule.centered is True


def test_capturable_on_cpu_is_refused_clearly():
    opt = rmsprop.RMSprop(make_params(), capturable=True)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="capturable=True requires"):
        opt.step()
    assert len(opt.state) == 0


def test_foreach_with_differentiable_is_refused():
    p = torch.zeros(3, requires_grad=True)
    opt = rmsprop.RMSprop([p], foreach=True, differentiable=True)
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="differentiable"):
        opt.step()
    assert len(opt.state) == 0
