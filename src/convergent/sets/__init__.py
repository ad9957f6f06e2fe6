"""Merge sets: a replicated OR-Set of contributions, resolved by a strategy (DESIGN.md, Layer 1).

Names are imported lazily so ``convergent.store`` and ``convergent.sets`` can
use each other's low-level modules without import cycles.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AddTag": "model",
    "Contribution": "model",
    "Genesis": "model",
    "Manifest": "model",
    "SetState": "model",
    "TensorEntry": "model",
    "JoinResult": "mergeset",
    "MergeSet": "mergeset",
    "ResolveResult": "mergeset",
    "ORSet": "orset",
    "merkle_root": "merkle",
    "export_bundle": "bundle",
    "import_bundle": "bundle",
    "StoredCheckpoint": "source",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
