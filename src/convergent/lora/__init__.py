"""LoRA-aware merging: PEFT adapters merged as low-rank deltas, concatenated or re-factorised, and folded.

See :mod:`convergent.lora.merge` for the methods and harmonisation rules, and
``docs/lora.md`` for the commands.
"""

from convergent.lora.adapters import LoraAdapter, LoraModule, open_adapter
from convergent.lora.merge import (
    DELTA_METHODS,
    FACTOR_METHODS,
    FoldResult,
    LoraMergeResult,
    fold_adapter,
    lowrank_factors,
    merge_adapters,
    merged_delta,
    plan_modules,
    truncated_factors,
)

__all__ = [
    "DELTA_METHODS",
    "FACTOR_METHODS",
    "FoldResult",
    "LoraAdapter",
    "LoraMergeResult",
    "LoraModule",
    "fold_adapter",
    "lowrank_factors",
    "merge_adapters",
    "merged_delta",
    "open_adapter",
    "plan_modules",
    "truncated_factors",
]
