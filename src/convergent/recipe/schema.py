"""mergekit's YAML recipe format, accepted unchanged, as pydantic models.

Field names follow mergekit 0.1.x (``models``, ``slices``/``sources`` with
``layer_range``, ``base_model``, ``merge_method``, ``parameters``, ``dtype``,
``out_dtype``, ``tokenizer_source``). A parameter setting is a scalar, a
gradient (a list interpolated over depth) or a list of ``{filter, value}``
conditions; see :mod:`convergent.recipe.settings`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from convergent.errors import RecipeError, suggest

Scalar = Union[bool, int, float, str]  # noqa: UP007  (pydantic needs the runtime union)
ScalarOrGradient = Union[Scalar, list[Scalar]]  # noqa: UP007


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Condition(_Strict):
    value: ScalarOrGradient
    filter: str | None = None


Setting = Union[ScalarOrGradient, Condition, list[Condition]]  # noqa: UP007


def _model_path(value: Any) -> str:
    """mergekit writes models as 'path', 'path+lora' or {model: {path: ...}}; we take local paths."""
    if isinstance(value, dict):
        inner = value.get("model", value)
        if isinstance(inner, dict):
            if inner.get("lora") or value.get("lora"):
                raise ValueError("LoRA-on-model references are not supported in recipes yet; fold the adapter first")
            inner = inner.get("path")
        value = inner
    if not isinstance(value, str) or not value:
        raise ValueError("a model must be given as a path")
    if "+" in value and not Path(value).exists():
        raise ValueError(f"'{value}': model+adapter references are not supported yet; fold the adapter first")
    return value


class InputModel(_Strict):
    model: str
    parameters: dict[str, Setting] | None = None

    _path = field_validator("model", mode="before")(_model_path)


class InputSlice(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Setting] | None = None

    _path = field_validator("model", mode="before")(_model_path)

    @field_validator("layer_range")
    @classmethod
    def _range(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] < 0 or value[1] <= value[0]:
            raise ValueError(f"layer_range {list(value)} must be [start, end) with 0 <= start < end")
        return value


class OutputSlice(_Strict):
    sources: list[InputSlice]
    base_model: str | None = None
    parameters: dict[str, Setting] | None = None
    residual_weight: float | None = None

    _path = field_validator("base_model", mode="before")(lambda v: None if v is None else _model_path(v))

    @model_validator(mode="after")
    def _same_length(self) -> OutputSlice:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError("all sources of a slice must span the same number of layers")
        if not self.sources:
            raise ValueError("a slice needs at least one source")
        return self


class Recipe(_Strict):
    merge_method: str
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    base_model: str | None = None
    parameters: dict[str, Setting] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None
    name: str | None = None

    _path = field_validator("base_model", mode="before")(lambda v: None if v is None else _model_path(v))

    @field_validator("tokenizer_source", mode="before")
    @classmethod
    def _tokenizer(cls, value: Any) -> Any:
        if value is None or value == "base":
            return value
        if value == "union":
            raise ValueError("tokenizer_source: union (vocabulary merging) is not supported; use base")
        return _model_path(value)

    @model_validator(mode="after")
    def _models_or_slices(self) -> Recipe:
        if bool(self.models) == bool(self.slices):
            raise ValueError("give either 'models' or 'slices', not both and not neither")
        return self


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith(("function-", "tagged-union"))) or "recipe"


def parse_recipe(text: str, source: str = "recipe") -> Recipe:
    """Parse YAML text; every problem is a RecipeError naming the field."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping with at least merge_method and models or slices")
    if "modules" in data:
        raise RecipeError(f"{source}: 'modules' (multi-module merges) is not supported", "use models or slices")
    allowed = list(Recipe.model_fields)
    for key in data:
        if key not in allowed:
            hint = suggest(str(key), allowed)
            raise RecipeError(
                f"{source}: unknown field '{key}'", f"{hint + ' ' if hint else ''}allowed: {', '.join(allowed)}"
            )
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = _field_path(tuple(err.get("loc", ())))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            last = str(err["loc"][-1])
            parent_fields = _fields_at(tuple(err["loc"][:-1]))
            hint = suggest(last, parent_fields) if parent_fields else None
            raise RecipeError(
                f"{source}: unknown field '{where}'",
                f"{hint + ' ' if hint else ''}allowed here: {', '.join(parent_fields)}" if parent_fields else None,
            ) from None
        raise RecipeError(f"{source}: field '{where}': {msg}") from None


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Recipe
    names = {"models": InputModel, "slices": OutputSlice, "sources": InputSlice}
    for part in loc:
        if isinstance(part, str) and part in names:
            model = names[part]
    return list(model.model_fields)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"recipe {path} not found", "check the path") from None
    return parse_recipe(text, str(path))
