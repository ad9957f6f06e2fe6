"""Root of the ``convergent`` command: one Typer app, command groups per module.

Each ``*_cmds`` module owns the commands of one area and exposes
``register(app)``. Errors raised as ``ConvergentError`` become one clear line
on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import sys

import typer

from convergent.cli import demo_cmds, lora_cmds, merge_cmds, node_cmds, set_cmds, stats_cmds
from convergent.errors import ConvergentError

app = typer.Typer(
    name="convergent",
    help="Merge neural-network checkpoints, alone or as replicated merge sets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _module in (merge_cmds, set_cmds, node_cmds, stats_cmds, lora_cmds, demo_cmds):
    _module.register(app)


def main() -> None:
    try:
        app()
    except ConvergentError as exc:
        hint = f" ({exc.hint})" if exc.hint else ""
        print(f"error: {exc.message}{hint}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted; nothing was left half-written", file=sys.stderr)
        sys.exit(130)
