"""Search over a recipe's merge coefficients against the user's evaluation (CMA-ES or genetic).

The **search space** is one or more numeric parameters of the recipe's merge
method, each within bounds ``[low, high]``:

* a per-model parameter (``weight``, ``density``, ``t`` of nuslerp, ...): one
  coefficient per merged model (the base model, when the method uses one, is
  not searched);
* a global parameter (``lambda``, slerp's ``t``, ...): one coefficient.

With ``layers=K > 1`` each coefficient becomes a mergekit *gradient* of K
values interpolated over depth (layer i of N gets the value at
``i / (N - 1)``), i.e. per-layer coefficients; tensors outside numbered layers
(embeddings, final norm, head) take the first value, as in mergekit.

Each **candidate** is written as a full merge by the engine into a temporary
folder, scored by the evaluation (higher is better; see
:mod:`convergent.search.evaluate`), and deleted. At the end the best candidate
is merged into ``out_dir``, with its recipe (``recipe.yaml``) and the search
summary (``convergent-search.json``) beside the weights.

**Resuming**: with a ``state`` file, the optimiser's full state, the current
generation's candidates and every score so far are saved (atomically) after
each evaluation. Running the same search again with the same state file
continues exactly where it stopped (an interrupted evaluation is redone), and
gives the same candidates, scores and result as an uninterrupted run with the
same seed. A larger ``budget`` extends a finished search. A state file
written for another recipe, space, method or seed is refused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convergent.errors import ConvergentError, OutputError, RecipeError, suggest
from convergent.search.cmaes import CMAES
from convergent.search.genetic import Genetic

METHODS = ("cmaes", "genetic")
STATE_VERSION = 1
Objective = Callable[[list[float]], float]


class SearchError(ConvergentError):
    """A search cannot start or resume as asked."""


# --------------------------------------------------------------------------- optimisation loop


def make_optimizer(method: str, dim: int, seed: int, start: Sequence[float], popsize: int | None, sigma: float):
    if method == "cmaes":
        return CMAES(dim, seed, start, sigma=sigma, popsize=popsize)
    if method == "genetic":
        return Genetic(dim, seed, start, popsize=popsize)
    raise SearchError(f"unknown search method '{method}'", f"use one of: {', '.join(METHODS)}")


def restore_optimizer(state: Mapping[str, Any]):
    kind = state.get("kind")
    if kind == "cmaes":
        return CMAES.from_state(dict(state))
    if kind == "genetic":
        return Genetic.from_state(dict(state))
    raise SearchError(f"state file holds an unknown optimiser '{kind}'")


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Evaluation:
    index: int
    generation: int
    point: list[float]  # in the unit cube
    score: float

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "generation": self.generation, "point": self.point, "score": self.score}


@dataclass
class OptimizeResult:
    history: list[Evaluation]
    best: Evaluation
    resumed_from: int  # evaluations already in the state file when this run started
    finished: bool
    state: dict[str, Any] = field(default_factory=dict)


def optimize(
    objective: Objective,
    *,
    method: str,
    dim: int,
    budget: int,
    seed: int,
    start: Sequence[float] | None = None,
    state_path: str | Path | None = None,
    signature: str = "",
    popsize: int | None = None,
    sigma: float = 0.3,
    progress: Callable[[int, int], None] | None = None,
) -> OptimizeResult:
    """Maximise ``objective`` over [0, 1]^dim with ``budget`` evaluations, resumably.

    ``signature`` identifies the problem; a state file with another signature
    is refused.
    """
    if budget < 1:
        raise SearchError("--budget must be at least 1")
    start = list(start) if start is not None else [0.5] * dim
    if method not in METHODS:
        hint = suggest(method, METHODS) or f"use {' or '.join(METHODS)}"
        raise SearchError(f"unknown search method '{method}'", hint)
    config = {
        "method": method,
        "dim": dim,
        "seed": seed,
        "popsize": popsize,
        "sigma": sigma,
        "start": [float(v) for v in start],
        "problem": signature,
    }
    fingerprint = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    path = Path(state_path) if state_path is not None else None
    state: dict[str, Any]
    if path is not None and path.exists():
        try:
            state = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError) as exc:
            raise SearchError(f"cannot read search state {path}: {exc}", "delete it to start afresh") from None
        if state.get("version") != STATE_VERSION or state.get("fingerprint") != fingerprint:
            raise SearchError(
                f"state file {path} belongs to a different search (recipe, space, method, seed or population differ)",
                "use another --state file, or delete this one to start afresh",
            )
        optimizer = restore_optimizer(state["optimizer"])
    else:
        optimizer = make_optimizer(method, dim, seed, start, popsize, sigma)
        state = {
            "version": STATE_VERSION,
            "fingerprint": fingerprint,
            "config": config,
            "optimizer": optimizer.state(),
            "pending": [],
            "pending_scores": [],
            "history": [],
        }
    history = [Evaluation(h["index"], h["generation"], h["point"], h["score"]) for h in state["history"]]
    resumed_from = len(history)

    def save() -> None:
        state["history"] = [h.to_json() for h in history]
        state["evaluations"] = len(history)
        if history:
            state["best"] = _best(history).to_json()
        if path is not None:
            _write_json(path, state)

    while len(history) < budget:
        if not state["pending"]:
            state["pending"] = optimizer.ask()
            state["pending_scores"] = []
            state["optimizer"] = optimizer.state()  # the generator has advanced past this generation's draws
            save()
        pending, scores = state["pending"], state["pending_scores"]
        while len(scores) < len(pending) and len(history) < budget:
            point = pending[len(scores)]
            score = float(objective(list(point)))
            if not math.isfinite(score):
                raise SearchError(f"the evaluation returned {score} for candidate {len(history)}")
            scores.append(score)
            history.append(Evaluation(len(history), optimizer.generation, list(point), score))
            save()
            if progress is not None:
                progress(len(history), budget)
        if len(scores) == len(pending):
            optimizer.tell(pending, scores)
            state["optimizer"] = optimizer.state()
            state["pending"], state["pending_scores"] = [], []
            save()
    save()
    if not history:
        raise SearchError("no candidate was evaluated")
    return OptimizeResult(history, _best(history), resumed_from, len(history) >= budget, state)


def _best(history: Sequence[Evaluation]) -> Evaluation:
    return max(history, key=lambda h: (h.score, -h.index))


# --------------------------------------------------------------------------- recipe search space


@dataclass(frozen=True)
class Dimension:
    label: str
    param: str
    scope: str  # "model" or "global"
    model: str | None
    knot: int
    low: float
    high: float
    initial: float

    def value(self, u: float) -> float:
        return self.low + float(u) * (self.high - self.low)


def parse_bounds(specs: Sequence[str] | None) -> dict[str, tuple[float, float]]:
    """['weight=0:1', 'density=0.2:1'] -> {'weight': (0, 1), 'density': (0.2, 1)}; default weight=0:1."""
    out: dict[str, tuple[float, float]] = {}
    for spec in specs or ["weight=0:1"]:
        name, _, rng = spec.partition("=")
        name = name.strip()
        if not name:
            raise RecipeError(f"cannot read search parameter '{spec}'", "write it like weight=0:1")
        low, high = 0.0, 1.0
        if rng:
            lo_text, sep, hi_text = rng.partition(":")
            try:
                if not sep:
                    raise ValueError
                low, high = float(lo_text), float(hi_text)
            except ValueError:
                raise RecipeError(f"cannot read bounds '{rng}' of '{name}'", "write them like weight=0:1") from None
        if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
            raise RecipeError(f"bounds of '{name}' must be finite with low < high, got {low}:{high}")
        out[name] = (low, high)
    return out


class SearchSpace:
    """The coefficients of ``recipe`` being searched, and how a point becomes a recipe."""

    def __init__(self, recipe: Any, bounds: Mapping[str, tuple[float, float]], layers: int = 1):
        from convergent.strategies.run import get_strategy

        if layers < 1:
            raise SearchError("--layers must be at least 1")
        self.recipe = recipe
        self.layers = layers
        strat = get_strategy(recipe.merge_method)
        self.models = self._merged_models(recipe, strat.base)
        dims: list[Dimension] = []
        for name, (low, high) in bounds.items():
            if name in strat.model_params.model_fields:
                scope = "model"
                default = strat.model_params.model_fields[name].default
            elif name in strat.params.model_fields:
                scope = "global"
                default = strat.params.model_fields[name].default
            else:
                allowed = sorted(set(strat.model_params.model_fields) | set(strat.params.model_fields))
                hint = suggest(name, allowed)
                raise RecipeError(
                    f"merge method '{recipe.merge_method}' has no parameter '{name}' to search",
                    f"{hint + ' ' if hint else ''}parameters: {', '.join(allowed) or 'none'}",
                )
            owners: list[str | None] = list(self.models) if scope == "model" else [None]
            for owner in owners:
                current = self._current(name, owner)
                start = current if current is not None else default
                if not isinstance(start, (int, float)) or isinstance(start, bool) or not math.isfinite(start):
                    start = (low + high) / 2
                start = min(max(float(start), low), high)
                for knot in range(layers):
                    where = owner if owner is not None else "parameters"
                    label = f"{where}:{name}" + (f"[{knot}]" if layers > 1 else "")
                    dims.append(Dimension(label, name, scope, owner, knot, low, high, start))
        if not dims:
            raise SearchError("nothing to search", "name at least one parameter, e.g. --param weight=0:1")
        self.dims = dims

    @staticmethod
    def _merged_models(recipe: Any, base_role: str) -> list[str]:
        base = recipe.base_model if base_role != "none" else None
        refs: list[str] = []
        if recipe.models:
            candidates = [m.model for m in recipe.models]
        else:
            candidates = [s.model for sl in recipe.slices for s in sl.sources]
            slice_bases = {sl.base_model for sl in recipe.slices if sl.base_model}
            if base_role != "none" and slice_bases:
                base = next(iter(slice_bases))
        for ref in candidates:
            if ref not in refs and ref != base:
                refs.append(ref)
        if not refs:
            raise SearchError("the recipe has no models to weigh besides the base model")
        return refs

    def _current(self, name: str, owner: str | None) -> Any:
        if owner is None:
            return (self.recipe.parameters or {}).get(name)
        entries = self.recipe.models or [s for sl in self.recipe.slices for s in sl.sources]
        for entry in entries:
            if entry.model == owner:
                return (entry.parameters or {}).get(name)
        return None

    @property
    def dim(self) -> int:
        return len(self.dims)

    def start(self) -> list[float]:
        return [(d.initial - d.low) / (d.high - d.low) for d in self.dims]

    def settings(self, point: Sequence[float]) -> dict[tuple[str | None, str], float | list[float]]:
        """(model or None, parameter) -> value, or K values (a depth gradient) with layers > 1."""
        grouped: dict[tuple[str | None, str], list[float]] = {}
        for d, u in zip(self.dims, point):
            grouped.setdefault((d.model, d.param), []).append(d.value(u))
        return {k: (v[0] if self.layers == 1 else v) for k, v in grouped.items()}

    def describe(self, point: Sequence[float]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for (model, param), value in self.settings(point).items():
            out.setdefault(model if model is not None else "parameters", {})[param] = value
        return out

    def recipe_for(self, point: Sequence[float]) -> Any:
        from convergent.recipe.schema import Recipe

        data = self.recipe.model_dump(mode="python", exclude_none=True)
        data = copy.deepcopy(data)
        for (model, param), value in self.settings(point).items():
            if model is None:
                data.setdefault("parameters", {})[param] = value
            elif data.get("models"):
                for entry in data["models"]:
                    if entry["model"] == model:
                        entry.setdefault("parameters", {})[param] = value
            else:
                for sl in data["slices"]:
                    for src in sl["sources"]:
                        if src["model"] == model:
                            src.setdefault("parameters", {})[param] = value
        return Recipe.model_validate(data)

    def signature(self) -> str:
        body = {
            "recipe": self.recipe.model_dump(mode="json", exclude_none=True),
            "dims": [(d.label, d.low, d.high) for d in self.dims],
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def recipe_yaml(recipe: Any) -> bytes:
    import yaml

    return yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False).encode()


@dataclass
class SearchResult:
    best_score: float
    best: dict[str, Any]
    evaluations: int
    resumed_from: int
    out_dir: Path | None
    history: list[dict[str, Any]]
    recipe: Any

    def to_json(self) -> dict[str, Any]:
        return {
            "best_score": self.best_score,
            "best": self.best,
            "evaluations": self.evaluations,
            "resumed_from": self.resumed_from,
            "out_dir": str(self.out_dir) if self.out_dir else None,
            "history": self.history,
        }


def search(
    recipe: Any,
    evaluate: Callable[[Path], float],
    *,
    method: str = "cmaes",
    budget: int = 50,
    seed: int = 0,
    params: Sequence[str] | Mapping[str, tuple[float, float]] | None = None,
    layers: int = 1,
    state_path: str | Path | None = None,
    out_dir: str | Path | None = None,
    recipe_dir: Path | None = None,
    work_dir: str | Path | None = None,
    popsize: int | None = None,
    sigma: float = 0.3,
    overwrite: bool = False,
    merge_options: Mapping[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SearchResult:
    """Search ``recipe``'s coefficients to maximise ``evaluate(merged_model_dir)`` (see the module doc).

    ``recipe`` is a parsed :class:`~convergent.recipe.Recipe` or a path to a
    YAML recipe; ``merge_options`` are MergeJob fields (threads, memory_limit).
    """
    from convergent.engine import plan_merge, run_merge
    from convergent.recipe import build_job, load_recipe

    if isinstance(recipe, (str, Path)):
        recipe_dir = recipe_dir or Path(recipe).resolve().parent
        recipe = load_recipe(recipe)
    bounds = params if isinstance(params, Mapping) else parse_bounds(params)
    space = SearchSpace(recipe, bounds, layers)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        _check_output(out, overwrite)  # fail before spending the budget
    options = dict(merge_options or {})
    options.setdefault("threads", 1)
    # Check the recipe merges at all before the search starts (planning reads headers only).
    probe = Path(tempfile.gettempdir()) / "convergent-search-probe"
    plan_merge(build_job(space.recipe_for(space.start()), probe, recipe_dir=recipe_dir))
    scratch = Path(tempfile.mkdtemp(prefix="convergent-search-", dir=work_dir))
    counter = {"n": 0}

    def objective(point: list[float]) -> float:
        counter["n"] += 1
        target = scratch / f"candidate-{counter['n']}"
        job = build_job(space.recipe_for(point), target, recipe_dir=recipe_dir, seed=seed, overwrite=True, **options)
        try:
            run_merge(job, hash_outputs=False)
            return evaluate(target)
        finally:
            shutil.rmtree(target, ignore_errors=True)

    try:
        result = optimize(
            objective,
            method=method,
            dim=space.dim,
            budget=budget,
            seed=seed,
            start=space.start(),
            state_path=state_path,
            signature=space.signature(),
            popsize=popsize,
            sigma=sigma,
            progress=progress,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    best_recipe = space.recipe_for(result.best.point)
    history = [{**h.to_json(), "coefficients": space.describe(h.point)} for h in result.history]
    summary = SearchResult(
        best_score=result.best.score,
        best=space.describe(result.best.point),
        evaluations=len(result.history),
        resumed_from=result.resumed_from,
        out_dir=out,
        history=history,
        recipe=best_recipe,
    )
    if out is not None:
        report = {"method": method, "seed": seed, "budget": budget, **summary.to_json()}
        report.pop("out_dir")
        extra = {
            "recipe.yaml": recipe_yaml(best_recipe),
            "convergent-search.json": (json.dumps(report, indent=1, sort_keys=True) + "\n").encode(),
        }
        job = build_job(best_recipe, out, recipe_dir=recipe_dir, seed=seed, overwrite=overwrite, **options)
        job.extra_files = {**job.extra_files, **extra}
        run_merge(job, hash_outputs=False)
    return summary


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise OutputError(f"{out} already exists", "choose another --out or pass --overwrite")
