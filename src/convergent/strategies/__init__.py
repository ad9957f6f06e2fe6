"""Merge strategies: pure functions registered by name (see ``api``).

Every module in this package registers its family on import; importing the
package imports them all, so a new strategy needs only a new module here.
``REGISTRY`` maps names to :class:`~convergent.strategies.api.Strategy`.
"""

import importlib
import pkgutil

from convergent.strategies.api import REGISTRY, ModelParams, Params, Strategy, TensorTask, strategy
from convergent.strategies.run import get_strategy, merge_tensors

_INFRASTRUCTURE = {"api", "run", "reduce", "fused_kernels", "kernels"}

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in _INFRASTRUCTURE and not _module.startswith("_"):
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["REGISTRY", "ModelParams", "Params", "Strategy", "TensorTask", "get_strategy", "merge_tensors", "strategy"]
