"""Errors that tell the user what is wrong and what to do next.

Every error raised on purpose by convergent is a ``ConvergentError``; the CLI
prints its message (and hint) on one line and exits non-zero, never a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConvergentError(Exception):
    """Base class: ``message`` says what is wrong, ``hint`` what to do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)


class CheckpointError(ConvergentError):
    """A checkpoint is missing, unreadable, corrupt or inconsistent."""


class MergeInputError(ConvergentError):
    """Inputs cannot be merged together (names, shapes, dtypes, values)."""


class RecipeError(ConvergentError):
    """A recipe, strategy or parameter is invalid."""


class OutputError(ConvergentError):
    """The output location cannot be written as asked."""


class StoreError(ConvergentError):
    """The contribution store is missing something or is inconsistent."""


class IntegrityError(StoreError):
    """Bytes do not match the hash they claim; nothing was kept."""


class SignatureError(ConvergentError):
    """A signature is missing, malformed or does not verify."""


class SyncError(ConvergentError):
    """A peer could not be reached or answered something unusable."""


def suggest(name: str, choices: Iterable[str]) -> str | None:
    """A 'did you mean' hint for a misspelt ``name``, or None."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'?" if close else None
