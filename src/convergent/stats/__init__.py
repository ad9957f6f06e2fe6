"""Statistics for statistics-aware merges (Fisher diagonals, Gram matrices), computed with transformers."""

from convergent.stats.compute import (
    KINDS,
    Statistics,
    StatisticsError,
    check_statistics,
    compute_fisher,
    compute_gram,
    compute_statistics,
    read_metadata,
    save_statistics,
)
from convergent.stats.data import DataError, load_texts

__all__ = [
    "KINDS",
    "DataError",
    "Statistics",
    "StatisticsError",
    "check_statistics",
    "compute_fisher",
    "compute_gram",
    "compute_statistics",
    "load_texts",
    "read_metadata",
    "save_statistics",
]
