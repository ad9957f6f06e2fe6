"""Merge LoRA adapters into one adapter, or fold an adapter into its base model.

Methods (``merge_adapters(method=...)``), for adapters i with weights w_i and
per-module deltas ``dW_i = scale_i * B_i @ A_i`` (in the base weight's layout):

* ``cat``: exact concatenation. ``A = cat_rows(w_i * A_i)``,
  ``B = cat_cols(scale_i * B_i)``, so ``B @ A = sum_i w_i dW_i`` with rank
  ``sum_i r_i``. No approximation, no ``--rank``.
* ``svd``: the same sum ``sum_i w_i dW_i``, re-factorised by SVD to the target
  rank (the best rank-k approximation, Eckart-Young). Computed from the
  stacked factors with two thin QRs, so the full ``d_out x d_in`` matrix is
  never formed.
* any registered per-tensor strategy (``linear``, ``task_arithmetic``,
  ``ties``, ``dare_linear``, ``dare_ties``, ...): the strategy runs on the full
  ``dW_i`` with a zero base (so task vectors are the deltas themselves) via
  :func:`convergent.strategies.merge_tensors`, with tensor name
  ``<module>.weight`` and the given seed; the merged delta is then
  re-factorised by SVD to the target rank.

Target rank: ``rank`` if given, else the sum of the ranks of the adapters that
adapt the module (which is lossless for linear combinations), clipped to
``min(d_out, d_in)``; it is padded with zero directions when asked for more
than the merged delta has. Output factors carry the scale, so every written
module has ``lora_alpha == r`` (scale 1).

Harmonisation: the merged adapter adapts the union of the inputs' modules; an
adapter without a module contributes a zero delta there (``strict=True``
refuses instead). Ranks may differ freely. A different
``base_model_name_or_path`` is a warning. The same module with different
shapes, layer kinds or ``fan_in_fan_out`` is an error naming it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from convergent.checkpoint import AtomicOutput, ShardedWriter, TensorInfo, open_checkpoint, sha256_file
from convergent.errors import CheckpointError, MergeInputError, RecipeError, suggest
from convergent.lora.adapters import PEFT_PREFIX, AdapterWriter, LoraAdapter, OutModule, adapter_config

FACTOR_METHODS = ("cat", "svd")
#: The delta-space methods documented for LoRA; any other registered strategy works too.
DELTA_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")


@dataclass
class LoraMergeResult:
    out_dir: Path
    method: str
    modules: int
    ranks: dict[str, int]
    warnings: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        rank_values = sorted(set(self.ranks.values()))
        return {
            "out_dir": str(self.out_dir),
            "method": self.method,
            "modules": self.modules,
            "ranks": rank_values,
            "module_ranks": self.ranks,
            "warnings": self.warnings,
            "files": self.files,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class FoldResult:
    out_dir: Path
    tensors: int
    folded: int
    warnings: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "tensors": self.tensors,
            "folded_modules": self.folded,
            "warnings": self.warnings,
            "files": self.files,
            "seconds": round(self.seconds, 3),
        }


# -- planning ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModulePlan:
    """One module of the merged adapter: which inputs adapt it and its common geometry."""

    name: str
    kind: str
    out_features: int  # rows of B @ A
    in_features: int
    transposed: bool
    present: tuple[int, ...]  # indexes of the adapters that adapt it
    input_rank: int  # sum of the present adapters' ranks

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.in_features, self.out_features) if self.transposed else (self.out_features, self.in_features)


def plan_modules(adapters: Sequence[LoraAdapter], strict: bool = False) -> tuple[list[ModulePlan], list[str]]:
    """The union of the adapters' modules, checked for agreement; plus warnings."""
    warnings: list[str] = []
    bases = sorted({str(a.base_model) for a in adapters if a.base_model})
    if len(bases) > 1:
        warnings.append(
            f"adapters name different base models ({', '.join(bases)}); merging anyway, "
            "check that they were trained on the same weights"
        )
    fifo = {a.fan_in_fan_out for a in adapters}
    if len(fifo) > 1:
        names = ", ".join(f"{a.label}={a.fan_in_fan_out}" for a in adapters)
        raise MergeInputError(f"adapters disagree on fan_in_fan_out ({names})", "merge adapters of one base model")
    union = sorted(set().union(*(a.modules for a in adapters)))
    for a in adapters:
        missing = [m for m in union if m not in a.modules]
        if not missing:
            continue
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        if strict:
            raise MergeInputError(
                f"--strict: adapter {a.label} does not adapt {len(missing)} module(s) the others do: {shown}",
                "drop --strict to count missing modules as a zero delta, or merge adapters with the same targets",
            )
        warnings.append(f"{a.label} does not adapt {len(missing)} module(s) ({shown}): counted as zero delta")
    plans = []
    for name in union:
        present = tuple(i for i, a in enumerate(adapters) if name in a.modules)
        first = adapters[present[0]].modules[name]
        for i in present[1:]:
            other = adapters[i].modules[name]
            if other.kind != first.kind:
                raise MergeInputError(
                    f"module '{name}' is a {first.kind} layer in {adapters[present[0]].label} "
                    f"but a {other.kind} layer in {adapters[i].label}",
                    "merge adapters trained on the same base model",
                )
            if other.weight_shape != first.weight_shape:
                raise MergeInputError(
                    f"module '{name}' has delta shape {list(first.weight_shape)} in {adapters[present[0]].label} "
                    f"but {list(other.weight_shape)} in {adapters[i].label}",
                    "these adapters were trained on different base models; merge adapters of one base",
                )
        plans.append(
            ModulePlan(
                name=name,
                kind=first.kind,
                out_features=first.out_features,
                in_features=first.in_features,
                transposed=first.transposed,
                present=present,
                input_rank=sum(adapters[i].modules[name].rank for i in present),
            )
        )
    return plans, warnings


def _weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise RecipeError(
            f"{len(weights)} weights for {count} adapters",
            "give one weight per adapter, in the same order, e.g. --weights 0.5,0.5",
        )
    return weights


# -- factorisation -------------------------------------------------------------------------------


def _fix_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make each left singular vector's largest entry positive (a deterministic SVD sign choice)."""
    if u.shape[1] == 0:
        return u, vh
    idx = u.abs().argmax(dim=0)
    signs = torch.sign(u[idx, torch.arange(u.shape[1])])
    signs[signs == 0] = 1
    return u * signs, vh * signs[:, None]


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors ``A = sqrt(S) Vh``, ``B = U sqrt(S)`` of the top ``k`` triplets, zero-padded to ``k``."""
    u, vh = _fix_signs(u, vh)
    n = min(k, s.shape[0])
    root = s[:n].clamp_min(0).sqrt()
    b = torch.zeros(u.shape[0], k, dtype=torch.float64)
    a = torch.zeros(k, vh.shape[1], dtype=torch.float64)
    b[:, :n] = u[:, :n].to(torch.float64) * root
    a[:n] = root[:, None] * vh[:n].to(torch.float64)
    return a.to(torch.float32), b.to(torch.float32)


def truncated_factors(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [k, in], B [out, k]) with ``B @ A`` the best rank-``k`` approximation of ``matrix`` [out, in]."""
    u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    return _split(u, s, vh, k)


def lowrank_factors(b: torch.Tensor, a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``k`` factors of ``b @ a`` (b [out, R], a [R, in]) without forming the product."""
    qb, rb = torch.linalg.qr(b.to(torch.float64))
    qa, ra = torch.linalg.qr(a.to(torch.float64).T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return _split(qb @ u, s, vh @ qa.T, k)


# -- merging -------------------------------------------------------------------------------------


def _delta_of(adapter: LoraAdapter, plan: ModulePlan) -> torch.Tensor:
    if plan.name in adapter.modules:
        return adapter.delta(plan.name)
    return torch.zeros(plan.weight_shape, dtype=torch.float32)


def merged_delta(
    adapters: Sequence[LoraAdapter],
    plan: ModulePlan,
    method: str,
    model_params: Sequence[Mapping[str, Any]] | None = None,
    params: Mapping[str, Any] | None = None,
    seed: int | str | bytes = 0,
) -> torch.Tensor:
    """The strategy ``method`` applied to the adapters' deltas of one module (base = zeros), weight layout.

    Runs :func:`convergent.strategies.merge_tensors` with tensor name
    ``<module>.weight``; ``model_params`` line up with ``adapters``.
    """
    from convergent.strategies import get_strategy, merge_tensors

    strat = get_strategy(method)
    deltas = [_delta_of(a, plan) for a in adapters]
    base = torch.zeros(plan.weight_shape, dtype=torch.float32) if strat.base != "none" else None
    return merge_tensors(
        method, deltas, base=base, params=params, model_params=model_params, name=f"{plan.name}.weight", seed=seed
    )


def strategy_params(
    method: str,
    weights: Sequence[float],
    density: float | None = None,
    params: Mapping[str, Any] | None = None,
    weights_given: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(global parameters, per-adapter parameters) for a delta-space strategy, validated.

    ``weights`` become each adapter's ``weight``; ``density`` and any key of
    ``params`` go wherever the strategy declares them (per model, as in
    mergekit's ties/dare, or global), the same value for every adapter.
    """
    from convergent.strategies import get_strategy
    from convergent.strategies.run import validate_model_params, validate_params

    strat = get_strategy(method)
    if strat.statistics:
        raise RecipeError(
            f"merge method '{method}' needs statistics ({', '.join(strat.statistics)}), which adapters do not carry",
            f"use one of {', '.join((*DELTA_METHODS, *FACTOR_METHODS))}",
        )
    per_model_fields = strat.model_params.model_fields
    global_params: dict[str, Any] = {}
    shared: dict[str, Any] = {}
    extra = dict(params or {})
    if density is not None:
        if "density" not in per_model_fields and "density" not in strat.params.model_fields:
            raise RecipeError(
                f"--density does not apply to merge method '{method}'", "use ties, dare_ties or dare_linear"
            )
        extra["density"] = density
    for key, value in extra.items():
        if key in per_model_fields and key not in strat.params.model_fields:
            shared[key] = value
        else:
            global_params[key] = value
    if "weight" not in per_model_fields:
        if weights_given:
            raise RecipeError(f"merge method '{method}' takes no per-model weights", "drop --weights")
        per_model = [dict(shared) for _ in weights]
    else:
        per_model = [{"weight": w, **shared} for w in weights]
    validate_params(strat, global_params)
    for i, mp in enumerate(per_model):
        validate_model_params(strat, mp, model=str(i))
    return global_params, per_model


def _check_factor_method(method: str, rank: int | None, density: float | None, params: Mapping[str, Any]) -> None:
    if params or density is not None:
        given = sorted([*params, *(["density"] if density is not None else [])])
        raise RecipeError(
            f"method '{method}' takes no strategy parameters (got {', '.join(given)})",
            "--density and --param apply to delta-space methods such as ties or dare_ties",
        )
    if method == "cat" and rank is not None:
        raise RecipeError(
            "--rank does not apply to 'cat': its rank is the sum of the input ranks",
            "use --method svd to re-factorise to a chosen rank",
        )


def _check_known(method: str) -> None:
    from convergent.strategies import REGISTRY, get_strategy

    get_strategy("linear")  # imports every strategy family
    if method not in FACTOR_METHODS and method not in REGISTRY:
        raise RecipeError(
            f"unknown LoRA merge method '{method}'",
            suggest(method, [*REGISTRY, *FACTOR_METHODS])
            or f"use one of {', '.join((*DELTA_METHODS, *FACTOR_METHODS))}",
        )


def _target_rank(plan: ModulePlan, method: str, rank: int | None) -> int:
    if method == "cat":
        return plan.input_rank
    wanted = rank if rank is not None else plan.input_rank
    return max(1, min(wanted, plan.out_features, plan.in_features))


def _common_dtype(adapters: Sequence[LoraAdapter]) -> torch.dtype:
    dtypes = {m.dtype for a in adapters for m in a.modules.values()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _base_layer_copies(adapters: Sequence[LoraAdapter]) -> dict[str, tuple[LoraAdapter, str]]:
    """Saved base-layer copies (PEFT's save_embedding_layers) to carry over; they must agree."""
    chosen: dict[str, tuple[LoraAdapter, str]] = {}
    for a in adapters:
        for module, key in a.base_layers.items():
            if module not in chosen:
                chosen[module] = (a, key)
                continue
            first, first_key = chosen[module]
            if not torch.equal(first.checkpoint.read(first_key), a.checkpoint.read(key)):
                raise MergeInputError(
                    f"{first.label} and {a.label} carry different copies of the base weights of '{module}' "
                    "(saved with save_embedding_layers, e.g. after resizing the vocabulary)",
                    "merge adapters trained on the same base model and vocabulary",
                )
    return chosen


def merge_adapters(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    method: str = "linear",
    weights: Sequence[float] | None = None,
    density: float | None = None,
    params: Mapping[str, Any] | None = None,
    rank: int | None = None,
    seed: int | str | bytes = 0,
    strict: bool = False,
    overwrite: bool = False,
    hash_files: bool = False,
) -> LoraMergeResult:
    """Merge PEFT LoRA adapters into a new adapter folder ``out_dir`` (see the module doc)."""
    started = time.perf_counter()
    params = dict(params or {})
    if not paths:
        raise RecipeError("no adapters to merge", "pass one or more adapter folders")
    if rank is not None and rank <= 0:
        raise RecipeError(f"--rank must be a positive integer, got {rank}")
    _check_known(method)
    w = _weights(weights, len(paths))
    global_params: dict[str, Any] = {}
    model_params: list[dict[str, Any]] = []
    if method in FACTOR_METHODS:
        _check_factor_method(method, rank, density, params)
    else:
        global_params, model_params = strategy_params(method, w, density, params, weights is not None)
    adapters: list[LoraAdapter] = []
    try:
        for p in paths:
            adapters.append(LoraAdapter(p))
        plans, warnings = plan_modules(adapters, strict)
        out_modules = [
            OutModule(p.name, p.kind, _target_rank(p, method, rank), p.out_features, p.in_features) for p in plans
        ]
        dtype = _common_dtype(adapters)
        copies = _base_layer_copies(adapters)
        extra = {key: a.checkpoint.info(key) for a, key in copies.values()}
        config = adapter_config(adapters[0].config, out_modules, [a.config for a in adapters])
        writer = AdapterWriter(Path(out_dir), out_modules, config, dtype, overwrite, extra=extra)
        try:
            for plan, out in zip(plans, out_modules):
                a, b = _merge_module(adapters, plan, method, w, global_params, model_params, out.rank, seed)
                writer.write(plan.name, a, b)
            for a_, key in copies.values():
                writer.write_tensor(key, a_.checkpoint.read(key))
            files = writer.commit(hash_files)
        except BaseException:
            writer.abort()
            raise
    finally:
        for a in adapters:
            a.close()
    return LoraMergeResult(
        out_dir=Path(out_dir),
        method=method,
        modules=len(out_modules),
        ranks={m.name: m.rank for m in out_modules},
        warnings=warnings,
        files=files,
        seconds=time.perf_counter() - started,
    )


def _merge_module(
    adapters: Sequence[LoraAdapter],
    plan: ModulePlan,
    method: str,
    weights: Sequence[float],
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    k: int,
    seed: int | str | bytes,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the merged module in ``B @ A`` layout, scale folded in."""
    if method in FACTOR_METHODS:
        a_parts, b_parts = [], []
        for i in plan.present:
            mod = adapters[i].modules[plan.name]
            a, b = adapters[i].factors(plan.name)
            if method == "cat":
                a_parts.append(a * weights[i])
                b_parts.append(b * mod.scale)
            else:
                a_parts.append(a)
                b_parts.append(b * (mod.scale * weights[i]))
        a_cat, b_cat = torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)
        if method == "cat":
            return a_cat, b_cat
        return lowrank_factors(b_cat, a_cat, k)
    delta = merged_delta(adapters, plan, method, model_params, params, seed)
    if plan.transposed:
        delta = delta.T
    return truncated_factors(delta, k)


# -- folding -------------------------------------------------------------------------------------


def fold_adapter(
    adapter_path: str | Path,
    base_path: str | Path,
    out_dir: str | Path,
    overwrite: bool = False,
    max_shard_size: int = 5 * 1000**3,
    hash_files: bool = False,
) -> FoldResult:
    """Write ``base + scale * B @ A`` for every adapted weight as a full model folder.

    Streams tensor by tensor: peak memory is one base weight plus its
    adapter's factors. Arithmetic in float32, cast once to the base dtype.
    Config and tokenizer files are copied from the base.
    """
    started = time.perf_counter()
    adapter = LoraAdapter(adapter_path)
    base = None
    try:
        base = open_checkpoint(base_path)
        if base.kind.startswith("peft"):
            raise CheckpointError(
                f"{base_path}: is an adapter folder, not a base model",
                "pass the full model the adapter was trained on with --base",
            )
        by_weight = {}
        for m in adapter.modules.values():
            if m.weight_name not in base:
                raise MergeInputError(
                    f"adapter module '{m.name}' has no weight '{m.weight_name}' in {base_path}",
                    f"fold the adapter into the model it was trained on (adapter says: {adapter.base_model})",
                )
            info = base.info(m.weight_name)
            if tuple(info.shape) != m.weight_shape:
                raise MergeInputError(
                    f"module '{m.name}': adapter delta has shape {list(m.weight_shape)} "
                    f"but {base_path} has '{m.weight_name}' of shape {list(info.shape)}",
                    f"fold the adapter into the model it was trained on (adapter says: {adapter.base_model})",
                )
            if not info.dtype.is_floating_point:
                raise MergeInputError(f"'{m.weight_name}' in {base_path} is {info.dtype}, not floating point")
            by_weight[m.weight_name] = m
        copies = {}
        for module, key in adapter.base_layers.items():
            name = f"{module}.weight"
            if name not in base or tuple(base.info(name).shape) != tuple(adapter.checkpoint.info(key).shape):
                raise MergeInputError(
                    f"the adapter carries its own copy of '{name}' (shape "
                    f"{list(adapter.checkpoint.info(key).shape)}) that does not fit {base_path}",
                    "resized vocabularies are not supported by fold; use PEFT's merge_and_unload",
                )
            copies[name] = key
        names = base.names()
        files: dict[str, str] = {}
        with AtomicOutput(Path(out_dir), overwrite) as output:
            writer = ShardedWriter(output.tmp, [(n, _info(base, n)) for n in names], max_shard_size)
            try:
                for n in names:
                    tensor = adapter.checkpoint.read(copies[n]) if n in copies else base.read(n)
                    dtype = base.info(n).dtype
                    if n in by_weight:
                        tensor = tensor.to(torch.float32) + adapter.delta(by_weight[n].name)
                    writer.write(n, tensor.to(dtype))
            finally:
                writer.close()
            for fname, src in base.files().items():
                if fname != "adapter_config.json":
                    shutil.copyfile(src, output.tmp / fname)
            if hash_files:
                files = {p.name: sha256_file(p) for p in sorted(output.tmp.iterdir()) if p.is_file()}
            output.commit()
    finally:
        adapter.close()
        if base is not None:
            base.close()
    return FoldResult(
        out_dir=Path(out_dir),
        tensors=len(names),
        folded=len(by_weight),
        files=files,
        seconds=time.perf_counter() - started,
    )


def _info(ckpt: Any, name: str) -> TensorInfo:
    info = ckpt.info(name)
    return TensorInfo(info.dtype, tuple(info.shape))


__all__ = [
    "DELTA_METHODS",
    "FACTOR_METHODS",
    "PEFT_PREFIX",
    "FoldResult",
    "LoraMergeResult",
    "ModulePlan",
    "fold_adapter",
    "lowrank_factors",
    "merge_adapters",
    "merged_delta",
    "plan_modules",
    "strategy_params",
    "truncated_factors",
]
