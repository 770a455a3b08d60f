"""Run the real peer optimizers (Keras 3 on torch, optax on CPU jax, timm's RMSpropTF).

Each function takes a float64 NumPy start point and gradient sequence and returns the parameter
after every step. The peers are test dependencies: a missing one fails the suite, it never skips.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import torch


def keras_rmsprop(param: np.ndarray, grads: list[np.ndarray], **kwargs) -> np.ndarray:
    import keras

    assert keras.backend.backend() == "torch", "tests must run Keras on its torch backend"
    var = keras.Variable(param.copy(), dtype="float64")
    opt = keras.optimizers.RMSprop(**kwargs)
    for g in grads:
        opt.apply([torch.tensor(g, dtype=torch.float64)], [var])
    return keras.ops.convert_to_numpy(var.value)


def optax_rmsprop(param: np.ndarray, grads: list[np.ndarray], **kwargs) -> np.ndarray:
    import jax

    jax.config.update("jax_enable_x64", True)  # compare in float64, like the reference
    import jax.numpy as jnp
    import optax

    p = jnp.asarray(param, dtype=jnp.float64)
    tx = optax.rmsprop(**kwargs)
    state = tx.init(p)
    for g in grads:
        updates, state = tx.update(jnp.asarray(g, dtype=jnp.float64), state, p)
        p = optax.apply_updates(p, updates)
    return np.asarray(p)


def load_timm_rmsprop_tf() -> type:
    """timm.optim.RMSpropTF, loaded from its own files: importing the timm package pulls in
    torchvision, which this project does not need. The module's relative imports (._helpers,
    ._types) resolve inside a stand-in package pointing at timm/optim."""
    name = "_timm_optim_only"
    if name not in sys.modules:
        spec = importlib.util.find_spec("timm")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("timm is not installed: pip install --no-deps timm (see README)")
        package = types.ModuleType(name)
        package.__path__ = [str(Path(next(iter(spec.submodule_search_locations))) / "optim")]
        sys.modules[name] = package
    return importlib.import_module(f"{name}.rmsprop_tf").RMSpropTF


def timm_rmsprop(param: np.ndarray, grads: list[np.ndarray], **kwargs) -> np.ndarray:
    cls = load_timm_rmsprop_tf()
    p = torch.tensor(param, dtype=torch.float64, requires_grad=True)
    opt = cls([p], **kwargs)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return p.detach().numpy()


def tf1_documented(
    param: np.ndarray, grads: list[np.ndarray], lr, decay=0.9, momentum=0.0, epsilon=1e-10, centered=False
):
    """The formula documented for TF1's ApplyRMSProp / ApplyCenteredRMSProp ops, in TF's order:
    ms <- ms + (g^2 - ms)(1 - rho); mg <- mg + (g - mg)(1 - rho);
    mom <- momentum * mom + lr * g / sqrt(ms [- mg^2] + eps); var <- var - mom; ms starts at 1."""
    var = param.astype(np.float64).copy()
    ms, mg, mom = np.ones_like(var), np.zeros_like(var), np.zeros_like(var)
    for g in grads:
        ms = ms + (g * g - ms) * (1 - decay)
        denom = ms + epsilon
        if centered:
            mg = mg + (g - mg) * (1 - decay)
            denom = ms - mg * mg + epsilon
        mom = momentum * mom + lr * g / np.sqrt(denom)
        var = var - mom
    return var


def sb3_rmsprop_tf_like() -> type:
    """Stable-Baselines3's RMSpropTFLike, the real class (stable-baselines3 is a test dependency)."""
    from stable_baselines3.common.sb2_compat.rmsprop_tf_like import RMSpropTFLike

    return RMSpropTFLike


def dqn_transcribed(param: np.ndarray, grads: list[np.ndarray], lrs: list[float], wc: float = 0.0) -> np.ndarray:
    """DeepMind's DQN update (NeuralQLearner.lua, Nature 2015), op by op in its order, in float64.
    There dw is minus the loss gradient and the update is added; here grads are torch's (the loss
    gradient), so dw = -grad (minus the weight cost wc * w, DQN's L2 term):

        g  = g * 0.95 + 0.05 * dw
        g2 = g2 * 0.95 + 0.05 * dw^2
        tmp = sqrt(-(g * g) + g2 + 0.01)
        w  = w + lr * dw / tmp
    """
    w = param.astype(np.float64).copy()
    g, g2 = np.zeros_like(w), np.zeros_like(w)
    for grad, lr in zip(grads, lrs, strict=True):
        dw = -grad - wc * w
        g = g * 0.95 + 0.05 * dw
        g2 = g2 * 0.95 + 0.05 * (dw * dw)
        tmp = np.sqrt(-(g * g) + g2 + 0.01)
        w = w + lr * dw / tmp
    return w


def a3c_paper(param: np.ndarray, grads: list[np.ndarray], lrs: list[float], alpha=0.99, eps=0.1) -> np.ndarray:
    """The A3C paper's RMSProp (Mnih et al. 2016, section "Optimization"), in float64:
    g <- alpha g + (1 - alpha) dtheta^2;  theta <- theta - eta dtheta / sqrt(g + eps)."""
    theta = param.astype(np.float64).copy()
    g = np.zeros_like(theta)
    for d, eta in zip(grads, lrs, strict=True):
        g = alpha * g + (1 - alpha) * d * d
        theta = theta - eta * d / np.sqrt(g + eps)
    return theta


def tf_sparse_apply_rmsprop(
    var: np.ndarray,
    steps: list[tuple[np.ndarray, np.ndarray]],
    lrs: list[float],
    rho=0.9,
    momentum=0.0,
    epsilon=1e-10,
    centered=False,
    ms0=1.0,
) -> dict[str, np.ndarray]:
    """TensorFlow's SparseApplyRMSProp / SparseApplyCenteredRMSProp kernels (training_ops.cc),
    transcribed in float64, behind TF's optimizer layer, which sums duplicate indices first
    (Optimizer._apply_sparse_duplicate_indices). Each step is (indices, values) with values of
    shape [len(indices), *var.shape[1:]]. Per row i present, in the kernel's order:

        ms  = ms * rho + grad^2 * (1 - rho)
        mg  = mg * rho + grad * (1 - rho)                         (centered)
        den = ms + eps - mg^2   (centered)   or   ms + eps
        mom = mom * momentum + rsqrt(den) * lr * grad
        var = var - mom

    Rows absent from a step are not touched. ms starts at ms0 (TF1's RMSPropOptimizer: ones)."""
    var = var.astype(np.float64).copy()
    ms, mg, mom = np.full_like(var, ms0), np.zeros_like(var), np.zeros_like(var)
    for (indices, values), lr in zip(steps, lrs, strict=True):
        unique = np.unique(indices)
        summed = np.zeros((len(unique), *var.shape[1:]))
        np.add.at(summed, np.searchsorted(unique, indices), values)
        for i, grad in zip(unique, summed, strict=True):
            ms[i] = ms[i] * rho + grad * grad * (1 - rho)
            if centered:
                mg[i] = mg[i] * rho + grad * (1 - rho)
                den = ms[i] + epsilon - mg[i] * mg[i]
            else:
                den = ms[i] + epsilon
            mom[i] = mom[i] * momentum + (1 / np.sqrt(den)) * lr * grad
            var[i] = var[i] - mom[i]
    return {"var": var, "ms": ms, "mg": mg, "mom": mom}
