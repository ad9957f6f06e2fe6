"""Shared CLI plumbing: JSON output, progress bars, size parsing."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from convergent.errors import RecipeError

#: Messages and progress go to stderr; data (tables, JSON) to stdout.
console = Console(stderr=True)
out = Console()

_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "M": 1000**2,
    "MB": 1000**2,
    "G": 1000**3,
    "GB": 1000**3,
    "T": 1000**4,
    "TB": 1000**4,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
}


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000, '512MiB' -> 536870912, '1000' -> 1000 (bytes)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _UNITS:
        raise RecipeError(f"cannot read size '{text}'", "write it like 2GB, 512MB or 1.5GiB")
    return int(float(match.group(1)) * _UNITS[unit])


def parse_pairs(items: list[str] | None, what: str) -> dict[str, Any]:
    """['density=0.5', 'normalize=true'] -> {'density': 0.5, 'normalize': True}."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise RecipeError(f"{what} '{item}' is not key=value", f"write it like --{what} density=0.5")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return out


def emit_json(data: Any) -> None:
    """Print ``data`` as JSON on stdout (for --json)."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def progress_bar(description: str, total: int, enabled: bool) -> Iterator[Any]:
    """A rich progress bar when ``enabled`` and stderr is a terminal; yields advance(n)."""
    if not enabled or not console.is_terminal:
        yield lambda done, total_=None: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total)

        def update(done: int, total_: int | None = None) -> None:
            progress.update(task, completed=done, total=total_ if total_ is not None else total)

        yield update
