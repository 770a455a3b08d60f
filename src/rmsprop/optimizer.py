"""rmsprop.RMSprop: torch.optim.RMSprop's interface and behaviour, plus every published variant.

The class validates options where they enter, owns the param groups and the state (created
lazily), gathers each group's tensors and hands them to :func:`rmsprop.functional.prepare`. It
knows nothing about kernels: the fused backend's memory between steps is an opaque
:class:`~rmsprop.backends.fused_cpu.FusedCache` it carries for it.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from itertools import repeat
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT, _get_scalar_dtype, _use_grad_for_differentiable

from . import functional, lowbit
from .checkpoint import prepare_state_dict
from .options import DEFAULTS, OPTIONS, migrate_group, validate_group
from .rule import Rule

__all__ = ["RMSprop"]

_GRAD = operator.attrgetter("grad")
_STATE_GETTERS = {
    key: operator.methodcaller("get", key) for key in ("step", "square_avg", "grad_avg", "momentum_buffer")
}
_NO_STATE = MappingProxyType({})
_PLAIN_DICTS = (dict, defaultdict)


class _StateOrder:
    """The optimizer's state read in insertion order, for one step's gathering.

    Looking a parameter up in ``self.state`` hashes it with ``Tensor.__hash__``, a Python
    function: for thousands of parameters that is a large part of a step's bookkeeping. The
    state a first step (or ``load_state_dict``) creates is inserted group by group, parameter
    by parameter, so its keys in order are usually the groups' parameters in order. Each group
    takes the next ``len(params)`` keys when every one of them *is* its parameter (an identity
    check, no hashing) and their values as its states; otherwise it looks its parameters up, and
    the groups after it do too.
    """

    def __init__(self, state: dict) -> None:
        self._state = state
        self._keys: list | None = None
        self._values: list | None = None
        self._cursor = 0  # where the next group's keys begin; -1: the order was lost

    def states_of(self, params: list[Tensor]) -> list:
        """Each parameter's state (``_NO_STATE`` where it has none)."""
        n, start = len(params), self._cursor
        if n == 0:  # (a frozen group: the next group's keys begin where they did)
            return []
        # (a subclass of dict may override its lookups; its values are then read through them)
        if start >= 0 and type(self._state) in _PLAIN_DICTS and start + n <= len(self._state):
            if self._keys is None:
                self._keys, self._values = list(self._state), list(self._state.values())
            if all(map(operator.is_, self._keys[start : start + n], params)):
                self._cursor = start + n
                return self._values[start : start + n]
        self._cursor = -1
        return list(map(self._state.get, params, repeat(_NO_STATE)))


D = DEFAULTS
_Format = tuple[list[str], torch.dtype]  # a state format: its buffer keys and their storage dtype


def _has_format(state, keys: list[str], dtype: torch.dtype) -> bool:
    """Whether ``state`` holds every buffer of ``keys`` with storage ``dtype`` (uint8: int8 codes,
    each with its scales)."""
    for key in keys:
        t = state.get(key)
        if not isinstance(t, Tensor) or t.dtype != dtype:
            return False
        if dtype == torch.uint8 and key + "_scale" not in state:
            return False
    return True


def _marks(group: dict[str, Any], original: dict[str, Any] | None) -> tuple[int, int]:
    """What RMSprop._lowbit_groups knows a group by: its params list and its dict in
    param_groups (``original``, where ``group`` is a step's checked copy)."""
    return id(group["params"]), id(original if original is not None else group)


def _in_torch_format(state, p: Tensor) -> bool:
    """Whether the buffers ``state`` holds are torch's (E[g^2], grad_avg, momentum_buffer in the
    parameter's dtype; no centered variance, no int8 scales), as a group without state_dtype
    steps them."""
    for key in ("square_avg", "grad_avg", "momentum_buffer"):
        t = state.get(key)
        if t is not None and (not isinstance(t, Tensor) or t.dtype != p.dtype):
            return False
    return "grad_var" not in state


class RMSprop(Optimizer):
    r"""RMSProp, a drop-in for :class:`torch.optim.RMSprop` with every published variant.

    With only torch's arguments and ``fused=False`` (or an explicit ``foreach``), results and the
    state dict are bit-identical to ``torch.optim.RMSprop`` on the same path (``foreach=False``:
    per-tensor, ``foreach=True``: multi-tensor). By default CPU tensors take the fused kernel, one
    pass over memory: it rounds once per value instead of once per op, so it equals those paths
    up to float rounding, not bit for bit. The state dict has torch's keys and layout (``step``,
    ``square_avg``, ``momentum_buffer``, ``grad_avg``), so checkpoints move both ways.

    The update, for gradient :math:`g_t` and step :math:`t`:

    .. math::
        v_t &= \alpha v_{t-1} + (1-\alpha) g_t^2 \qquad (v_0 = \text{initial\_square\_avg}) \\
        \theta_t &= \theta_{t-1} - \eta\, g_t / (\sqrt{v_t} + \epsilon)
            \quad\text{or, with eps\_in\_sqrt,}\quad
            \theta_{t-1} - \eta\, g_t / \sqrt{v_t + \epsilon}

    torch puts :math:`\epsilon` outside the root; the original formulation, TensorFlow, Keras and
    optax put it inside. See :class:`rmsprop.rule.Rule` for the full formula with every switch.

    Args:
        params: iterable of parameters (or named parameters) or dicts defining param groups.
        lr: learning rate :math:`\eta` (float or 1-element tensor). Default 1e-2.
        alpha: smoothing constant :math:`\alpha` of the averages, in [0, 1]. Default 0.99.
        eps: :math:`\epsilon`, added to the denominator. Default 1e-8.
        weight_decay: :math:`\lambda`; coupled L2 (added to the gradient) unless
            ``decoupled_weight_decay``. Default 0.
        momentum: momentum factor :math:`\mu`. Default 0.
        centered: divide by the estimated standard deviation
            :math:`\sqrt{v - m^2}` (Graves, 2013), :math:`m` the running mean gradient; the
            variance is clamped at 0 so rounding never yields NaN.
        capturable, foreach, maximize, differentiable: as in torch.optim.RMSprop.
        fused: ``None`` (default) uses the fused CPU kernel wherever it takes the tensors;
            ``True`` forces it (RuntimeError, before anything is written, where it cannot);
            ``False`` keeps torch's op paths.
        eps_in_sqrt: use :math:`\sqrt{v+\epsilon}` instead of :math:`\sqrt{v}+\epsilon`.
        nesterov: Nesterov momentum: apply :math:`u + \mu b` instead of :math:`b`
            (needs ``momentum > 0``).
        decoupled_weight_decay: :math:`\theta \leftarrow \theta(1-\eta\lambda)` before the update
            instead of :math:`g \leftarrow g + \lambda\theta`.
        lr_in_momentum: the buffer accumulates lr-scaled steps,
            :math:`b \leftarrow \mu b + \eta u`, :math:`\theta \leftarrow \theta - b` (TF),
            instead of :math:`b \leftarrow \mu b + u`, :math:`\theta \leftarrow \theta - \eta b`.
            The two differ only when the lr changes during training.
        initial_square_avg: :math:`v_0` (0 in torch; 1 in TF1 and timm).
        bias_correction: divide :math:`v` (and :math:`m`) by :math:`1-\alpha^t`, as optax does.
            With ``centered`` and :math:`v_0 = 0`, the corrected variance at :math:`t=1` is
            :math:`g^2 - g^2 = 0`, so the first update is :math:`g/\epsilon` (optax behaves the
            same): prefer ``initial_square_avg > 0`` or a larger ``eps`` with that combination.
        state_dtype: how ``square_avg``, ``grad_avg`` and ``momentum_buffer`` are stored (the
            math stays float32): ``None`` (default) the parameter's dtype, as torch;
            ``torch.float32``; ``torch.bfloat16`` (2 bytes, stochastic rounding);
            ``"int8"`` (blockwise 8-bit codes with a float32 scale per 256 elements, about 1.02
            bytes per element and buffer). See :mod:`rmsprop.lowbit` for the formats, and for
            centered, which then keeps the variance itself (state key ``grad_var``). Real
            floating parameters only; a checkpoint is converted to this optimizer's format when
            loaded (both ways).
        int8_min_numel: with ``state_dtype="int8"``, tensors of fewer elements keep float32
            state (float64 for float64 parameters). Default 4096.
        lazy_sparse: what a sparse gradient (``nn.Embedding(sparse=True)``) does. ``False``
            (default): exactly what its dense equivalent ``grad.to_dense()`` does, on every
            backend, bit for bit. ``True``: TensorFlow's lazy rows (``SparseApplyRMSProp``):
            duplicate indices are summed, then only the rows present are updated — parameter,
            :math:`v`, :math:`m` and momentum buffer, each row by the update above with its own
            gradient row; rows absent from the gradient keep parameter and state exactly (they
            neither decay nor coast on momentum). Weight decay, coupled or decoupled, acts on the
            rows present only. Refused with ``bias_correction`` (a row's average holds only the
            steps that touched it, so :math:`1-\alpha^t` has no meaning there) and
            ``differentiable``. Dense gradients are unaffected.

    Every option is declared once, in :data:`rmsprop.options.OPTIONS`, and checked where it
    enters (here, ``add_param_group``, ``load_state_dict``) for type and value: numpy scalars
    work; strings, and tensors where a number is needed, raise at once.

    For Hogwild / A3C training with ``torch.multiprocessing``, :meth:`share_memory` puts the
    state in shared memory so that every worker steps the same statistics.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = D["lr"],
        alpha: float = D["alpha"],
        eps: float = D["eps"],
        weight_decay: float = D["weight_decay"],
        momentum: float = D["momentum"],
        centered: bool = D["centered"],
        capturable: bool = D["capturable"],
        foreach: bool | None = D["foreach"],
        maximize: bool = D["maximize"],
        differentiable: bool = D["differentiable"],
        *,
        fused: bool | None = D["fused"],
        eps_in_sqrt: bool = D["eps_in_sqrt"],
        nesterov: bool = D["nesterov"],
        decoupled_weight_decay: bool = D["decoupled_weight_decay"],
        lr_in_momentum: bool = D["lr_in_momentum"],
        initial_square_avg: float = D["initial_square_avg"],
        bias_correction: bool = D["bias_correction"],
        state_dtype: torch.dtype | str | None = D["state_dtype"],
        int8_min_numel: int = D["int8_min_numel"],
        lazy_sparse: bool = D["lazy_sparse"],
    ) -> None:
        arguments = locals()
        defaults = validate_group({o.name: arguments[o.name] for o in OPTIONS})
        super().__init__(params, defaults)
        self._fused_cache = functional.FusedCache()
        # The groups whose state may be in another format than torch's (a state_dtype made or
        # loaded it), by the id of their params list (the checked copy of a group that a step
        # works on shares that list, and so does the group load_state_dict puts in its place)
        # and by the id of the group in param_groups: a group whose list is replaced, or a
        # list put in a new group dict, keeps the mark. A group without state_dtype that is not
        # here takes the steady path, which reads the state as torch's without looking at each
        # tensor; one whose list and dict were both replaced has its low-bit state refused there,
        # with nothing written. (Ids only: a removed group's parameters are not kept alive; a
        # reused id costs one look at each tensor.)
        self._lowbit_groups: set[int] = set()

    @property
    def _step_supports_amp_scaling(self) -> bool:  # type: ignore[override]
        """GradScaler hands ``grad_scale`` / ``found_inf`` to step() instead of unscaling the
        gradients itself only where the step consumes them: as torch sets the flag only for
        ``fused=True``. Elsewhere GradScaler unscales as usual, so gradient clipping after
        ``scaler.unscale_`` (Lightning's ``gradient_clip_val`` under mixed precision) works."""
        return any(group.get("fused") is True for group in getattr(self, "param_groups", ()))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's, but the group's options are checked (type, value, and against each other,
        with the defaults filling the rest) before it is added."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        checked = validate_group({**self.defaults, **param_group})
        param_group = {**param_group, **{k: checked[k] for k in param_group if k in checked}}
        params = param_group.get("params")
        # read once, here, as torch's own add_param_group would: a generator (model.parameters())
        # checked below would reach torch empty. A tensor and a set are left to torch (it wraps
        # the one and refuses the other).
        if params is not None and not isinstance(params, (Tensor, set)):
            param_group["params"] = params = list(params)
        if checked["state_dtype"] is not None and not isinstance(params, set):
            for p in [params] if isinstance(params, Tensor) else params or ():
                p = p[1] if isinstance(p, tuple) and len(p) == 2 else p  # named: (name, tensor)
                if isinstance(p, Tensor):
                    lowbit.target(checked["state_dtype"], checked["int8_min_numel"], p)  # complex: refused
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._fused_cache = functional.FusedCache()  # raw addresses: never carried over
        self.param_groups = [migrate_group(group, {**DEFAULTS, **group}) for group in self.param_groups]
        for group in self.param_groups:
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if len(p_state) != 0 and not torch.is_tensor(p_state["step"]):
                    step_val = float(p_state["step"])
                    p_state["step"] = (
                        torch.tensor(step_val, dtype=_get_scalar_dtype(), device=p.device)
                        if group["capturable"]
                        else torch.tensor(step_val, dtype=_get_scalar_dtype())
                    )
        # (state_dtype may have been switched to None after the state was made in another format)
        self._lowbit_groups = set()
        for group in self.param_groups:
            if group["state_dtype"] is not None or not all(
                _in_torch_format(self.state.get(p, _NO_STATE), p) for p in group["params"]
            ):
                self._mark_lowbit(group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, after checking everything (see :mod:`rmsprop.checkpoint`): each group's
        options, each state tensor against its parameter (floating state of another precision
        is cast to the parameter's, as torch does), each step counter. On any problem it raises
        and the optimizer is left as it was. A torch checkpoint (no ``fused`` key) keeps the
        kernel choice this optimizer was built with."""
        prepared, held_back = prepare_state_dict(self.param_groups, state_dict)
        super().load_state_dict(prepared)
        # state in a format torch's loader would cast to the parameter's dtype (bf16 / int8 /
        # float32 state of a bf16 parameter) was checked and converted above; it goes in as is
        for param, entry in held_back.items():
            self.state[param] = entry
        # the loaded state of a group without state_dtype was converted to torch's format above
        self._lowbit_groups = set()
        for group in self.param_groups:
            if group["state_dtype"] is not None:
                self._mark_lowbit(group)
        self._fused_cache.clear()

    def share_memory(self) -> RMSprop:
        """Create every parameter's state now and move it to shared memory; returns ``self``.

        As :meth:`torch.nn.Module.share_memory` does for a model: after ``model.share_memory()``
        and ``optimizer.share_memory()``, processes started with ``torch.multiprocessing`` that
        receive the optimizer step one set of parameters *and* one set of statistics (square
        average, grad average, momentum buffer, step counter) — the shared RMSProp of A3C
        (Mnih et al., 2016) and Hogwild. The state is what a first step would create (zeros, or
        ``initial_square_avg``; nothing is stepped) and keeps the keys and layout of any other
        state, so the fused kernel and every backend step it in place. Without a lock the
        workers' updates race, as in Hogwild: an element updated by two workers at once keeps
        one of the two writes (the step counter included).

        Call it after :meth:`load_state_dict` (loading replaces the state tensors) and before
        starting the workers; a state tensor that is already shared stays where it is. (Tensors
        handed to a spawned process are moved to shared memory by torch anyway; what is missing
        without this call is state that exists before the workers start: each would create its
        own, and the statistics would not be shared.)
        """
        for group in self.param_groups:
            if group["state_dtype"] is not None:
                self._mark_lowbit(group)
            for p in group["params"]:
                old = self.state.get(p, _NO_STATE)
                state = self._formatted(group, p, old) or dict(old)
                for value in state.values():
                    if isinstance(value, Tensor):
                        value.share_memory_()
                self.state[p] = state
        self._fused_cache.clear()  # the state tensors' storage moved
        return self

    # ------------------------------------------------------------------ the step

    def _new_state(self, group: dict[str, Any], p: Tensor, state: Any) -> dict[str, Any]:
        """``state`` completed with what the group's options need (all of it for a new
        parameter; a buffer an option switched on later starts at zero)."""
        state = dict(state)
        if "step" not in state:
            # on the parameter's device with capturable, as torch; and with fused=True, as torch's
            # fused optimizers (the CUDA kernel then counts steps without the host)
            device = p.device if group["capturable"] or group["fused"] is True else None
            state["step"] = torch.zeros((), dtype=_get_scalar_dtype(), device=device)
        if group["state_dtype"] is not None:
            return lowbit.new_entry(group, p, state)
        if "square_avg" not in state:
            sq = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["initial_square_avg"] != 0:
                # Complex parameters are updated as (real, imag) pairs: both start at v0.
                (torch.view_as_real(sq) if sq.is_complex() else sq).fill_(group["initial_square_avg"])
            state["square_avg"] = sq
        if group["momentum"] > 0 and "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["centered"] and "grad_avg" not in state:
            state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _mark_lowbit(self, group: dict[str, Any], original: dict[str, Any] | None = None) -> None:
        """Note that the group's state may be in another format than torch's (see __init__), by
        its params list and by the group in ``param_groups`` (``original``, where ``group`` is the
        step's checked copy): a group keeps its mark when either is replaced, not both."""
        self._lowbit_groups.update(_marks(group, original))

    def _formatted(self, group: dict[str, Any], p: Tensor, state: Any, target: _Format | None = None) -> dict | None:
        """``state`` in the format the group gives ``p`` (see :mod:`rmsprop.lowbit`; torch's
        without a ``state_dtype``) and completed as :meth:`_new_state` completes it, as a new
        entry; None when it is both already. State in another format (``state_dtype``,
        ``int8_min_numel`` or ``centered`` changed since it was made) is converted, as
        ``load_state_dict`` converts a checkpoint's. ``target``: the format's buffer keys and
        storage dtype, where the caller has them."""
        if target is None:
            fmt, dtype = lowbit.target(group["state_dtype"], group["int8_min_numel"], p)
            keys = lowbit.buffer_keys(fmt, group["centered"], group["momentum"] > 0)
        else:
            keys, dtype = target
        if "step" in state and _has_format(state, keys, dtype):
            return None
        if lowbit.entry_format(state) is not None and not _has_format(state, keys[:1], dtype):
            state = lowbit.from_float(lowbit.to_float(state, p, group), p, group, state)
        return self._new_state(group, p, state)

    def _gather(
        self,
        group: dict[str, Any],
        created: dict[Tensor, dict[str, Any]],
        order: _StateOrder,
        original: dict[str, Any] | None = None,
    ) -> tuple[list[Tensor], ...]:
        """The group's lists; state a parameter lacks is created into ``created``, not yet into
        ``self.state`` (so a step that raises leaves no half-built state behind)."""
        if group["state_dtype"] is not None:
            return self._gather_lowbit(group, created, original)
        wanted = ["step", "square_avg"]
        if group["momentum"] > 0:
            wanted.append("momentum_buffer")
        if group["centered"]:
            wanted.append("grad_avg")
        if torch.compiler.is_compiling():
            lists: tuple[list[Tensor], ...] = ([], [], [], [], [], [])
            self._init_group(group, *lists)
            return lists
        # state_dtype switched to None: the state another format made is converted once, then
        # the group takes the steady path again (its only cost there is this one lookup)
        params = group["params"]
        marks = _marks(group, original)
        converting = not self._lowbit_groups.isdisjoint(marks)
        if converting and all(_in_torch_format(self.state.get(p, _NO_STATE), p) for p in params):
            self._lowbit_groups.difference_update(marks)
            converting = False
        if converting:
            columns = self._gather_converted(group, wanted, created)
        else:
            columns = self._gather_eager(group, wanted, created, order)
        return (
            columns["params"],
            columns["grads"],
            columns["square_avg"],
            columns.get("grad_avg", []),
            columns.get("momentum_buffer", []),
            columns["step"],
        )

    def _gather_eager(self, group, wanted, created, order: _StateOrder) -> dict[str, list]:
        # map() over C-level getters: no bytecode per tensor, which matters for thousands of
        # them; `None` is found by identity (`None in grads` would compare tensors elementwise)
        params = group["params"]
        grads = list(map(_GRAD, params))
        if any(map(operator.is_, grads, repeat(None))):
            params = [p for p in params if p.grad is not None]
            grads = list(map(_GRAD, params))
        else:
            params = list(params)
        states = order.states_of(params)
        try:  # the steady state: every parameter has all it needs
            columns = {key: list(map(operator.itemgetter(key), states)) for key in wanted}
        except KeyError:
            columns = {key: list(map(_STATE_GETTERS[key], states)) for key in wanted}
            for i, p in enumerate(params):
                if any(columns[key][i] is None for key in wanted):
                    # a parameter listed twice gets one state, stepped twice (as torch does)
                    new = created.get(p)
                    if new is None:
                        # (_formatted: a centered variance left by a low-bit format is E[g^2] again,
                        # not a missing square_avg to start at zero)
                        created[p] = new = self._formatted(group, p, states[i]) or dict(states[i])
                    for key in wanted:
                        columns[key][i] = new[key]
        return {"params": params, "grads": grads, **columns}

    def _gather_converted(self, group, wanted, created) -> dict[str, list]:
        """As :meth:`_gather_eager`, for a group without state_dtype whose state may be in
        another format: each parameter's is converted to torch's (into ``created``) where it is
        not — a parameter without a gradient's too, so that the group is in torch's format
        after this step and the next one takes the steady path."""
        params = []
        columns: dict[str, list] = {key: [] for key in wanted}
        for p in group["params"]:
            state = created[p] if created and p in created else self.state.get(p, _NO_STATE)
            if p.grad is None:
                if state and not _in_torch_format(state, p):
                    created[p] = self._formatted(group, p, state) or dict(state)
                continue
            new = self._formatted(group, p, state)
            if new is not None:
                state = created[p] = new
            params.append(p)
            for key in wanted:
                columns[key].append(state[key])
        return {"params": params, "grads": list(map(_GRAD, params)), **columns}

    def _gather_lowbit(self, group, created, original=None) -> tuple[list, ...]:
        """The lists of a group with a ``state_dtype``, and a seventh item: the int8 scales of
        each buffer (None for float buffers). Each parameter's buffers are in its format (see
        :mod:`rmsprop.lowbit`); state in another format (``state_dtype`` or
        ``int8_min_numel`` changed since it was made) is converted, into ``created`` like new
        state (under torch.compile, directly, as ``_init_group`` does)."""
        centered, momentum = group["centered"], group["momentum"] > 0
        params, grads, steps = [], [], []
        buffers: tuple[list, list, list] = ([], [], [])
        scales: tuple[list, list, list] = ([], [], [])
        slots = [0] + ([1] if centered else []) + ([2] if momentum else [])
        compiling = torch.compiler.is_compiling()
        if not compiling:
            self._mark_lowbit(group, original)
        for p in group["params"]:
            if p.grad is None:
                continue
            params.append(p)
            grads.append(p.grad)
            # (a parameter listed twice: its second entry steps the state its first one made;
            # `created` is empty in the steady state, and `in` would hash every parameter)
            state = created[p] if created and p in created else self.state.get(p, _NO_STATE)
            fmt, dtype = lowbit.target(group["state_dtype"], group["int8_min_numel"], p)
            keys = lowbit.buffer_keys(fmt, centered, momentum)
            new = self._formatted(group, p, state, (keys, dtype))
            if new is not None:
                state = new
                if compiling:
                    self.state[p] = state
                else:
                    created[p] = state
            steps.append(state["step"])
            for slot, key in zip(slots, keys, strict=True):
                buffers[slot].append(state[key])
                scales[slot].append(state.get(key + "_scale"))
        return (params, grads, *buffers, steps, scales)

    def _init_group(self, group, params, grads, square_avgs, grad_avgs, momentum_buffers, steps) -> bool:
        """torch's hook, by torch's name and signature: append the group's tensors to the lists,
        creating missing state at once. Under torch.compile, dynamo runs a method of this name
        eagerly at trace time and guards on the state it made (as for torch's optimizers), so
        the first step's graph is the steady state's. Returns whether any parameter is complex."""
        wanted = ["step", "square_avg"] + (["momentum_buffer"] if group["momentum"] > 0 else [])
        wanted += ["grad_avg"] if group["centered"] else []
        columns = {
            "step": steps,
            "square_avg": square_avgs,
            "momentum_buffer": momentum_buffers,
            "grad_avg": grad_avgs,
        }
        has_complex = False
        for p in group["params"]:
            if p.grad is None:
                continue
            has_complex |= torch.is_complex(p)
            params.append(p)
            grads.append(p.grad)
            state = self.state.get(p, _NO_STATE)
            new = self._formatted(group, p, state)  # (state_dtype switched to None: converted)
            if new is not None:
                state = self.state[p] = new
            for key in wanted:
                columns[key].append(state[key])
        return has_complex

    @_use_grad_for_differentiable
    def step(self, closure=None):  # type: ignore[override]
        """Perform a single optimization step: every group is validated before any is updated.

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss.
        """
        self._accelerator_graph_capture_health_check()

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        created: dict[Tensor, dict[str, Any]] = {}
        # options edited in param_groups since they entered are checked again, before anything
        # (eagerly: under compile the group's values are graph constants, guarded by dynamo)
        groups = self.param_groups
        if not torch.compiler.is_compiling():
            groups = [validate_group(g, where=f"param group {i}") for i, g in enumerate(groups)]
        order = _StateOrder(self.state)  # (reads nothing until a group asks: never under compile)
        work = [
            (group, self._gather(group, created, order, original))
            for group, original in zip(groups, self.param_groups, strict=True)
        ]
        work = [(group, lists) for group, lists in work if lists[0]]
        # One group validates inside its own call (nothing of the step is written before);
        # several are all validated first, so that a bad one leaves every group unchanged.
        single = len(work) == 1
        steps = [
            functional.prepare(
                *lists[:6],
                scales=lists[6] if len(lists) > 6 else None,
                lr=group["lr"],
                rule=Rule.from_group(group),
                foreach=group["foreach"],
                fused=group["fused"],
                differentiable=group["differentiable"],
                capturable=group["capturable"],
                grad_scale=grad_scale,
                found_inf=found_inf,
                cache=self._fused_cache,
                check_now=not single,
                lazy_sparse=group["lazy_sparse"],
            )
            for group, lists in work
        ]
        if single:
            steps[0]()
            self.state.update(created)
        else:
            self.state.update(created)
            for run in steps:
                run()
        if not torch.compiler.is_compiling():
            self._fused_cache.sweep()
        return loss
