"""rmsprop: RMSProp for PyTorch — torch.optim.RMSprop's interface, bit-exact on torch's paths
(``fused=False``), a fused CPU kernel by default, and every published variant.

>>> import rmsprop
>>> optimizer = rmsprop.RMSprop(model.parameters(), lr=0.01, alpha=0.9, eps=1e-8)  # doctest: +SKIP
"""

from .optimizer import RMSprop
from .presets import PRESETS, Preset, from_preset

__version__ = "0.1.0"

__all__ = ["RMSprop", "from_preset", "PRESETS", "Preset", "__version__"]
