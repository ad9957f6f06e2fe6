"""Reading the user's examples: a text file (one example per line) or JSONL with a ``text`` field.

Rules:

* ``*.jsonl`` / ``*.ndjson`` files are JSON Lines: every non-empty line is an
  object with a string ``text`` field.
* Any other file whose first non-empty line is a JSON object with a ``text``
  field is read as JSON Lines too; otherwise every non-empty line is one
  example (surrounding whitespace stripped).
* Blank lines are skipped. ``max_samples`` keeps the first N examples.

Problems (missing file, no examples, a bad JSONL line) are a
:class:`DataError` saying which file and line.
"""

from __future__ import annotations

import json
from pathlib import Path

from convergent.errors import ConvergentError

_JSONL_SUFFIXES = (".jsonl", ".ndjson")


class DataError(ConvergentError):
    """The examples file is missing, empty or malformed."""


def _as_object(line: str) -> dict | None:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def load_texts(path: str | Path, max_samples: int | None = None) -> list[str]:
    """The examples in ``path`` (at most ``max_samples``); DataError when there are none."""
    path = Path(path)
    if max_samples is not None and max_samples < 1:
        raise DataError(f"--max-samples must be at least 1, got {max_samples}")
    if not path.exists():
        raise DataError(f"data file {path} not found", "give a text file (one example per line) or a JSONL file")
    if not path.is_file():
        raise DataError(f"data file {path} is not a file", "give a text file (one example per line) or a JSONL file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"data file {path} is not UTF-8 text", "give a text or JSONL file") from None
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if not numbered:
        raise DataError(f"data file {path} has no examples", "write one example per line, or JSONL with a 'text' field")
    first = _as_object(numbered[0][1])
    jsonl = path.suffix.lower() in _JSONL_SUFFIXES or (first is not None and "text" in first)
    texts: list[str] = []
    for lineno, line in numbered:
        if max_samples is not None and len(texts) >= max_samples:
            break
        if not jsonl:
            texts.append(line.strip())
            continue
        obj = _as_object(line)
        if obj is None:
            raise DataError(f"{path}:{lineno}: not a JSON object", 'every line of a JSONL file is {"text": ...}')
        text = obj.get("text")
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: no string 'text' field", 'every line of a JSONL file is {"text": ...}')
        if text.strip():
            texts.append(text)
    if not texts:
        raise DataError(f"data file {path} has no non-empty examples")
    return texts
