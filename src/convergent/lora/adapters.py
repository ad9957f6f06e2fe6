"""Read PEFT LoRA adapter folders as per-module low-rank pairs, and write them back.

A LoRA module adds ``scale * B @ A`` to a base weight, with ``A`` of shape
``[r, d_in]``, ``B`` of shape ``[d_out, r]`` and ``scale = lora_alpha / r``
(``lora_alpha / sqrt(r)`` with rsLoRA). The rank and alpha of each module
follow PEFT's ``rank_pattern``/``alpha_pattern`` rules; the rank is checked
against the stored factors.

Two PEFT layer kinds are read: ``Linear`` (``lora_A.weight``/``lora_B.weight``)
and ``Embedding`` (``lora_embedding_A``/``lora_embedding_B``, whose ``B @ A``
is the transpose of the embedding weight's layout). Linear layers with
``fan_in_fan_out`` (GPT-2's Conv1D) are transposed the same way. Everything
else (DoRA magnitudes, LoRA biases, ``modules_to_save`` copies, conv layers)
is refused with an error that names the tensor.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from convergent.checkpoint import AtomicOutput, Checkpoint, ShardedWriter, TensorInfo, open_checkpoint, sha256_file
from convergent.errors import CheckpointError, MergeInputError

#: PEFT prefixes every saved key with this (the PeftModel -> LoraModel -> base model path).
PEFT_PREFIX = "base_model.model."

_FACTOR_SUFFIXES = {
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
}
_BASE_LAYER_SUFFIX = ".base_layer.weight"


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ``delta = scale * B @ A`` (transposed into the weight if ``transposed``).

    ``out_features``/``in_features`` are the rows/columns of ``B @ A``;
    :attr:`weight_shape` is the shape of the base weight it is added to.
    """

    name: str  # module path in the base model, e.g. model.layers.0.self_attn.q_proj
    kind: str  # "linear" | "embedding"
    rank: int
    alpha: float
    scale: float
    out_features: int
    in_features: int
    transposed: bool
    a_key: str
    b_key: str
    dtype: torch.dtype

    @property
    def weight_name(self) -> str:
        """The base model tensor this module's delta is added to."""
        return f"{self.name}.weight"

    @property
    def weight_shape(self) -> tuple[int, int]:
        if self.transposed:
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)


def pattern_key(patterns: Iterable[str], module: str) -> str | None:
    """The first PEFT rank/alpha pattern that matches ``module`` (PEFT's own rule), or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _module_of(key: str) -> tuple[str, str, str] | None:
    """(module path, kind, 'A'|'B') for a LoRA factor key, None otherwise."""
    for suffix, (kind, which) in _FACTOR_SUFFIXES.items():
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            return module.removeprefix(PEFT_PREFIX), kind, which
    return None


class LoraAdapter:
    """A PEFT LoRA adapter folder, read lazily: the factors of one module at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.label = str(self.path)
        if not self.path.is_dir():
            if not self.path.exists():
                raise CheckpointError(f"{self.path}: no such adapter folder", "check the path")
            raise CheckpointError(
                f"{self.path}: not a PEFT adapter folder (it is a file)",
                "pass the folder that holds adapter_config.json and adapter_model.safetensors",
            )
        if not (self.path / "adapter_config.json").exists():
            raise CheckpointError(
                f"{self.path}: not a PEFT adapter folder (no adapter_config.json)",
                "pass a folder written by PeftModel.save_pretrained",
            )
        self.checkpoint: Checkpoint = open_checkpoint(self.path)
        if not self.checkpoint.kind.startswith("peft"):
            self.checkpoint.close()
            raise CheckpointError(
                f"{self.path}: adapter_config.json but no adapter_model.safetensors (found {self.checkpoint.kind})",
                "pass a folder written by PeftModel.save_pretrained",
            )
        try:
            self.config: dict[str, Any] = json.loads((self.path / "adapter_config.json").read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{self.path}/adapter_config.json: not valid JSON ({exc})") from None
        try:
            self._check_config()
            self.modules: dict[str, LoraModule] = self._read_modules()
        except Exception:
            self.checkpoint.close()
            raise

    # -- config ----------------------------------------------------------------------------------

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    def _check_config(self) -> None:
        cfg = self.config
        where = f"{self.path}/adapter_config.json"
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{where}: expected a JSON object")
        peft_type = str(cfg.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise MergeInputError(f"{self.path}: a {peft_type} adapter, not LoRA", "only LoRA adapters can be merged")
        if cfg.get("use_dora"):
            raise MergeInputError(
                f"{self.path}: a DoRA adapter (use_dora: true)",
                "DoRA's magnitude vectors do not combine as low-rank deltas; fold it with PEFT's merge_and_unload",
            )
        if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
            raise MergeInputError(
                f"{self.path}: the adapter trains biases (bias: {cfg.get('bias')}, lora_bias: {cfg.get('lora_bias')})",
                "only bias-free LoRA adapters are supported",
            )
        if cfg.get("modules_to_save"):
            raise MergeInputError(
                f"{self.path}: the adapter saves full modules ({', '.join(map(str, cfg['modules_to_save']))})",
                "only the low-rank parts can be merged; retrain without modules_to_save or merge those weights "
                "with 'convergent merge'",
            )
        for key in ("r", "lora_alpha"):
            value = cfg.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise CheckpointError(f"{where}: '{key}' must be a positive number, got {value!r}")

    def _rank_alpha(self, module: str) -> tuple[int, float]:
        cfg = self.config
        rank_pattern = cfg.get("rank_pattern") or {}
        alpha_pattern = cfg.get("alpha_pattern") or {}
        rkey = pattern_key(rank_pattern, module)
        akey = pattern_key(alpha_pattern, module)
        rank = rank_pattern[rkey] if rkey is not None else cfg["r"]
        alpha = alpha_pattern[akey] if akey is not None else cfg["lora_alpha"]
        return int(rank), float(alpha)

    # -- tensors ---------------------------------------------------------------------------------

    def _read_modules(self) -> dict[str, LoraModule]:
        parts: dict[str, dict[str, tuple[str, str]]] = {}
        self.base_layers: dict[str, str] = {}  # module -> key of a saved base-layer copy
        for key in self.checkpoint.names():
            found = _module_of(key)
            if found is None:
                if key.endswith(_BASE_LAYER_SUFFIX):
                    self.base_layers[key[: -len(_BASE_LAYER_SUFFIX)].removeprefix(PEFT_PREFIX)] = key
                    continue
                raise MergeInputError(
                    f"{self.path}: tensor '{key}' is not a LoRA factor",
                    "only lora_A/lora_B (Linear) and lora_embedding_A/B (Embedding) tensors are supported; "
                    "DoRA magnitudes, biases and modules_to_save are not",
                )
            module, kind, which = found
            entry = parts.setdefault(module, {})
            entry[which] = (key, kind)
        if not parts:
            raise CheckpointError(f"{self.path}: the adapter holds no LoRA factors", "check the adapter folder")
        modules = {}
        for module in sorted(parts):
            entry = parts[module]
            if set(entry) != {"A", "B"}:
                missing = "B" if "A" in entry else "A"
                raise CheckpointError(f"{self.path}: module '{module}' has no lora_{missing} tensor")
            (a_key, kind), (b_key, _) = entry["A"], entry["B"]
            a, b = self.checkpoint.info(a_key), self.checkpoint.info(b_key)
            if len(a.shape) != 2 or len(b.shape) != 2:
                raise MergeInputError(
                    f"{self.path}: module '{module}' has factors of shapes {list(a.shape)} and {list(b.shape)}",
                    "only Linear and Embedding LoRA layers (2-d factors) are supported, not convolutions",
                )
            if a.shape[0] != b.shape[1]:
                raise CheckpointError(
                    f"{self.path}: module '{module}': lora_A {list(a.shape)} and lora_B {list(b.shape)} "
                    "disagree on the rank"
                )
            rank = a.shape[0]
            cfg_rank, alpha = self._rank_alpha(module)
            if cfg_rank != rank:
                raise CheckpointError(
                    f"{self.path}: module '{module}' has rank {rank} but adapter_config.json says {cfg_rank}",
                    "the config does not belong to these weights",
                )
            if not (a.dtype.is_floating_point and b.dtype.is_floating_point):
                raise MergeInputError(f"{self.path}: module '{module}' has non-floating factors ({a.dtype})")
            scale = alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank
            transposed = kind == "embedding" or (kind == "linear" and self.fan_in_fan_out)
            modules[module] = LoraModule(
                name=module,
                kind=kind,
                rank=rank,
                alpha=alpha,
                scale=scale,
                out_features=b.shape[0],
                in_features=a.shape[1],
                transposed=transposed,
                a_key=a_key,
                b_key=b_key,
                dtype=a.dtype,
            )
        return modules

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of ``module`` as float32."""
        m = self.modules[module]
        return self.checkpoint.read(m.a_key).to(torch.float32), self.checkpoint.read(m.b_key).to(torch.float32)

    def delta(self, module: str) -> torch.Tensor:
        """``scale * B @ A`` in the layout of the base weight (float32)."""
        m = self.modules[module]
        a, b = self.factors(module)
        d = (b * m.scale) @ a
        return d.T if m.transposed else d

    def close(self) -> None:
        self.checkpoint.close()

    def __enter__(self) -> LoraAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_adapter(path: str | Path) -> LoraAdapter:
    """Open a PEFT LoRA adapter folder; a ConvergentError saying what is wrong otherwise."""
    return LoraAdapter(path)


# -- writing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutModule:
    """A module of an adapter to write: its kind, rank and the shape of ``B @ A``."""

    name: str
    kind: str
    rank: int
    out_features: int
    in_features: int

    @property
    def keys(self) -> tuple[str, str]:
        if self.kind == "embedding":
            return f"{PEFT_PREFIX}{self.name}.lora_embedding_A", f"{PEFT_PREFIX}{self.name}.lora_embedding_B"
        return f"{PEFT_PREFIX}{self.name}.lora_A.weight", f"{PEFT_PREFIX}{self.name}.lora_B.weight"


def _leaf_targets(configs: list[dict[str, Any]], modules: list[str]) -> list[str] | None:
    """Union of the inputs' ``target_modules`` when that list names exactly the written modules' kind.

    Only when every input targeted a plain list of names over all layers (no
    layer filters, no exclusions), so the union selects, in the base model,
    exactly the union of the inputs' modules.
    """
    union: set[str] = set()
    for cfg in configs:
        targets = cfg.get("target_modules")
        if not isinstance(targets, list) or not targets:
            return None
        if cfg.get("layers_to_transform") is not None or cfg.get("layers_pattern") or cfg.get("exclude_modules"):
            return None
        union.update(str(t) for t in targets)
    for module in modules:
        if not any(module == t or module.endswith("." + t) for t in union):
            return None
    return sorted(union)


def adapter_config(template: Mapping[str, Any], modules: list[OutModule], configs: list[dict[str, Any]]) -> dict:
    """adapter_config.json for ``modules`` with scale 1 everywhere (lora_alpha = r per module).

    ``r`` is the most common rank; other ranks go to ``rank_pattern`` and
    ``alpha_pattern`` under the exact (regex-escaped) module path.
    """
    ranks = Counter(m.rank for m in modules)
    r = max(ranks.items(), key=lambda kv: (kv[1], kv[0]))[0]
    pattern = {re.escape(m.name): m.rank for m in modules if m.rank != r}
    names = [m.name for m in modules]
    cfg = dict(template)
    cfg.update(
        {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": r,
            "rank_pattern": pattern,
            "alpha_pattern": dict(pattern),
            "use_rslora": False,
            "use_dora": False,
            "target_modules": _leaf_targets(configs, names) or names,
            "modules_to_save": None,
            "inference_mode": True,
        }
    )
    for key in ("layers_to_transform", "layers_pattern", "exclude_modules"):
        if key in cfg:
            cfg[key] = None
    return cfg


class AdapterWriter:
    """Writes a LoRA adapter folder atomically, one module at a time (layout planned up front)."""

    def __init__(
        self,
        out_dir: Path,
        modules: list[OutModule],
        config: Mapping[str, Any],
        dtype: torch.dtype,
        overwrite: bool,
        extra: Mapping[str, TensorInfo] | None = None,
    ):
        self.modules = {m.name: m for m in modules}
        self.dtype = dtype
        self.config = dict(config)
        self.output = AtomicOutput(Path(out_dir), overwrite)
        plan: list[tuple[str, TensorInfo]] = []
        for m in modules:
            a_key, b_key = m.keys
            plan.append((a_key, TensorInfo(dtype, (m.rank, m.in_features))))
            plan.append((b_key, TensorInfo(dtype, (m.out_features, m.rank))))
        plan.extend((extra or {}).items())
        try:
            self.writer = ShardedWriter(self.output.tmp, plan, max_shard_size=1 << 62, prefix="adapter_model")
        except BaseException:
            self.output.abort()
            raise

    def write(self, module: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Write ``A`` [r, in] and ``B`` [out, r] (in ``B @ A`` layout, scale already folded in)."""
        a_key, b_key = self.modules[module].keys
        self.writer.write(a_key, a.to(self.dtype).contiguous())
        self.writer.write(b_key, b.to(self.dtype).contiguous())

    def write_tensor(self, key: str, tensor: torch.Tensor) -> None:
        self.writer.write(key, tensor.contiguous())

    def commit(self, hash_files: bool = False) -> dict[str, str]:
        """Finish and rename into place; returns file name -> sha256 (empty unless ``hash_files``)."""
        self.writer.close()
        text = json.dumps(self.config, indent=2, sort_keys=True) + "\n"
        (self.output.tmp / "adapter_config.json").write_text(text)
        files = {}
        if hash_files:
            files = {p.name: sha256_file(p) for p in sorted(self.output.tmp.iterdir()) if p.is_file()}
        self.output.commit()
        return files

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            self.output.abort()
