"""mergekit-compatible YAML recipes: parse, validate, turn into engine jobs."""

from convergent.recipe.build import build_job, parse_dtype
from convergent.recipe.schema import Recipe, load_recipe, parse_recipe

__all__ = ["Recipe", "build_job", "load_recipe", "parse_dtype", "parse_recipe"]
