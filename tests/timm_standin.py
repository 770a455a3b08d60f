"""Import timm's real optimizer registry without torchvision.

`import timm` runs timm/__init__.py, which imports timm.layers and timm.models, which import
torchvision; torchvision does not load beside the CPU torch build this project is tested with.
timm.optim itself needs only two functions from those packages: timm.models.group_parameters (for
layer decay) and, through it, timm.layers.use_reentrant_ckpt. So the three package __init__ files
(timm, timm.layers, timm.models) are replaced by stand-ins that execute nothing, each exposing
only what timm.optim imports, taken from timm's own files (layers/config.py,
models/_manipulate.py). Everything else -- timm/optim/__init__.py, _optim_factory.py (the
registry, create_optimizer_v2, name parsing), _param_groups.py, lookahead.py, rmsprop_tf.py --
is timm's code, run unchanged.

Not run: timm's package __init__ files and anything that needs torchvision (models, data,
train.py). `installed()` puts the stand-ins in sys.modules and removes every timm module again
on exit, so no other test sees them.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path


def _package(name: str, path: Path) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__spec__.submodule_search_locations = [str(path)]
    sys.modules[name] = module
    return module


@contextlib.contextmanager
def installed() -> Iterator[types.ModuleType]:
    """Yield the real ``timm.optim`` package, importable as ``timm.optim`` meanwhile."""
    if any(name == "timm" or name.startswith("timm.") for name in sys.modules):
        raise RuntimeError("a timm module is already imported; the stand-ins would shadow it")
    spec = importlib.util.find_spec("timm")  # locates timm without running its __init__
    if spec is None or spec.origin is None:
        raise ImportError("timm is not installed: pip install --no-deps timm (see README)")
    root = Path(spec.origin).parent
    try:
        _package("timm", root)
        layers = _package("timm.layers", root / "layers")
        layers.use_reentrant_ckpt = importlib.import_module("timm.layers.config").use_reentrant_ckpt
        models = _package("timm.models", root / "models")
        models.group_parameters = importlib.import_module("timm.models._manipulate").group_parameters
        yield importlib.import_module("timm.optim")
    finally:
        for name in [n for n in sys.modules if n == "timm" or n.startswith("timm.")]:
            del sys.modules[name]
