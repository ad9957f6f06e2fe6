"""CMA-ES and genetic search over merge coefficients: convergence, seeding, resuming, bad evaluations."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import yaml

from convergent.errors import ConvergentError, RecipeError
from convergent.search.coefficients import SearchError, optimize, parse_bounds, search
from convergent.search.evaluate import CommandEvaluator, EvaluationError, load_callable, parse_score
from tests.search.conftest import TARGET, distance_score, merged_w


def sphere(point):
    return -float(np.linalg.norm(np.asarray(point) - np.asarray(TARGET)))


@pytest.mark.parametrize("method,budget,tol", [("cmaes", 120, 0.03), ("genetic", 160, 0.05)])
def test_search_through_merges_finds_the_target(unit_recipe, tmp_path, method, budget, tol):
    result = search(unit_recipe, distance_score, method=method, budget=budget, seed=1, out_dir=tmp_path / "best")
    best = [result.best[f"m{i}.safetensors"]["weight"] for i in range(3)]
    assert np.allclose(best, TARGET, atol=tol), best
    assert result.evaluations == budget
    # The best merge is written with its recipe and the search summary.
    assert np.allclose(merged_w(tmp_path / "best").numpy(), best, atol=1e-6)
    written = yaml.safe_load((tmp_path / "best" / "recipe.yaml").read_text())
    assert [m["parameters"]["weight"] for m in written["models"]] == best
    report = json.loads((tmp_path / "best" / "convergent-search.json").read_text())
    assert report["best_score"] == result.best_score and len(report["history"]) == budget


@pytest.mark.parametrize("method", ["cmaes", "genetic"])
def test_same_seed_same_search_and_seed_matters(method):
    a = optimize(sphere, method=method, dim=3, budget=30, seed=7)
    b = optimize(sphere, method=method, dim=3, budget=30, seed=7)
    c = optimize(sphere, method=method, dim=3, budget=30, seed=8)
    assert [h.point for h in a.history] == [h.point for h in b.history]
    assert [h.point for h in a.history] != [h.point for h in c.history]


@pytest.mark.parametrize("method", ["cmaes", "genetic"])
def test_resume_after_interruption_continues_identically(tmp_path, method):
    full = optimize(sphere, method=method, dim=3, budget=45, seed=3, state_path=tmp_path / "full.json")
    state = tmp_path / "interrupted.json"
    calls = {"n": 0}

    def flaky(point):
        calls["n"] += 1
        if calls["n"] == 18:  # mid-generation
            raise KeyboardInterrupt
        return sphere(point)

    with pytest.raises(KeyboardInterrupt):
        optimize(flaky, method=method, dim=3, budget=45, seed=3, state_path=state)
    assert json.loads(state.read_text())["evaluations"] == 17
    resumed = optimize(sphere, method=method, dim=3, budget=45, seed=3, state_path=state)
    assert resumed.resumed_from == 17
    assert [(h.point, h.score) for h in resumed.history] == [(h.point, h.score) for h in full.history]
    # Extending the budget of a finished search equals running the bigger budget at once.
    short = tmp_path / "short.json"
    optimize(sphere, method=method, dim=3, budget=20, seed=3, state_path=short)
    extended = optimize(sphere, method=method, dim=3, budget=45, seed=3, state_path=short)
    assert [h.point for h in extended.history] == [h.point for h in full.history]


def test_recipe_search_resumes_from_state(unit_recipe, tmp_path):
    full = search(unit_recipe, distance_score, budget=16, seed=2)
    state = tmp_path / "s.json"
    search(unit_recipe, distance_score, budget=9, seed=2, state_path=state)
    resumed = search(unit_recipe, distance_score, budget=16, seed=2, state_path=state)
    assert resumed.resumed_from == 9
    assert [h["point"] for h in resumed.history] == [h["point"] for h in full.history]
    with pytest.raises(SearchError, match="different search"):
        search(unit_recipe, distance_score, budget=16, seed=3, state_path=state)


def test_per_layer_and_global_parameters(unit_recipe):
    from convergent.recipe import load_recipe
    from convergent.search.coefficients import SearchSpace

    space = SearchSpace(load_recipe(unit_recipe), parse_bounds(["weight=0:2", "lambda=0.5:1.5"]), layers=3)
    assert space.dim == 3 * 3 + 3
    recipe = space.recipe_for([0.5] * space.dim)
    assert recipe.models[0].parameters["weight"] == [1.0, 1.0, 1.0]
    assert recipe.parameters["lambda"] == [1.0, 1.0, 1.0]
    with pytest.raises(RecipeError, match=r"no parameter 'wieght'.*did you mean 'weight'"):
        SearchSpace(load_recipe(unit_recipe), parse_bounds(["wieght=0:1"]))
    with pytest.raises(RecipeError, match="bounds"):
        parse_bounds(["weight=1:0"])


def test_eval_command_scores_and_errors(unit_recipe, tmp_path):
    assert parse_score("loading\nscore: 0.25\n", "cmd") == 0.25
    assert parse_score("accuracy=-1e-2", "cmd") == -0.01
    assert CommandEvaluator("echo 0.5 #")(tmp_path) == 0.5
    script = tmp_path / "score.py"
    script.write_text("import sys\nprint('evaluating', sys.argv[1])\nprint(0.75)\n")
    assert CommandEvaluator(f"{sys.executable} {script} {{model}}")(tmp_path / "x y") == 0.75
    with pytest.raises(EvaluationError, match="exited with status 3"):
        CommandEvaluator("echo oops >&2; exit 3")(tmp_path)
    with pytest.raises(EvaluationError, match="printed no number"):
        CommandEvaluator("echo hello #")(tmp_path)
    with pytest.raises(EvaluationError, match="printed nothing"):
        CommandEvaluator("true")(tmp_path)
    with pytest.raises(EvaluationError, match="not a finite number"):
        CommandEvaluator("echo nan #")(tmp_path)
    # A failing command stops the search with a clear error; the state keeps what was done.
    state = tmp_path / "state.json"
    with pytest.raises(EvaluationError, match="exited with status 1"):
        search(unit_recipe, CommandEvaluator("exit 1"), budget=5, state_path=state)
    assert json.loads(state.read_text())["evaluations"] == 0


def test_eval_callable_loading_and_errors(tmp_path):
    module = tmp_path / "evals.py"
    module.write_text("def score(path):\n    return 1.5\n\ndef bad(path):\n    return 'high'\n")
    assert load_callable(f"{module}:score")("x") == 1.5
    with pytest.raises(EvaluationError, match="no function 'missing'"):
        load_callable(f"{module}:missing")
    with pytest.raises(EvaluationError, match="not module:function"):
        load_callable("nonsense")
    with pytest.raises(EvaluationError, match="cannot import 'no_such_module_xyz'"):
        load_callable("no_such_module_xyz:f")
    from convergent.search.evaluate import CallableEvaluator

    with pytest.raises(EvaluationError, match="not a number"):
        CallableEvaluator(f"{module}:bad")(tmp_path)


def test_cli_search_json(unit_recipe, tmp_path):
    from typer.testing import CliRunner

    from convergent.cli.app import app

    evals = tmp_path / "evals.py"
    evals.write_text(
        "import torch\nfrom safetensors.torch import load_file\n"
        f"T = torch.tensor({TARGET})\n"
        "def score(path):\n    return -float((load_file(path + '/model.safetensors')['w'] - T).norm())\n"
    )
    args = ["search", str(unit_recipe), "--eval", f"{evals}:score", "--method", "genetic", "--budget", "12"]
    result = CliRunner().invoke(app, [*args, "--seed", "4", "--state", str(tmp_path / "s.json"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["evaluations"] == 12 and data["best_score"] <= 0
    bad = CliRunner().invoke(app, ["search", str(unit_recipe), "--eval-cmd", "echo nothing", "--budget", "3"])
    assert isinstance(bad.exception, ConvergentError) and "printed no number" in bad.exception.message
    both = CliRunner().invoke(app, ["search", str(unit_recipe), "--budget", "3"])
    assert isinstance(both.exception, EvaluationError) and "exactly one of" in both.exception.message
