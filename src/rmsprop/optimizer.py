"""rmsprop.RMSprop: torch.optim.RMSprop, bit for bit, plus every published RMSProp variant."""

from __future__ import annotations

import operator
from itertools import repeat
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import (
    Optimizer,
    ParamsT,
    _get_capturable_supported_devices,
    _get_scalar_dtype,
    _use_grad_for_differentiable,
)

from .functional import StepCache, fused_refusal, rmsprop
from .rule import Rule, validate_hyperparameters

__all__ = ["RMSprop"]

_GRAD, _LAYOUT = operator.attrgetter("grad"), operator.attrgetter("layout")

# Group keys this library adds to torch's; torch checkpoints lack them, so they get these values.
_EXTENSION_DEFAULTS: dict[str, Any] = {
    "fused": None,
    "eps_in_sqrt": False,
    "nesterov": False,
    "decoupled_weight_decay": False,
    "lr_in_momentum": False,
    "initial_square_avg": 0.0,
    "bias_correction": False,
}
# Optional torch keys, with the values torch.optim.RMSprop.__setstate__ gives old checkpoints.
_TORCH_DEFAULTS: dict[str, Any] = {
    "momentum": 0,
    "centered": False,
    "foreach": None,
    "maximize": False,
    "differentiable": False,
    "capturable": False,
}


class RMSprop(Optimizer):
    r"""RMSProp, a drop-in for :class:`torch.optim.RMSprop` with every published variant.

    With only torch's arguments, results are bit-identical to ``torch.optim.RMSprop`` on the same
    path (``foreach=False``: per-tensor, ``foreach=True``: multi-tensor, or ``fused=False``: what
    torch picks); by default CPU tensors take the fused kernel, equal to those paths up to
    rounding, in one pass over memory. The state dict has
    torch's keys and layout (``step``, ``square_avg``, ``momentum_buffer``, ``grad_avg``), so
    checkpoints move both ways.

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
        fused: ``None`` (default) uses the fused CPU kernel wherever it supports the tensors;
            ``True`` forces it (RuntimeError where it cannot); ``False`` keeps torch's op paths.
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
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        fused: bool | None = None,
        eps_in_sqrt: bool = False,
        nesterov: bool = False,
        decoupled_weight_decay: bool = False,
        lr_in_momentum: bool = False,
        initial_square_avg: float = 0.0,
        bias_correction: bool = False,
    ) -> None:
        validate_hyperparameters(
            lr=lr,
            alpha=alpha,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            initial_square_avg=initial_square_avg,
            bias_correction=bias_correction,
        )
        if fused and foreach:
            raise RuntimeError("fused=True and foreach=True cannot both be set")
        if fused and differentiable:
            raise RuntimeError("fused=True does not support differentiable=True")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "alpha": alpha,
            "eps": eps,
            "centered": centered,
            "weight_decay": weight_decay,
            "capturable": capturable,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "fused": fused,
            "eps_in_sqrt": eps_in_sqrt,
            "nesterov": nesterov,
            "decoupled_weight_decay": decoupled_weight_decay,
            "lr_in_momentum": lr_in_momentum,
            "initial_square_avg": initial_square_avg,
            "bias_correction": bias_correction,
        }
        super().__init__(params, defaults)
        self._step_cache = StepCache()

    @property
    def _step_supports_amp_scaling(self) -> bool:  # type: ignore[override]
        """GradScaler hands ``grad_scale`` / ``found_inf`` to step() instead of unscaling the
        gradients itself only where the step consumes them: as torch sets the flag only for
        ``fused=True``. Elsewhere GradScaler unscales as usual, so gradient clipping after
        ``scaler.unscale_`` (Lightning's ``gradient_clip_val`` under mixed precision) works."""
        return any(group.get("fused") is True for group in getattr(self, "param_groups", ()))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's, but the group's own hyperparameters are validated before it is added."""
        merged = {**self.defaults, **param_group}
        validate_hyperparameters(
            lr=merged["lr"],
            alpha=merged["alpha"],
            eps=merged["eps"],
            weight_decay=merged["weight_decay"],
            momentum=merged["momentum"],
            nesterov=merged["nesterov"],
            initial_square_avg=merged["initial_square_avg"],
            bias_correction=merged["bias_correction"],
        )
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._step_cache = StepCache()  # plans hold raw addresses: never carried over
        for group in self.param_groups:
            for key, value in {**_TORCH_DEFAULTS, **_EXTENSION_DEFAULTS}.items():
                group.setdefault(key, value)
            for p in group["params"]:
                p_state = self.state.get(p, [])
                if len(p_state) != 0 and not torch.is_tensor(p_state["step"]):
                    step_val = float(p_state["step"])
                    p_state["step"] = (
                        torch.tensor(step_val, dtype=_get_scalar_dtype(), device=p.device)
                        if group["capturable"]
                        else torch.tensor(step_val, dtype=_get_scalar_dtype())
                    )

    # ------------------------------------------------------------------ validation before mutation

    def _check_step_inputs(self) -> dict[int, Any]:
        """Raise before any tensor is touched, so a bad step leaves every group unchanged.

        Afterwards every gradient is a strided (dense) tensor; the backends rely on it. Returns,
        by group id, the cached fused steps validated on the way (their plans prove everything
        the fused=True refusal would check, so that check is skipped for them).
        """
        ready: dict[int, Any] = {}
        for group in self.param_groups:
            grads = [g for g in map(_GRAD, group["params"]) if g is not None]
            if not all(map(operator.is_, map(_LAYOUT, grads), repeat(torch.strided))):
                bad = next(g for g in grads if g.layout is not torch.strided)
                raise RuntimeError(
                    "RMSprop does not support sparse gradients "
                    f"(a parameter of shape {tuple(bad.shape)} has a {bad.layout} .grad); nothing was updated"
                )
            if group["capturable"] and not torch.compiler.is_compiling():
                devices = _get_capturable_supported_devices()
                bad = next((p.device.type for p in group["params"] if p.device.type not in devices), None)
                if bad is not None:
                    raise RuntimeError(
                        f"capturable=True requires parameters on a capturable device ({devices}), "
                        f"got {bad}; nothing was updated"
                    )
            run = self._step_cache.prepare(group, self.state, Rule.from_group(group))
            if run is not None:
                ready[id(group)] = run
            elif group["fused"]:
                with_grad = [p for p in group["params"] if p.grad is not None]
                reason = fused_refusal(with_grad, [p.grad for p in with_grad])
                if reason is not None:
                    raise RuntimeError(f"{reason}; nothing was updated")
        return ready

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, after checking every state tensor against its parameter.

        torch checks only the number of groups and parameters; this also checks that each state
        tensor exists where the saved options need it, has the parameter's shape, and a dtype of
        the same kind (floating state is cast to the parameter's float dtype, as torch does, so
        a checkpoint moves between precisions). On any mismatch it raises ValueError and the
        optimizer is left as it was.
        """
        groups = self.param_groups
        saved_groups = state_dict.get("param_groups")
        saved_state = state_dict.get("state")
        if not isinstance(saved_groups, list) or not isinstance(saved_state, dict):
            raise ValueError("state_dict must have a 'param_groups' list and a 'state' dict")
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, the optimizer has {len(groups)}"
            )
        for gi, (group, saved) in enumerate(zip(groups, saved_groups, strict=True)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"group {gi}: the loaded state dict has {len(saved['params'])} parameters, "
                    f"the optimizer has {len(group['params'])}"
                )
            for param, pid in zip(group["params"], saved["params"], strict=True):
                entry = saved_state.get(pid)
                if entry:
                    _check_param_state(entry, param, saved, where=f"group {gi}, parameter id {pid}")
        # torch replaces each group with the saved one. A checkpoint without "fused" (torch's own)
        # says nothing about the kernel, so the group keeps the choice it was built with; missing
        # algorithm switches take their torch values (False) in __setstate__.
        state_dict = {
            **state_dict,
            "param_groups": [
                saved if "fused" in saved else {**saved, "fused": group["fused"]}
                for group, saved in zip(groups, saved_groups, strict=True)
            ],
        }
        super().load_state_dict(state_dict)
        self._step_cache.clear()

    # ------------------------------------------------------------------ the step

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        square_avgs: list[Tensor],
        momentum_buffers: list[Tensor],
        grad_avgs: list[Tensor],
        steps: list[Tensor],
    ) -> bool:
        """Gather the group's tensors (creating state lazily); return whether any is complex."""
        has_complex = False
        for p in group["params"]:
            if p.grad is None:
                continue
            has_complex |= torch.is_complex(p)
            params.append(p)
            grads.append(p.grad)

            state = self.state[p]
            if len(state) == 0:
                state["step"] = (
                    torch.zeros((), dtype=_get_scalar_dtype(), device=p.device)
                    if group["capturable"]
                    else torch.zeros((), dtype=_get_scalar_dtype())
                )
                state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["initial_square_avg"] != 0:
                    # Complex parameters are updated as (real, imag) pairs: both start at v0.
                    sq = state["square_avg"]
                    (torch.view_as_real(sq) if sq.is_complex() else sq).fill_(group["initial_square_avg"])
                if group["momentum"] > 0:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["centered"]:
                    state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            square_avgs.append(state["square_avg"])
            steps.append(state["step"])
            if group["momentum"] > 0:
                momentum_buffers.append(state["momentum_buffer"])
            if group["centered"]:
                grad_avgs.append(state["grad_avg"])
        return has_complex

    @_use_grad_for_differentiable
    def step(self, closure=None):  # type: ignore[override]
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss.
        """
        self._accelerator_graph_capture_health_check()

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        ready = self._check_step_inputs()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            cached_step = ready.get(id(group))
            if cached_step is not None:
                cached_step(group["lr"], grad_scale, found_inf)
                continue
            rule = Rule.from_group(group)
            params: list[Tensor] = []
            grads: list[Tensor] = []
            square_avgs: list[Tensor] = []
            grad_avgs: list[Tensor] = []
            momentum_buffers: list[Tensor] = []
            steps: list[Tensor] = []
            has_complex = self._init_group(
                group, params, grads, square_avgs, momentum_buffers, grad_avgs, steps
            )
            if not params:
                continue
            all_fused = rmsprop(
                params,
                grads,
                square_avgs,
                grad_avgs,
                momentum_buffers,
                steps,
                lr=group["lr"],
                rule=rule,
                foreach=group["foreach"],
                fused=group["fused"],
                differentiable=group["differentiable"],
                capturable=group["capturable"],
                has_complex=has_complex,
                grad_scale=grad_scale,
                found_inf=found_inf,
            )
            if all_fused:
                lists = (params, grads, square_avgs, grad_avgs, momentum_buffers, steps)
                self._step_cache.remember(group, self.state, lists)
        return loss


def _check_param_state(entry: dict[str, Any], param: Tensor, saved_group: dict[str, Any], where: str) -> None:
    """Raise ValueError unless ``entry`` is a usable RMSprop state for ``param``."""
    needed = ["step", "square_avg"]
    if saved_group.get("momentum", 0) > 0:
        needed.append("momentum_buffer")
    if saved_group.get("centered", False):
        needed.append("grad_avg")
    missing = [k for k in needed if k not in entry]
    if missing:
        raise ValueError(f"{where}: the state lacks {missing}, which its saved options need")
    for key in ("square_avg", "momentum_buffer", "grad_avg"):
        if key not in entry:
            continue
        value = entry[key]
        if not isinstance(value, Tensor):
            raise ValueError(f"{where}: state['{key}'] is a {type(value).__name__}, not a tensor")
        if value.shape != param.shape:
            raise ValueError(
                f"{where}: state['{key}'] has shape {tuple(value.shape)}, "
                f"the parameter has shape {tuple(param.shape)}"
            )
        same_kind = (
            value.is_complex() == param.is_complex()
            and value.is_floating_point() == param.is_floating_point()
        )
        if not same_kind:
            raise ValueError(
                f"{where}: state['{key}'] has dtype {value.dtype}, "
                f"which cannot hold state for a {param.dtype} parameter"
            )
        if param.is_complex() and value.dtype != param.dtype:
            raise ValueError(
                f"{where}: state['{key}'] has dtype {value.dtype}, the parameter {param.dtype} "
                "(torch does not cast complex state)"
            )
