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
