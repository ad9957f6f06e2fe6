"""mergekit parameter semantics: gradients, filters, precedence, validation."""

from __future__ import annotations

import pytest

from convergent.errors import RecipeError
from convergent.recipe import parse_recipe
from convergent.recipe.schema import Condition
from convergent.recipe.settings import evaluate, evaluate_all


def test_gradient_interpolates_linearly():
    assert evaluate([0.0, 1.0], "x", 0.25) == pytest.approx(0.25)
    assert evaluate([0.0, 1.0, 0.0], "x", 0.5) == pytest.approx(1.0)
    assert evaluate([0.0, 1.0, 0.0], "x", 0.75) == pytest.approx(0.5)
    assert evaluate([2.0, 4.0], "x", 1.0) == pytest.approx(4.0)


def test_non_numeric_gradients_pick_by_position():
    assert evaluate([True, False], "x", 0.4) is True
    assert evaluate([True, False], "x", 1.0) is False


def test_filters_first_match_wins_and_fallback():
    setting = [Condition(filter="self_attn", value=0.1), Condition(filter="mlp", value=[0.0, 1.0]), Condition(value=9)]
    assert evaluate(setting, "model.layers.0.self_attn.q_proj.weight", 0.5) == 0.1
    assert evaluate(setting, "model.layers.0.mlp.up.weight", 0.5) == pytest.approx(0.5)
    assert evaluate(setting, "model.norm.weight", 0.5) == 9
    assert evaluate([Condition(filter="mlp", value=1)], "model.norm.weight", 0) is None


def test_precedence_first_definition_wins():
    assert evaluate_all([{"weight": 2}, {"weight": 1, "density": 0.5}], "x", 0) == {"weight": 2, "density": 0.5}


def test_recipe_parses_mergekit_forms():
    recipe = parse_recipe(
        """
models:
  - model: a
    parameters:
      weight:
        - filter: self_attn
          value: [0, 0.5, 1]
        - value: 1
  - model: b
merge_method: ties
base_model: base
parameters:
  density: 0.5
  normalize: true
dtype: bfloat16
"""
    )
    assert recipe.merge_method == "ties" and recipe.base_model == "base"
    assert isinstance(recipe.models[0].parameters["weight"], list)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("merge_method: linear\n", "either 'models' or 'slices'"),
        ("models: [{model: a}]\n", "merge_method"),
        ("merge_method: linear\nmodels: [{model: a}]\nbase_modle: b\n", "did you mean 'base_model'"),
        ("merge_method: linear\nslices: [{sources: [{model: a, layer_range: [4, 2]}]}]\n", "layer_range"),
        ("merge_method: linear\nmodels: [{model: a}]\ntokenizer_source: union\n", "union"),
        ("- just a list\n", "mapping"),
        ("merge_method: [\n", "not valid YAML"),
    ],
)
def test_invalid_recipes_name_the_field(text, fragment):
    with pytest.raises(RecipeError) as err:
        parse_recipe(text)
    assert fragment in str(err.value)
