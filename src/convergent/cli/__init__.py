"""The ``convergent`` command."""
