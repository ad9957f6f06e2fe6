"""The user's evaluation of a merged model: a Python callable or a shell command printing a score.

* ``module:function`` (or ``path/to/file.py:function``): ``function(model_dir)``
  is called with the merged model's folder (a ``str``) and returns a number.
  Modules are imported with the current directory on ``sys.path``.
* A shell command: ``{model}`` in it is replaced by the (quoted) folder, or
  the folder is appended as the last argument when there is no ``{model}``.
  The command must exit 0, and the **last non-empty line** of its standard
  output must end with the score: ``0.8312``, ``score: 0.8312`` and
  ``accuracy=0.8312`` all give 0.8312.

Higher scores are better (negate a loss). A score that is not a finite number,
a command that fails or prints no number, and an exception in the callable are
an :class:`EvaluationError` saying what happened.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from convergent.errors import ConvergentError

_TRAILING_NUMBER = re.compile(r"(?:^|[\s:=])([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf))\s*$", re.I)


class EvaluationError(ConvergentError):
    """The user's evaluation failed or did not return a usable score."""


def load_callable(spec: str) -> Callable[..., Any]:
    """``module:function`` or ``file.py:function`` -> the function."""
    if ":" not in spec:
        raise EvaluationError(f"'{spec}' is not module:function", "write it like mypkg.evals:score or evals.py:score")
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise EvaluationError(f"'{spec}' is not module:function", "write it like mypkg.evals:score")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise EvaluationError(f"evaluation file {path} not found")
            mod_spec = importlib.util.spec_from_file_location(f"_convergent_user_{path.stem}", path)
            if mod_spec is None or mod_spec.loader is None:
                raise EvaluationError(f"cannot import {path}")
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(module_name)
    except EvaluationError:
        raise
    except Exception as exc:
        raise EvaluationError(f"cannot import '{module_name}': {type(exc).__name__}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise EvaluationError(f"'{module_name}' has no function '{attr}'")
    return fn


def as_score(value: Any, what: str) -> float:
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise EvaluationError(f"{what} returned {value!r}, not a number", "return the score as a float") from None
    if not math.isfinite(score):
        raise EvaluationError(f"{what} returned {score}, not a finite number")
    return score


def parse_score(stdout: str, command: str) -> float:
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise EvaluationError(
            f"evaluation command printed nothing: {command}", "print the score as the last line of standard output"
        )
    match = _TRAILING_NUMBER.search(lines[-1].strip())
    if match is None:
        raise EvaluationError(
            f"evaluation command printed no number at the end of its last line ({lines[-1].strip()[:200]!r}): "
            f"{command}",
            "print the score as the last line of standard output, e.g. 'score: 0.83'",
        )
    return as_score(match.group(1), f"evaluation command {command}")


class Evaluator:
    """Scores a merged model folder: higher is better."""

    description: str = ""

    def __call__(self, model_dir: Path) -> float:
        raise NotImplementedError


class CallableEvaluator(Evaluator):
    def __init__(self, fn: Callable[..., Any] | str):
        self.description = fn if isinstance(fn, str) else getattr(fn, "__qualname__", repr(fn))
        self.fn = load_callable(fn) if isinstance(fn, str) else fn

    def __call__(self, model_dir: Path) -> float:
        try:
            value = self.fn(str(model_dir))
        except (KeyboardInterrupt, EvaluationError):
            raise
        except Exception as exc:
            raise EvaluationError(
                f"evaluation function {self.description} raised {type(exc).__name__}: {exc}",
                "the search state is saved; fix the function and run the same command again to resume",
            ) from exc
        return as_score(value, f"evaluation function {self.description}")


class CommandEvaluator(Evaluator):
    def __init__(self, command: str, timeout: float | None = None):
        if not command.strip():
            raise EvaluationError("the evaluation command is empty")
        self.description = command
        self.command = command
        self.timeout = timeout

    def render(self, model_dir: Path) -> str:
        quoted = shlex.quote(str(model_dir))
        if "{model}" in self.command:
            return self.command.replace("{model}", quoted)
        return f"{self.command} {quoted}"

    def __call__(self, model_dir: Path) -> float:
        cmd = self.render(model_dir)
        try:
            proc = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise EvaluationError(f"evaluation command timed out after {self.timeout}s: {cmd}") from None
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise EvaluationError(
                f"evaluation command exited with status {proc.returncode}: {cmd}"
                + (f" ({' | '.join(tail)[:300]})" if tail else ""),
                "the search state is saved; fix the command and run the same search again to resume",
            )
        return parse_score(proc.stdout, cmd)


def make_evaluator(eval_fn: str | Callable[..., Any] | None, eval_cmd: str | None, timeout: float | None = None):
    if (eval_fn is None) == (eval_cmd is None):
        raise EvaluationError("give exactly one of --eval module:function or --eval-cmd 'command {model}'")
    if eval_cmd is not None:
        return CommandEvaluator(eval_cmd, timeout)
    return CallableEvaluator(eval_fn)  # type: ignore[arg-type]
