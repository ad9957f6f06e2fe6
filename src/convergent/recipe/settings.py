"""Evaluate a mergekit parameter setting for one tensor.

A setting is a scalar; a gradient (a list: numbers are interpolated linearly
over ``t`` in [0, 1], other values are picked by position); or conditions
(``{filter, value}``; the first whose ``filter`` is a substring of the tensor
name, or is missing or ``*``, applies). ``t`` is a layer's relative depth
within its slice (0 for tensors outside numbered layers), as in mergekit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from convergent.recipe.schema import Condition


def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    """The value of ``setting`` for ``tensor_name`` at depth ``t``; None if no condition matches."""
    if isinstance(setting, Condition):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(c, Condition) for c in setting):
            for cond in setting:
                if cond.filter in (None, "*") or cond.filter in tensor_name:
                    return evaluate(cond.value, tensor_name, t)
            return None
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting)
        if not numeric:
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        lo = int(scaled)
        hi = min(len(setting) - 1, lo + 1)
        frac = scaled - lo
        return (1 - frac) * setting[lo] + frac * setting[hi]
    return setting


def evaluate_all(layers: Iterable[Mapping[str, Any] | None], tensor_name: str, t: float) -> dict[str, Any]:
    """Merge settings from highest to lowest precedence; the first that defines a name wins."""
    out: dict[str, Any] = {}
    for settings in layers:
        for key, setting in (settings or {}).items():
            if key in out:
                continue
            value = evaluate(setting, tensor_name, t)
            if value is not None:
                out[key] = value
    return out
