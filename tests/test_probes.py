"""Every defect found at the native boundary, as a regression test run in a subprocess.

Each probe is a small script that sets up what a careless or adversarial user does and asserts
what must happen instead: a clear error with nothing changed, or the right numbers. Running it
in its own process (a child forked from one interpreter that has imported torch and the library
once, so that each probe does not pay seconds of imports) makes a crash (a write past a
tensor's end, a NULL dereference, a heap overflow) a test failure instead of the end of the test run. ``scripts/sanitize.sh`` runs this
file against the kernel built with AddressSanitizer and UBSan, which also catches the reads and
writes out of bounds that do not crash.

The numbers in the probe names refer to the list in the "trust the fast path" issue.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest

PRELUDE = """
import copy, math, warnings
import numpy as np
import torch
import rmsprop
import rmsprop.functional as F
from rmsprop.rule import Rule

def refused(fn, exc=Exception, match=""):
    try:
        fn()
    except exc as e:
        assert match in str(e), f"message {str(e)!r} lacks {match!r}"
        return str(e)
    raise AssertionError("no error raised")

def snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params if p in opt.state})

def unchanged(opt, params, snap):
    values, states = snap
    assert all(torch.equal(a, b) for a, b in zip(values, params)), "a parameter changed"
    for p in params:
        if id(p) in states:
            for k, v in states[id(p)].items():
                assert torch.equal(opt.state[p][k], v), f"state {k} changed"

def trained(n=1000, steps=1, **kw):
    p = torch.randn(n, requires_grad=True)
    opt = rmsprop.RMSprop([p], **kw)
    for _ in range(steps):
        p.grad = torch.randn(n)
        opt.step()
    return p, opt
"""

PROBES: dict[str, str] = {
    # 1. An undersized state tensor: the next step must not write past the view.
    "1-undersized-state": """
for kw in ({}, {"fused": True}, {"foreach": True}, {"foreach": False}):
    p, opt = trained(**kw)
    buf = torch.zeros(1000)
    opt.state[p]["square_avg"] = buf[:10]
    p.grad = torch.randn(1000)
    snap = snapshot(opt, [p])
    refused(opt.step, RuntimeError, "square_avg")
    assert torch.count_nonzero(buf[10:]) == 0, "wrote past the end of the view"
    unchanged(opt, [p], snap)
""",
    # 2. An undersized gradient, also with GradScaler.
    "2-undersized-grad": """
for kw in ({}, {"fused": True}, {"foreach": True}):
    p, opt = trained(**kw)
    p.grad = torch.randn(1000)
    big = torch.ones(2000)
    p.grad.data = big[:10]
    snap = snapshot(opt, [p])
    refused(opt.step, RuntimeError, "gradient")
    unchanged(opt, [p], snap)
    assert torch.equal(big, torch.ones(2000))
# with GradScaler, fused=True: grads are unscaled in place by the kernel
p, opt = trained(fused=True)
scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
scaler.scale(p.sum())  # initialises the scale, as scaling a loss does
p.grad = torch.randn(1000)
big = torch.ones(2000)
p.grad.data = big[:10]
snap = snapshot(opt, [p])
refused(lambda: scaler.step(opt), RuntimeError, "gradient")
unchanged(opt, [p], snap)
assert torch.equal(big, torch.ones(2000)), "the gradient's buffer was written"
""",
    # 3. The cached plan must follow a state tensor whose storage was replaced.
    "3-state-storage-replaced": """
for key in ("square_avg", "step", "momentum_buffer"):
    torch.manual_seed(0)
    p, opt = trained(steps=2, momentum=0.9)
    q = p.detach().clone().requires_grad_()
    ref = rmsprop.RMSprop([q], momentum=0.9, foreach=True)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))  # state_dict() shares the tensors
    t = opt.state[p][key]
    t.data = t.detach().clone()
    old = {k: v.clone() for k, v in opt.state[p].items()}
    g = torch.randn(1000)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step(); ref.step()
    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert opt.state[p]["step"].item() == 3
    assert not torch.equal(opt.state[p]["square_avg"], old["square_avg"])
""",
    # 4. The public functional API with the lists the rule needs missing.
    "4-functional-missing-lists": """
p = torch.randn(100); g = torch.randn(100); v = torch.zeros(100); s = torch.zeros(())
for backend in ({"fused": True}, {"foreach": True}, {"foreach": False}, {}):
    refused(lambda: F.rmsprop([p], [g], [v], [], [], [s], lr=0.01,
            rule=Rule(alpha=0.9, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=True, maximize=False,
                      eps_in_sqrt=False, nesterov=False, decoupled_weight_decay=False, lr_in_momentum=False,
                      bias_correction=False), **backend), ValueError, "grad_avgs")
    refused(lambda: F.rmsprop([p], [g], [v], [], [], [s], lr=0.01,
            rule=Rule(alpha=0.9, eps=1e-8, weight_decay=0.0, momentum=0.9, centered=False, maximize=False,
                      eps_in_sqrt=False, nesterov=False, decoupled_weight_decay=False, lr_in_momentum=False,
                      bias_correction=False), **backend), ValueError, "momentum_buffers")
    refused(lambda: F.rmsprop([p], [g], [], [], [], [s], lr=0.01, rule=Rule.from_group(rmsprop.options.DEFAULTS),
            **backend), ValueError, "square_avgs")
    assert torch.count_nonzero(v) == 0 and s.item() == 0
""",
    # 5. A one-element lr tensor of any shape, on every path, bit-identical to torch.
    "5-lr-tensor-shapes": """
for shape in ((), (1,), (1, 1)):
    for foreach in (False, True):
        kw = dict(momentum=0.9, centered=True, foreach=foreach)
        torch.manual_seed(0)
        a = torch.randn(20, requires_grad=True); b = a.detach().clone().requires_grad_()
        ours = rmsprop.RMSprop([a], lr=torch.full(shape, 1e-3), **kw)
        theirs = torch.optim.RMSprop([b], lr=torch.full(shape, 1e-3), **kw)
        for _ in range(3):
            g = torch.randn(20); a.grad, b.grad = g.clone(), g.clone()
            ours.step(); theirs.step()
        assert torch.equal(a, b), (shape, foreach)
    a = torch.randn(20, requires_grad=True); a.grad = torch.randn(20)
    fused = rmsprop.RMSprop([a], lr=torch.full(shape, 1e-3), fused=True)
    fused.step()
""",
    # 6. The AMP flag: set only where the step consumes grad_scale / found_inf.
    "6-amp-flag": """
p = torch.randn(3, requires_grad=True)
assert rmsprop.RMSprop([p])._step_supports_amp_scaling is False
assert rmsprop.RMSprop([p], fused=False)._step_supports_amp_scaling is False
assert rmsprop.RMSprop([p], fused=True)._step_supports_amp_scaling is True
# the default with GradScaler: unscale_ then clip then step, as Lightning does
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
opt = rmsprop.RMSprop(model.parameters())
scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
scaler.scale(model(torch.randn(8, 4)).pow(2).mean()).backward()
scaler.unscale_(opt)
torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
scaler.step(opt)
scaler.update()
""",
    # 11a. A parameter replaced by a larger tensor between steps.
    "11-param-grown": """
for kw in ({}, {"fused": True}, {"foreach": True}):
    p, opt = trained(**kw)
    p.data = torch.randn(4096)
    p.grad = torch.randn(4096)
    before = p.detach().clone()
    refused(opt.step, RuntimeError, "")
    assert torch.equal(p, before)
""",
    # 11b. The fused step bumps version counters, so autograd notices a saved parameter changed.
    "11-version-counters": """
for kw in ({}, {"fused": True}, {"foreach": True}):
    p = torch.randn(1000, requires_grad=True)
    opt = rmsprop.RMSprop([p], momentum=0.9, **kw)
    loss = (p * p).sum()          # saves p for the backward
    p.grad = torch.randn(1000)
    v0 = p._version
    opt.step()
    assert p._version > v0, kw
    for key, t in opt.state[p].items():
        assert t._version > 0, (key, kw)
    refused(loss.backward, RuntimeError, "modified by an inplace operation")
""",
    # 11b'. The kernel bumps the counters itself (through torch's autograd functions): exactly
    # once a step, each tensor the step writes and nothing else; the same with Python bumping
    # them (a torch without those functions); nothing on a step skipped for an inf; no crash on
    # inference tensors, which have no counter (torch raises, in C++, for one outside inference
    # mode: the kernel must never ask it to).
    "11-kernel-version-bumps": """
from rmsprop.backends.fused_cpu import native
assert native.BUMPS_VERSIONS, "torch 2.13 exports both functions and the load-time probe accepts them"
def versions(opt, ps):
    return [(p._version, p.grad._version, sorted((k, v._version) for k, v in opt.state[p].items()
            if isinstance(v, torch.Tensor))) for p in ps]
def bumped(before, after, expect):
    for (p0, g0, s0), (p1, g1, s1) in zip(before, after):
        assert p1 - p0 == expect and g1 == g0, (before, after)
        assert [k for k, _ in s0] == [k for k, _ in s1] and all(b - a == expect for (_, a), (_, b) in zip(s0, s1)), (s0, s1)
results = {}
for kernel_bumps in (True, False):
    native.BUMPS_VERSIONS = kernel_bumps
    for kw in ({}, {"momentum": 0.9, "centered": True}, {"state_dtype": "int8", "momentum": 0.9, "centered": True},
               {"state_dtype": torch.bfloat16, "momentum": 0.9}, {"foreach": None, "fused": None}):
        torch.manual_seed(0)
        ps = [torch.randn(n, requires_grad=True) for n in (1000, 3, 300)]
        for p in ps: p.grad = torch.randn_like(p)
        opt = rmsprop.RMSprop(ps, **({"fused": True} | kw))
        opt.step()
        v1 = versions(opt, ps)
        opt.step()                                   # the fast path
        v2 = versions(opt, ps)
        bumped(v1, v2, 1)
        opt.grad_scale, opt.found_inf = torch.tensor(2.), torch.tensor(1.)
        opt.step()                                   # skipped: an inf was found
        bumped(v2, versions(opt, ps), 0)
        opt.found_inf = torch.tensor(0.)
        opt.step()                                   # unscaled in place: the gradients too
        v3 = versions(opt, ps)
        assert all(b[1] == a[1] + 1 and b[0] == a[0] + 1 for a, b in zip(v2, v3)), (v2, v3)
        results[(kernel_bumps, str(kw))] = [p.detach().clone() for p in ps]
for kw in {k for _, k in results}:
    assert all(torch.equal(a, b) for a, b in zip(results[(True, kw)], results[(False, kw)])), kw
native.BUMPS_VERSIONS = True
# a view's counter is its base's: bumping the view bumps the base, once
base = torch.zeros(2, 500); p = base[1]; p.requires_grad_(); p.grad = torch.randn(500)
opt = rmsprop.RMSprop([p], fused=True); v = base._version; opt.step()
assert base._version == v + 1 and p._version == v + 1
# inference tensors inside inference mode: no counter to bump, and no crash
with torch.inference_mode():
    ip = torch.randn(100); ip.grad = torch.randn(100)
    o = rmsprop.RMSprop([ip], fused=True, momentum=0.9); o.step(); o.step()
# the test hook refuses what is not a tensor's handle before bumping anything
t = torch.zeros(3); v = t._version
keep = native.optional_handles([t, None])
assert native.LIB.rmsprop_bump_versions(keep.buffer_info()[0], 2) != 0 and t._version == v
assert native.LIB.rmsprop_bump_versions(keep.buffer_info()[0], 1) == 0 and t._version == v + 1
""",
    # 11b''. A torch without those functions, or whose functions the load-time probe rejects:
    # the kernel stays in use and Python bumps the counters.
    "11-kernel-without-version-functions": """
from rmsprop.backends.fused_cpu import native
symbols, probe = native._VERSION_FUNCTIONS, native._probe_versions
for breakage in ("symbols", "misbehaving", "probe"):
    if breakage == "symbols":
        native._VERSION_FUNCTIONS = {"version_counter": "no_such_symbol", "bump_version": "no_such_symbol_either"}
    elif breakage == "misbehaving":  # a "bump" that bumps nothing (the getter, harmless to call)
        native._VERSION_FUNCTIONS = {"version_counter": symbols["version_counter"], "bump_version": symbols["version_counter"]}
    else:
        native._VERSION_FUNCTIONS, native._probe_versions = symbols, lambda lib: False
    lib, error = native._load()
    assert error is None and lib is not None and not lib.rmsprop_bumps_versions(), (breakage, error)
    native.BUMPS_VERSIONS = bool(lib.rmsprop_bumps_versions())
    p = torch.randn(1000, requires_grad=True)
    opt = rmsprop.RMSprop([p], fused=True, momentum=0.9)
    loss = (p * p).sum()
    p.grad = torch.randn(1000)
    opt.step(); v = p._version; opt.step()
    assert p._version == v + 1 and all(t._version == 2 for t in opt.state[p].values()), breakage
    refused(loss.backward, RuntimeError, "modified by an inplace operation")
    # asking the kernel to bump without the functions is refused, not a crash
    call = native.Call(mode=native.MODE_RUN, dtype_mask=1, bump_versions=1)
    rc = lib.rmsprop_step(native.Lists(), 0, call, 1, None, None, None)
    assert rc == -1, rc
""",
    # 11c. Inference tensors are refused outside inference mode, as torch refuses in-place updates.
    "11-inference-tensors": """
with torch.inference_mode():
    ip = torch.randn(100)
for kw in ({}, {"fused": True}, {"foreach": True}, {"foreach": False}):
    opt = rmsprop.RMSprop([ip], **kw)
    ip.grad = torch.randn(100)
    before = ip.clone()
    refused(opt.step, RuntimeError, "inference tensor")
    assert torch.equal(ip, before) and len(opt.state) == 0
# a parameter whose .data became an inference tensor after the first fused steps keeps its
# own version counter, and torch updates it in place (probe review2-5): so do we; a state
# tensor replaced by one made in inference mode is refused
p, opt = trained(steps=2)
with torch.inference_mode():
    fresh = torch.randn(1000)
p.data = fresh
p.grad = torch.randn(1000)
before = p.detach().clone()
opt.step()
assert not torch.equal(p.detach(), before)
with torch.inference_mode():
    fresh = torch.ones(1000)
opt.state[p]["square_avg"] = fresh
snap = snapshot(opt, [p])
refused(opt.step, RuntimeError, "inference tensor")
unchanged(opt, [p], snap)
# inside inference mode the step works
with torch.inference_mode():
    q = torch.randn(10); q.grad = torch.randn(10)
    o = rmsprop.RMSprop([q]); o.step()
# steps taken inside inference mode do not vouch for one outside it (the fast path once reused
# their validation and wrote the inference tensors): refused with nothing changed, as torch does
for kw in ({}, {"fused": True}, {"foreach": True}, {"foreach": False}, {"momentum": 0.9, "centered": True}):
    with torch.inference_mode():
        ip = torch.randn(100); ip.grad = torch.randn(100)
        opt = rmsprop.RMSprop([ip], **kw)
        opt.step(); opt.step()
    snap = snapshot(opt, [ip])
    refused(opt.step, RuntimeError, "inference tensor")
    unchanged(opt, [ip], snap)
    with torch.inference_mode():
        opt.step()  # and inside again it steps
    assert not torch.equal(ip, snap[0][0]), kw
peer = torch.optim.RMSprop([ip])
with torch.inference_mode():
    peer.step()
refused(peer.step, RuntimeError, "inference tensor")
""",
    # 11d. Gradients with the negative or conjugate bit are stepped in the right direction.
    "11-neg-conj-bits": """
z = torch.randn(50, dtype=torch.complex64)
real_neg = z.conj().imag[:1]           # a 1-element real view with the negative bit
assert real_neg.is_neg() and real_neg.is_contiguous()
cases = [
    (torch.randn(1), lambda: real_neg.clone()._neg_view() if False else real_neg),
    (torch.randn(50, dtype=torch.complex64), lambda: torch.randn(50, dtype=torch.complex64).conj()),
    (torch.randn(50), lambda: torch.randn(50)._neg_view()),
]
for p0, grad in cases:
    g = grad()
    assert g.is_neg() or g.is_conj()
    for kw in ({}, {"fused": True}):
        a = p0.clone().requires_grad_(); b = p0.clone().requires_grad_()
        ours = rmsprop.RMSprop([a], momentum=0.9, **kw)
        theirs = torch.optim.RMSprop([b], momentum=0.9, foreach=True)
        a.grad, b.grad = g, g.resolve_neg().resolve_conj()
        if kw.get("fused"):
            refused(ours.step, RuntimeError, "negative bit")
            continue
        ours.step(); theirs.step()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
""",
    # 11e. numpy scalars work; strings and tensors are refused where they enter.
    "11-hyperparameter-types": """
p = torch.randn(100, requires_grad=True); p.grad = torch.randn(100)
opt = rmsprop.RMSprop([p], lr=np.float32(0.01), momentum=np.float64(0.9), alpha=np.float64(0.9),
                      centered=np.bool_(True), weight_decay=np.int64(0))
opt.step(); opt.step()
assert type(opt.param_groups[0]["momentum"]) is float
buffer = __import__("io").BytesIO(); torch.save(opt.state_dict(), buffer); buffer.seek(0)
torch.load(buffer, weights_only=True)  # no numpy objects in the checkpoint
for bad, exc, msg in [
    ({"lr": "0.1"}, TypeError, "lr"),
    ({"initial_square_avg": torch.tensor([1.0])}, TypeError, "initial_square_avg must be a number"),
    ({"momentum": torch.tensor(0.9)}, TypeError, "momentum must be a number"),
    ({"alpha": None}, TypeError, "alpha"),
    ({"centered": "yes"}, TypeError, "centered"),
    ({"eps": float("inf")}, ValueError, "eps"),
]:
    refused(lambda: rmsprop.RMSprop([p], **bad), exc, msg)
    refused(lambda: opt.add_param_group({"params": [torch.randn(3, requires_grad=True)], **bad}), exc, msg)
assert len(opt.param_groups) == 1
refused(lambda: opt.add_param_group({"params": [torch.randn(3, requires_grad=True)], "fused": True,
                                     "differentiable": True}), RuntimeError, "differentiable")
refused(lambda: opt.add_param_group({"params": [torch.randn(3, requires_grad=True)], "fused": True,
                                     "foreach": True}), RuntimeError, "cannot both")
assert len(opt.param_groups) == 1
""",
    # 11f. load_state_dict with a broken step or hyperparameters changes nothing.
    "11-load-state-dict": """
p, opt = trained(steps=2, momentum=0.9)
good = copy.deepcopy(opt.state_dict())
for corrupt, msg in [
    (lambda sd: sd["state"][0].__setitem__("step", "3"), "step"),
    (lambda sd: sd["state"][0].__setitem__("step", None), "step"),
    (lambda sd: sd["state"][0].__setitem__("step", torch.tensor(-1.0)), "step"),
    (lambda sd: sd["param_groups"][0].__setitem__("lr", "fast"), "lr"),
    (lambda sd: sd["param_groups"][0].__setitem__("alpha", 2.0), "alpha"),
    (lambda sd: sd["param_groups"][0].__setitem__("nesterov", True) or sd["param_groups"][0].__setitem__("momentum", 0), "nesterov"),
]:
    bad = copy.deepcopy(good)
    corrupt(bad)
    refused(lambda: opt.load_state_dict(bad), (ValueError, TypeError), msg)
    now = opt.state_dict()
    assert now["param_groups"][0]["lr"] == good["param_groups"][0]["lr"]
    for k, v in good["state"][0].items():
        assert torch.equal(now["state"][0][k], v), k
    p.grad = torch.randn(1000); opt.step()   # still steps
    good = copy.deepcopy(opt.state_dict())
# a step counter of another dtype loads and keeps working on every path
for kw in ({}, {"fused": True}, {"foreach": True}):
    p, opt = trained(steps=2, **kw)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["step"] = torch.tensor(2, dtype=torch.int64)
    opt.load_state_dict(sd)
    p.grad = torch.randn(1000); opt.step()
    assert opt.state[p]["step"].item() == 3 and opt.state[p]["step"].dtype == torch.float32
""",
    # Aliasing: a gradient that is its own parameter, and parameters that overlap in memory.
    "aliasing": """
base = torch.randn(100)
for kw in ({}, {"foreach": True}):
    a = base.clone().requires_grad_(); b = base.clone().requires_grad_()
    ours = rmsprop.RMSprop([a], **kw); theirs = torch.optim.RMSprop([b], foreach=True)
    a.grad = a.detach(); b.grad = b.detach()        # the gradient IS the parameter
    ours.step(); theirs.step()
    assert torch.equal(a, b) or torch.allclose(a, b, rtol=1e-6), kw
a = base.clone().requires_grad_(); a.grad = a.detach()
refused(rmsprop.RMSprop([a], fused=True).step, RuntimeError, "shares memory")
# two parameters that view one buffer
buf = torch.randn(200)
p1 = torch.nn.Parameter(buf[:120]); p2 = torch.nn.Parameter(buf[80:])
p1.grad = torch.ones(120); p2.grad = torch.ones(120)
refused(rmsprop.RMSprop([p1, p2], fused=True).step, RuntimeError, "shares memory")
rmsprop.RMSprop([p1, p2]).step()   # the default routes them to torch's path
# two parameters of one group sharing one state tensor
p = torch.randn(1000, requires_grad=True); q = torch.randn(1000, requires_grad=True)
opt = rmsprop.RMSprop([p, q], fused=True)
p.grad = torch.randn(1000); q.grad = torch.randn(1000)
opt.step()
opt.state[q]["square_avg"] = opt.state[p]["square_avg"]
p.grad = torch.randn(1000); q.grad = torch.randn(1000)
snap = snapshot(opt, [p, q])
refused(opt.step, RuntimeError, "shares memory")
unchanged(opt, [p, q], snap)
""",
    # A gradient that starts aliasing another parameter in a steady loop (the kernel's cheap
    # check of new gradients against the remembered spans of the persistent tensors).
    "aliasing-in-a-steady-loop": """
from rmsprop.backends.fused_cpu import native, kernel
for fused in (True, None):
    ps = [torch.randn(64, requires_grad=True) for _ in range(3)]
    opt = rmsprop.RMSprop(ps, fused=fused)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(64)
        opt.step()
    ps[2].grad = ps[0].detach()        # reads what the same step writes
    snap = snapshot(opt, ps)
    if fused:
        refused(opt.step, RuntimeError, "shares memory")
        unchanged(opt, ps, snap)
    else:
        refs = [p.detach().clone().requires_grad_() for p in ps]
        ref = rmsprop.RMSprop(refs, foreach=True)
        ref.load_state_dict(copy.deepcopy(opt.state_dict()))
        for r, p in zip(refs, ps):
            r.grad = p.grad.clone()
        opt.step(); ref.step()          # the aliased pair went to torch's path: its order of reads
        assert torch.allclose(ps[1], refs[1], rtol=1e-6)
""",
    # Validation before mutation across groups: a bad second group leaves the first untouched.
    "groups-all-or-nothing": """
for kw in ({}, {"fused": True}, {"foreach": True}):
    ok = torch.randn(100, requires_grad=True); bad = torch.randn(100, requires_grad=True)
    opt = rmsprop.RMSprop([{"params": [ok]}, {"params": [bad]}], **kw)
    for _ in range(2):
        ok.grad = torch.randn(100); bad.grad = torch.randn(100); opt.step()
    ok.grad = torch.randn(100); bad.grad = torch.randn(100)
    opt.state[bad]["square_avg"] = torch.zeros(7)
    snap = snapshot(opt, [ok])
    refused(opt.step, RuntimeError, "")
    unchanged(opt, [ok], snap)
""",
    # An adversarial review's findings (each reproduced before it was fixed):
    # R1. the custom op (public through torch.ops) with lists shorter than params: a NULL read.
    "review-1-op-list-lengths": """
from rmsprop.options import RULE_OPTIONS
r = dict(alpha=.99, eps=1e-8, weight_decay=0., momentum=0., centered=False, maximize=False, eps_in_sqrt=False,
         nesterov=False, decoupled_weight_decay=False, lr_in_momentum=False, bias_correction=False)
ps = [torch.randn(1000) for _ in range(3)]
refused(lambda: torch.ops.rmsprop.fused_step(ps, [torch.randn(1000)], [torch.zeros(1000) for _ in ps], [], [],
        [torch.zeros(()) for _ in ps], torch.tensor(.01), *[r[o.name] for o in RULE_OPTIONS if o.name in r], 63, True,
        None, None),
        ValueError, "grads has 1 tensors for 3 parameters")
""",
    # R2. a storage shrunk under its tensor: the kernel would write past the storage's end.
    "review-2-storage-resized": """
for kw in ({"fused": True}, {}):
    p = torch.nn.Parameter(torch.ones(4096)); opt = rmsprop.RMSprop([p], lr=.1, **kw)
    p.grad = torch.ones(4096); opt.step()
    opt.state[p]["square_avg"].untyped_storage().resize_(64)
    refused(opt.step, RuntimeError, "past the end of its storage")
    q = torch.nn.Parameter(torch.ones(4096)); o2 = rmsprop.RMSprop([q], lr=.1, **kw)
    q.grad = torch.ones(4096); o2.step()
    q.untyped_storage().resize_(0)   # as FSDP frees a parameter
    refused(o2.step, RuntimeError, "")
""",
    # R3. a negative / conjugate bit set on a parameter after the cache remembered it.
    "review-3-param-bits-in-a-steady-loop": """
p = torch.nn.Parameter(torch.ones(8)); opt = rmsprop.RMSprop([p], lr=.1)
for _ in range(3):
    p.grad = torch.ones(8); opt.step()
p.data = p.data._neg_view()
before = p.detach().clone()
p.grad = torch.ones(8)
refused(opt.step, RuntimeError, "negative bit")  # torch's path, where it is routed, refuses it too
assert torch.equal(p.detach(), before)
z = torch.nn.Parameter(torch.ones(8, dtype=torch.complex64)); oz = rmsprop.RMSprop([z], lr=.1)
for _ in range(3):
    z.grad = torch.ones(8, dtype=torch.complex64); oz.step()
z.data = z.data.conj(); z.grad = torch.ones(8, dtype=torch.complex64)
refused(oz.step, RuntimeError, "conjugate")
""",
    # R4. the kernel wrote its records, then the torch path for its leftovers raised: now
    # everything the torch path would trip over is checked before the kernel runs.
    "review-4-no-half-applied-leftovers": """
def two():
    a, b = torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.ones(4, 4))
    opt = rmsprop.RMSprop([a, b], lr=.1); a.grad = torch.ones(4, 4); b.grad = torch.ones(4, 4); opt.step()
    a.grad = torch.ones(4, 4); b.grad = torch.ones(4, 4)
    return a, b, opt
for corrupt in (lambda o, b: o.state[b].__setitem__("square_avg", o.state[b]["square_avg"].to_sparse()),
                lambda o, b: o.state[b].__setitem__("square_avg", o.state[b]["square_avg"]._neg_view()),
                lambda o, b: o.state[b].__setitem__("step", torch.tensor(3))):
    a, b, opt = two(); corrupt(opt, b)
    snap = snapshot(opt, [a])
    refused(opt.step, RuntimeError, "parameter 1")
    unchanged(opt, [a], snap)
p0, p1 = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
opt = rmsprop.RMSprop([{"params": [p0]}, {"params": [p1]}], fused=False)
p0.grad = torch.ones(3); p1.grad = torch.ones(3)
opt.param_groups[1]["lr"] = torch.tensor(.1, device="meta")
refused(opt.step, ValueError, "meta")
assert torch.equal(p0.detach(), torch.ones(3)) and len(opt.state) == 0
""",
    # R5. a falsy per-parameter state in a loaded state dict corrupted the optimizer.
    "review-5-falsy-state-entries": """
for bad in (0, None, False, "", [], torch.tensor(0.)):
    p = torch.nn.Parameter(torch.ones(4)); opt = rmsprop.RMSprop([p], lr=.1); p.grad = torch.ones(4); opt.step()
    sd = copy.deepcopy(opt.state_dict()); sd["state"][0] = bad
    refused(lambda: opt.load_state_dict(sd), ValueError, "must be a dict")
    p.grad = torch.ones(4); opt.step()
    assert opt.state[p]["step"].item() == 2
sd = copy.deepcopy(opt.state_dict()); sd["state"][0]["square_avg"] = sd["state"][0]["square_avg"].to_sparse()
refused(lambda: opt.load_state_dict(sd), ValueError, "dense tensor")
""",
    # R6. the steady path unscaled an inference-tensor gradient in place (GradScaler, fused=True).
    "review-6-inference-grad-written": """
p = torch.nn.Parameter(torch.ones(8)); opt = rmsprop.RMSprop([p], lr=.1, fused=True)
opt.grad_scale, opt.found_inf = torch.tensor(4.), torch.tensor(0.)
p.grad = torch.ones(8); opt.step()
with torch.inference_mode():
    g = torch.full((8,), 8.)
p.grad = g
refused(opt.step, RuntimeError, "inference tensor")
assert g[0].item() == 8.0
""",
    # R7. under torch.compile the default refused (with a fused=True message) what eager routes.
    "review-7-compiled-default-routes": """
p1, q1, q2 = (torch.nn.Parameter(torch.ones(8)) for _ in range(3))
opt = rmsprop.RMSprop([{"params": [p1]}, {"params": [q1, q2]}], lr=.1)
p1.grad = torch.ones(8); q1.grad = torch.ones(8); q2.grad = q1.detach()   # aliasing
torch.compile(opt.step)()
r1, s1, s2 = (torch.nn.Parameter(torch.ones(8)) for _ in range(3))
ref = rmsprop.RMSprop([{"params": [r1]}, {"params": [s1, s2]}], lr=.1)
r1.grad = torch.ones(8); s1.grad = torch.ones(8); s2.grad = s1.detach()
ref.step()
for a, b in ((p1, r1), (q1, s1), (q2, s2)):
    assert torch.allclose(a, b, rtol=1e-6), (a, b)
""",
    # R8. options edited directly in param_groups are checked at the step, not coerced.
    "review-8-edited-groups": """
for key, value, exc in (("centered", "no", TypeError), ("alpha", "0.5", TypeError), ("fused", "yes", TypeError),
                        ("lr", torch.tensor(-1.), ValueError), ("lr", torch.tensor(float("nan")), ValueError),
                        ("nesterov", True, ValueError)):
    p = torch.nn.Parameter(torch.ones(4)); opt = rmsprop.RMSprop([p], lr=.1)
    p.grad = torch.ones(4); opt.step()
    opt.param_groups[0][key] = value
    p.grad = torch.ones(4)
    before = p.detach().clone()
    refused(opt.step, exc, "param group 0")
    assert torch.equal(p.detach(), before)
""",
    # R9. an empty tensor with huge sizes: no signed overflow in the kernel's layout arithmetic
    # (UBSan under scripts/sanitize.sh).
    "review-9-huge-empty-sizes": """
p = torch.nn.Parameter(torch.empty(0).as_strided((0, 2**32, 2**32), (1, 1, 1)))
p.grad = torch.empty(0).as_strided((0, 2**32, 2**32), (1, 1, 1))
rmsprop.RMSprop([p], fused=True).step()
""",
    # R10. clear messages for non-tensors in the state and absurd numbers in a checkpoint.
    "review-10-messages": """
p, opt = trained()
opt.state[p]["step"] = 3.0
p.grad = torch.randn(1000)
refused(opt.step, RuntimeError, "is a float")
p, opt = trained()
sd = copy.deepcopy(opt.state_dict()); sd["param_groups"][0]["weight_decay"] = 10**400
refused(lambda: opt.load_state_dict(sd), ValueError, "loaded param group 0")
""",
    # R11. a float64 found_inf below float32's range is still an inf found, on every path.
    "review-11-found-inf-precision": """
for kw in ({"fused": True}, {"fused": False}):
    p, opt = trained(**kw)
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1e-50, dtype=torch.float64)
    before = p.detach().clone(); p.grad = torch.randn(1000)
    opt.step()
    assert torch.equal(p.detach(), before), kw
""",
    # Second review (this stop's adversarial pass over the fast path), S1. torch.utils.swap_tensors
    # keeps the Python objects and swaps the TensorImpls inside them: the cached handles then
    # named the other tensor (a freed one after load_state_dict(assign=True): a segfault).
    "review2-1-swap-tensors": """
def run(make, swap_state=False, clear=False):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4))
    opt = make([p])
    p.grad = torch.ones(4); opt.step()
    q = torch.nn.Parameter(torch.zeros(4))
    if swap_state:
        q = torch.full((4,), 0.25)
        torch.utils.swap_tensors(opt.state[p]["square_avg"], q)
    else:
        torch.utils.swap_tensors(p, q)
    if clear:
        opt._fused_cache.clear()
    q_before = q.detach().clone()
    p.grad = torch.ones(4); opt.step()
    assert torch.equal(q_before, q.detach()), "the tensor swapped out was written"
    return p.detach().clone(), opt.state[p]["square_avg"].clone()
for swap_state in (False, True):
    want = run(lambda ps: torch.optim.RMSprop(ps, lr=0.1, foreach=False), swap_state)
    for kw in ({"fused": False}, {}, {"fused": True}):
        for clear in (False, True):
            got = run(lambda ps: rmsprop.RMSprop(ps, lr=0.1, **kw), swap_state, clear)
            assert all(torch.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(got, want)), (swap_state, kw, clear)
torch.__future__.set_swap_module_params_on_conversion(True)
try:
    for cls in (torch.optim.RMSprop, rmsprop.RMSprop):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = cls(model.parameters(), lr=0.01)
        x = torch.randn(8, 4)
        model(x).sum().backward(); opt.step()
        model.load_state_dict({k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}, assign=True)
        opt.zero_grad(); model(x).sum().backward()
        import gc; gc.collect()
        opt.step()
        if cls is torch.optim.RMSprop:
            want = model.weight.detach().clone()
        else:
            assert torch.allclose(model.weight.detach(), want, rtol=1e-6, atol=0)
finally:
    torch.__future__.set_swap_module_params_on_conversion(False)
""",
    # S2. A negative or conjugate bit set on a state tensor in place (`.data = t.data.conj()`)
    # was seen on the full path only: the fast path stepped the raw memory.
    "review2-2-state-bits-on-the-fast-path": """
def run(kw, mutate, complex_=True, clear=False):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, dtype=torch.complex64 if complex_ else torch.float32))
    opt = rmsprop.RMSprop([p], momentum=0.9, **kw)
    p.grad = torch.randn_like(p); opt.step()
    mutate(opt.state[p])
    if clear:
        opt._fused_cache.clear()
    p.grad = torch.randn_like(p)
    snap = snapshot(opt, [p])
    msg = refused(opt.step, RuntimeError, "conjugate or negative bit")
    unchanged(opt, [p], snap)
    return msg
def conj_sq(st): st["square_avg"].data = st["square_avg"].data.conj()
def neg_buf(st): st["momentum_buffer"].data = torch._neg_view(st["momentum_buffer"].data)
def neg_step(st): st["step"].data = torch._neg_view(st["step"].data)
from rmsprop.backends.fused_cpu import native
for kernel_reads_bits in (True, False):
    if not kernel_reads_bits:  # a torch without at::native::is_neg / is_conj: Python reads them
        native._BIT_FUNCTIONS = {"is_neg": "no_such_symbol", "is_conj": "no_such_symbol_either"}
        lib, error = native._load()
        assert error is None and not lib.rmsprop_reads_bits()
        native.READS_BITS = False
    for kw in ({}, {"fused": True}, {"state_dtype": torch.bfloat16}, {"state_dtype": "int8", "int8_min_numel": 1}):
        for mutate, complex_ in ((conj_sq, True), (neg_buf, False), (neg_step, False)):
            if "state_dtype" in kw and complex_:
                continue
            assert run(kw, mutate, complex_) == run(kw, mutate, complex_, clear=True), (kw, mutate, kernel_reads_bits)
""",
    # S3. The records the kernel declined were cached with the choice they were made under:
    # fused switched to True mid-run then let a declined record through to torch's path.
    "review2-3-fused-switched-on-mid-run": """
base = torch.randn(4, 6)
p0 = torch.nn.Parameter(torch.randn(3, 3))
p1 = torch.nn.Parameter(base[:, ::2])  # not dense: the kernel declines it
opt = rmsprop.RMSprop([p0, p1], lr=0.01)
for s in range(2):
    p0.grad = torch.randn_like(p0); p1.grad = torch.randn_like(p1)
    opt.step()
opt.param_groups[0]["fused"] = True
p0.grad = torch.randn_like(p0); p1.grad = torch.randn_like(p1)
snap = snapshot(opt, [p0, p1])
refused(opt.step, RuntimeError, "fused=True: parameter 1")
unchanged(opt, [p0, p1], snap)
""",
    # S4. A parameter or state tensor whose elements share memory (expanded) passed the checks;
    # torch's op then raised part-way, after the kernel (or earlier ops) had written others.
    "review2-4-self-overlapping-tensors": """
for kw in ({}, {"fused": False, "foreach": True}, {"fused": False, "foreach": False}, {"fused": True}):
    torch.manual_seed(0)
    p0 = torch.nn.Parameter(torch.randn(6)); p1 = torch.nn.Parameter(torch.randn(4))
    opt = rmsprop.RMSprop([p0, p1], **kw)
    p0.grad, p1.grad = torch.randn(6), torch.randn(4)
    opt.step()
    opt.state[p1]["square_avg"].data = torch.zeros(1).expand(4)
    p0.grad, p1.grad = torch.randn(6), torch.randn(4)
    snap, v0 = snapshot(opt, [p0, p1]), p0._version
    refused(opt.step, RuntimeError, "parameter 1")
    unchanged(opt, [p0, p1], snap)
    assert p0._version == v0, kw
    # on the first step: nothing written, no state kept
    p0 = torch.nn.Parameter(torch.randn(6)); p1 = torch.nn.Parameter(torch.randn(1).expand(4))
    opt = rmsprop.RMSprop([p0, p1], **kw); before = p0.detach().clone()
    p0.grad, p1.grad = torch.randn(6), torch.randn(4)
    refused(opt.step, RuntimeError, "parameter 1")
    assert torch.equal(before, p0.detach()) and len(opt.state) == 0, kw
""",
    # S5. `p.data = <inference tensor>` keeps p's own version counter, and torch updates p in
    # place; the check refused every tensor whose is_inference() is true.
    "review2-5-data-set-to-an-inference-tensor": """
def run(make):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4))
    opt = make([p])
    p.grad = torch.randn(4); opt.step()
    with torch.inference_mode():
        new = torch.randn(4)
    p.data = new
    p.grad = torch.randn(4); opt.step()
    p.grad = torch.randn(4); opt.step()
    return p.detach().clone()
want = run(lambda ps: torch.optim.RMSprop(ps, foreach=False))
for kw in ({"fused": False, "foreach": False}, {"fused": False, "foreach": True}, {}, {"fused": True}):
    assert torch.allclose(run(lambda ps: rmsprop.RMSprop(ps, **kw)), want, rtol=1e-6, atol=0), kw
""",
    # S8. The other way round: a tensor made in inference mode keeps no version counter when its
    # .data is set to a normal tensor, though is_inference() turns false. torch refuses to update
    # it in place; the fused kernel once stepped it (skipping the missing counter) and the torch
    # op paths raised part-way through, with the parameter already written.
    "review3-1-made-in-inference-then-data-replaced": """
def counterless(n, fill=None):
    with torch.inference_mode():
        t = torch.randn(n) if fill is None else torch.full((n,), fill)
    t.data = torch.randn(n) if fill is None else torch.full((n,), fill)
    assert not t.is_inference()
    refused(lambda: t._version, RuntimeError, "version counter")
    return t
q = counterless(10)
q.grad = torch.randn(10)
refused(torch.optim.RMSprop([q]).step, RuntimeError, "inference tensor")
for kw in ({}, {"fused": True}, {"fused": False, "foreach": True}, {"fused": False, "foreach": False},
           {"momentum": 0.9, "centered": True}, {"state_dtype": torch.bfloat16}, {"state_dtype": "int8", "int8_min_numel": 1},
           {"fused": False, "state_dtype": torch.bfloat16}, {"fused": False, "state_dtype": "int8", "int8_min_numel": 1}):
    before = q.detach().clone()
    opt = rmsprop.RMSprop([q], **kw)
    refused(opt.step, RuntimeError, "inference tensor")
    assert torch.equal(q.detach(), before) and len(opt.state) == 0, kw
    # a state tensor of that kind, put in after steps that built the fast path's entry
    p, opt = trained(steps=2, **kw)
    key = "square_avg"
    if opt.state[p][key].dtype == torch.float32:
        opt.state[p][key] = counterless(1000, 1.0)
    elif opt.state[p][key].dtype == torch.bfloat16:
        continue  # (bf16 codes: a float32 tensor would be a format change, converted, not stepped)
    else:
        opt.state[p][key + "_scale"] = counterless(opt.state[p][key + "_scale"].numel(), 1.0)
    snap = snapshot(opt, [p])
    refused(opt.step, RuntimeError, "inference tensor")
    unchanged(opt, [p], snap)
# such a gradient under GradScaler's contract (grad_scale handed to step: unscaled in place) is
# refused before any gradient is unscaled (the torch-op paths unscaled them all, then raised)
for kw in ({}, {"fused": False, "foreach": True}, {"fused": False, "foreach": False},
           {"fused": False, "state_dtype": torch.bfloat16}, {"fused": False, "state_dtype": "int8", "int8_min_numel": 1}):
    p, q = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(10))
    opt = rmsprop.RMSprop([p, q], lr=0.1, **kw)
    p.grad, q.grad = torch.full((10,), 4.0), counterless(10)
    grads = (p.grad.clone(), q.grad.clone())
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(0.0)
    snap = snapshot(opt, [p, q])
    refused(opt.step, RuntimeError, "inference tensor")
    unchanged(opt, [p, q], snap)
    assert torch.equal(p.grad, grads[0]) and torch.equal(q.grad, grads[1]) and len(opt.state) == 0, kw
""",
    # S7. Cached entries held parameters the user had dropped (and their state) until 64 others
    # pushed them out; torch's optimizer lets them go.
    "review2-7-dropped-parameters-are-freed": """
import gc, weakref
for kw in ({}, {"fused": True}):
    old = torch.nn.Parameter(torch.randn(1000))
    opt = rmsprop.RMSprop([old], **kw)
    old.grad = torch.randn_like(old); opt.step(); opt.step()
    w = weakref.ref(old); ws = weakref.ref(opt.state[old]["square_avg"])
    new = torch.nn.Parameter(torch.randn(1000)); new.grad = torch.randn_like(new)
    opt.param_groups[0]["params"] = [new]
    del opt.state[old]
    del old; gc.collect()
    opt.step(); gc.collect()
    assert w() is None and ws() is None, kw
    opt.step()                               # and the new entry stays in use
    assert len(opt._fused_cache) == 1
""",
    # Device-aware default: no CPU tensors, no CPU kernel and no warning about it.
    "device-aware-default": """
from rmsprop.backends.fused_cpu import native, kernel
native.LIB = None; native._LOAD_ERROR = "simulated"
calls = []
kernel._Call.invoke = lambda *a, **k: calls.append(1)
p = torch.zeros(10, device="meta", requires_grad=True)
p.grad = torch.zeros(10, device="meta")
with warnings.catch_warnings():
    warnings.simplefilter("error")
    rmsprop.RMSprop([p]).step()
assert calls == []
""",
    # Low-bit state (issue 10). L1: the int8 scales reach C as addresses: a non-tensor with a
    # `_cdata` attribute, or a scales list shorter than the parameters, must never get there.
    "lowbit-1-scales-lists": """
rule = Rule(alpha=.99, eps=1e-8, weight_decay=0., momentum=0., centered=False, maximize=False, eps_in_sqrt=False,
            nesterov=False, decoupled_weight_decay=False, lr_in_momentum=False, bias_correction=False,
            state_dtype="int8")
class Fake:
    _cdata = 8
p = torch.randn(5000); before = p.clone()
codes = torch.zeros(5000, dtype=torch.uint8)
args = ([p], [torch.randn(5000)], [codes], [], [], [torch.zeros(())])
for kw in ({"fused": True}, {}):
    refused(lambda: F.rmsprop(*args, lr=.1, rule=rule, scales=([Fake()], [], []), **kw), RuntimeError, "not a tensor")
    refused(lambda: F.rmsprop(*args, lr=.1, rule=rule, scales=([], [], []), **kw), Exception, "scale")
    refused(lambda: F.rmsprop(*args, lr=.1, rule=rule, scales=([torch.ones(3)], [], []), **kw), Exception, "")
    assert torch.equal(p, before) and not codes.any()
""",
    # L2: int8 codes (one byte an element) get the storage-extent check the float state has.
    "lowbit-2-codes-storage-resized": """
for kw in ({"fused": True}, {}):
    p = torch.nn.Parameter(torch.ones(8192)); opt = rmsprop.RMSprop([p], lr=.1, state_dtype="int8", **kw)
    p.grad = torch.ones(8192); opt.step()
    opt.state[p]["square_avg"].untyped_storage().resize_(64)
    refused(opt.step, RuntimeError, "past the end of its storage")
    q = torch.nn.Parameter(torch.ones(8192)); o2 = rmsprop.RMSprop([q], lr=.1, state_dtype="int8", **kw)
    q.grad = torch.ones(8192); o2.step()
    o2.state[q]["square_avg_scale"].untyped_storage().resize_(4)
    refused(o2.step, RuntimeError, "past the end of its storage")
""",
}


# Each probe runs in a child forked from one server interpreter that has imported torch and the
# library (the PRELUDE) once: a crash still ends only that child, and the suite does not pay a
# torch (and dynamo) import, seconds, per probe. A probe with its own environment gets a fresh interpreter.
_SERVER = r"""
import json, os, signal, sys, time, traceback
namespace = {"__name__": "__probe__"}
exec(compile(json.loads(sys.argv[1]), "<prelude>", "exec"), namespace)
# torch's Optimizer imports dynamo on first construction (seconds): once here, not in every child
import torch._dynamo
sys.stdout.write("READY\n"); sys.stdout.flush()
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        out = os.open(request["out"], os.O_WRONLY | os.O_TRUNC)
        os.dup2(out, 1); os.dup2(out, 2)
        code = 0
        try:
            exec(compile(request["code"], "<probe>", "exec"), namespace)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc(); code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    deadline = time.monotonic() + request["timeout"]
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0); status = None
            break
        time.sleep(0.005)
    code = "timeout" if status is None else os.waitstatus_to_exitcode(status)
    sys.stdout.write(json.dumps(code) + "\n"); sys.stdout.flush()
"""


class _ProbeServer:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, json.dumps(PRELUDE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if self.proc.stdout.readline().strip() != "READY":
            raise RuntimeError("the probe server did not start")

    def run(self, code: str, timeout: float) -> subprocess.CompletedProcess:
        with tempfile.NamedTemporaryFile("r", suffix=".probe") as out:
            request = {"code": code, "out": out.name, "timeout": timeout}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            code_line = self.proc.stdout.readline()
            if not code_line:
                raise RuntimeError("the probe server died")
            returncode = json.loads(code_line)
            text = out.read()
        if returncode == "timeout":
            returncode = -9
            text += f"\n[probe killed after {timeout} s]"
        return subprocess.CompletedProcess(["probe"], returncode, text, text)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


_server: _ProbeServer | None = None


@pytest.fixture(scope="module", autouse=True)
def _probe_server():
    global _server
    _server = _ProbeServer()
    yield
    _server.close()
    _server = None


def _run(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    body = textwrap.dedent(code) + "\nprint('PROBE-OK')\n"
    if env is None and _server is not None:
        return _server.run(body, timeout=300)
    return subprocess.run(
        [sys.executable, "-c", PRELUDE + body],
        capture_output=True,
        text=True,
        timeout=300,
        env=env or os.environ.copy(),
    )


@pytest.mark.parametrize("name", list(PROBES))
def test_probe(name):
    result = _run(PROBES[name])
    assert result.returncode == 0 and "PROBE-OK" in result.stdout, (
        f"probe {name} exited with {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n"
        f"--- stderr\n{result.stderr[-6000:]}"
    )


def test_a_crash_fails_a_probe():
    """The harness itself: a segfault in a probe is a failure, not a pass, and the next probe
    still runs."""
    result = _run("import ctypes; ctypes.string_at(0)")
    assert result.returncode != 0 and "PROBE-OK" not in result.stdout
    assert _run("x = 1").returncode == 0


def test_a_probe_that_raises_fails():
    result = _run("assert 1 + 1 == 3, 'arithmetic'")
    assert result.returncode == 1 and "arithmetic" in result.stdout


def test_probes_do_not_see_each_others_changes():
    """Each probe is a fork of the prelude's state: what one changes, the next does not see."""
    assert _run("rmsprop.RMSprop = None; torch.manual_seed(7)").returncode == 0
    assert _run("assert rmsprop.RMSprop is not None").returncode == 0
