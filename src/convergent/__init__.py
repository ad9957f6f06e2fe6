"""convergent: merge neural-network checkpoints, alone or as a replicated merge set."""

__version__ = "0.1.0"
