"""Statistics that statistics-aware merges consume: diagonal Fisher and input Gram matrices.

Both are computed with transformers on the user's examples and saved as one
``.safetensors`` file whose tensors are named like the model's weights, so
the engine can hand them to a strategy as ``task.extras[kind]``:

* ``fisher`` (:func:`compute_fisher`): the **empirical** diagonal Fisher, the
  mean over examples of the squared gradient of one example's loss, with the
  same shape as each weight::

      F = 1/N sum_n (d loss_n / d theta)^2

  Gradients are taken per example (one forward/backward each, no padding),
  so F is exactly the mean of per-example squared gradients. ``loss_n`` is:

  - causal LMs (``target="lm"``, the default for them): the mean next-token
    cross-entropy of the example's own text (the LM loss);
  - sequence classifiers and per-token heads (masked LM, token
    classification), ``target="predicted"``, the default for them: the
    negative log-likelihood of the model's own predicted label (argmax of the
    logits; per position, averaged, for per-token heads). No labels needed.

  A bare encoder without a head has no output distribution: refused.

* ``gram`` (:func:`compute_gram`): for every ``nn.Linear`` with weight
  ``W`` [d_out, d_in] (named ``<module>.weight``), the Gram matrix of its
  inputs ``G = X^T X / N`` [d_in, d_in], ``X`` the [N, d_in] rows seen by the
  layer over all examples (padding positions excluded), accumulated in
  float64 and saved as float32. This is RegMean's statistic.

File metadata (strings): ``kind``, ``samples`` (examples used), ``tokens``,
``model_sha256`` (:func:`convergent.stats.hf.checkpoint_hash` of the model
the statistics belong to), ``target`` (fisher only), ``max_length``,
``architecture``, ``creator``.

Memory: the model in float32 plus, for Fisher, its gradients and a float64
accumulator (about 16 bytes per parameter); for Gram, ``8 * d_in^2`` bytes
per linear layer.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from convergent.checkpoint import open_checkpoint
from convergent.errors import ConvergentError, MergeInputError, OutputError
from convergent.stats.data import DataError, load_texts
from convergent.stats.hf import CAUSAL_LM, NO_HEAD, LoadedModel, batches, checkpoint_hash, load_model
from convergent.stats.hf import pad_id as _pad_id
from convergent.stats.hf import tokenize as _tokenize

KINDS = ("fisher", "gram")
Progress = Callable[[int, int], None]


class StatisticsError(ConvergentError):
    """Statistics cannot be computed, or a statistics file does not fit its model."""


@dataclass
class Statistics:
    """Computed statistics, float32 tensors named like the model's weights."""

    kind: str
    tensors: dict[str, torch.Tensor]
    samples: int
    tokens: int
    metadata: dict[str, str] = field(default_factory=dict)


def _checkpoint_names(path: Path) -> set[str]:
    ckpt = open_checkpoint(path)
    try:
        return set(ckpt.names())
    finally:
        ckpt.close()


def _prepare(
    model_dir: str | Path, texts: Sequence[str], max_samples: int | None, max_length: int
) -> tuple[LoadedModel, list[list[int]], set[str]]:
    if max_samples is not None:
        texts = list(texts)[:max_samples]
    if not texts:
        raise DataError("no examples to compute statistics on", "give a data file with at least one example")
    loaded = load_model(model_dir)
    ids = _tokenize(loaded.tokenizer, texts, max_length)
    if not ids:
        raise DataError("every example tokenised to nothing", "check the data file and the model's tokenizer")
    return loaded, ids, _checkpoint_names(Path(model_dir))


def _metadata(kind: str, loaded: LoadedModel, samples: int, tokens: int, max_length: int, **extra: str) -> dict:
    return {
        "format": "pt",
        "creator": "convergent",
        "kind": kind,
        "samples": str(samples),
        "tokens": str(tokens),
        "max_length": str(max_length),
        "architecture": loaded.architecture,
        "model_sha256": checkpoint_hash(loaded.path),
        **extra,
    }


def default_target(kind: str) -> str:
    return "lm" if kind == CAUSAL_LM else "predicted"


def example_loss(loaded: LoadedModel, input_ids: torch.Tensor, target: str) -> torch.Tensor | None:
    """The loss of one example ([1, T] ids) whose gradient the Fisher squares; None if undefined."""
    logits = loaded.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
    if target == "lm":
        if input_ids.shape[1] < 2:
            return None  # no next token to predict
        return torch.nn.functional.cross_entropy(logits[0, :-1].float(), input_ids[0, 1:])
    flat = logits.reshape(-1, logits.shape[-1]).float()
    predicted = flat.detach().argmax(dim=-1)
    return torch.nn.functional.cross_entropy(flat, predicted)


def compute_fisher(
    model_dir: str | Path,
    texts: Sequence[str],
    *,
    max_samples: int | None = None,
    max_length: int = 512,
    batch_size: int = 8,
    target: str = "auto",
    progress: Progress | None = None,
) -> Statistics:
    """Empirical diagonal Fisher of the model in ``model_dir`` on ``texts`` (see the module doc).

    ``target``: "lm" (next-token loss, causal LMs only), "predicted" (own
    predicted label) or "auto" (lm for causal LMs, predicted otherwise).
    ``batch_size`` is accepted for symmetry with :func:`compute_gram`;
    gradients are always per example.
    """
    del batch_size  # per-example gradients: no batching (documented)
    loaded, ids, ckpt_names = _prepare(model_dir, texts, max_samples, max_length)
    if loaded.kind == NO_HEAD:
        raise StatisticsError(
            f"{model_dir}: {loaded.architecture} has no output head, so it defines no likelihood for a Fisher",
            "compute the Fisher of a model with a head (…ForCausalLM, …ForSequenceClassification, …ForMaskedLM)",
        )
    if target == "auto":
        target = default_target(loaded.kind)
    if target not in ("lm", "predicted"):
        raise StatisticsError(f"unknown Fisher target '{target}'", "use lm, predicted or auto")
    if target == "lm" and loaded.kind != CAUSAL_LM:
        raise StatisticsError(f"Fisher target 'lm' needs a causal LM, {loaded.architecture} is not one")
    model = loaded.model
    params = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    for _, p in params:
        p.requires_grad_(True)
    acc = {id(p): torch.zeros(p.shape, dtype=torch.float64) for _, p in params}
    used = tokens = 0
    for i, example in enumerate(ids):
        model.zero_grad(set_to_none=True)
        x = torch.tensor([example], dtype=torch.long)
        loss = example_loss(loaded, x, target)
        if loss is not None:
            loss.backward()
            for _, p in params:
                if p.grad is not None:
                    acc[id(p)] += p.grad.detach().to(torch.float64).square()
            used += 1
            tokens += len(example)
        if progress is not None:
            progress(i + 1, len(ids))
    model.zero_grad(set_to_none=True)
    if used == 0:
        raise DataError(
            "no example gave a loss (each needs at least 2 tokens for a language-model loss)",
            "use longer examples or a larger --max-length",
        )
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in ckpt_names and id(p) in acc:
            out[name] = (acc[id(p)] / used).to(torch.float32)
    if not out:
        raise StatisticsError(
            f"{model_dir}: none of the model's parameter names are tensor names of the checkpoint",
            "the folder's weights and its config.json architecture do not match",
        )
    meta = _metadata("fisher", loaded, used, tokens, max_length, target=target)
    return Statistics("fisher", dict(sorted(out.items())), used, tokens, meta)


def compute_gram(
    model_dir: str | Path,
    texts: Sequence[str],
    *,
    max_samples: int | None = None,
    max_length: int = 512,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> Statistics:
    """Gram matrices ``X^T X / N`` of every ``nn.Linear``'s inputs (see the module doc)."""
    loaded, ids, ckpt_names = _prepare(model_dir, texts, max_samples, max_length)
    model = loaded.model
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    current: dict[str, torch.Tensor | None] = {"mask": None}
    hooks = []

    def make_hook(name: str):
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            mask = current["mask"]
            if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                rows = x[mask]
            else:
                rows = x.reshape(-1, x.shape[-1])
            rows = rows.detach().reshape(-1, x.shape[-1]).to(torch.float64)
            if name not in sums:
                sums[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64)
                counts[name] = 0
            sums[name] += rows.T @ rows
            counts[name] += rows.shape[0]

        return hook

    for mod_name, module in model.named_modules():
        weight_name = f"{mod_name}.weight" if mod_name else "weight"
        if isinstance(module, torch.nn.Linear) and weight_name in ckpt_names:
            hooks.append(module.register_forward_pre_hook(make_hook(weight_name)))
    if not hooks:
        raise StatisticsError(
            f"{model_dir}: no nn.Linear layer whose weight is a tensor of the checkpoint",
            "Gram statistics cover torch.nn.Linear layers only (not Conv1D as in GPT-2)",
        )
    tokens = done = 0
    pad = _pad_id(loaded.tokenizer)
    try:
        with torch.no_grad():
            for input_ids, mask in batches(ids, batch_size, pad):
                current["mask"] = mask.bool()
                model(input_ids=input_ids, attention_mask=mask)
                tokens += int(mask.sum())
                done += input_ids.shape[0]
                if progress is not None:
                    progress(done, len(ids))
    finally:
        for h in hooks:
            h.remove()
    out = {name: (sums[name] / counts[name]).to(torch.float32) for name in sorted(sums) if counts[name] > 0}
    meta = _metadata("gram", loaded, len(ids), tokens, max_length)
    return Statistics("gram", out, len(ids), tokens, meta)


def save_statistics(stats: Statistics, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``stats`` to ``path`` atomically (temp file + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"{path} already exists", "choose another --out or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:12]}"
    try:
        save_file({k: v.contiguous() for k, v in stats.tensors.items()}, str(tmp), metadata=stats.metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def compute_statistics(
    model_dir: str | Path,
    data: str | Path,
    kind: str,
    *,
    max_samples: int | None = None,
    max_length: int = 512,
    batch_size: int = 8,
    target: str = "auto",
    progress: Progress | None = None,
) -> Statistics:
    """Read the examples in ``data`` and compute statistics ``kind`` ("fisher" or "gram")."""
    if kind not in KINDS:
        raise StatisticsError(f"unknown statistics kind '{kind}'", "use fisher or gram")
    if max_length < 1 or batch_size < 1:
        raise StatisticsError("--max-length and --batch-size must be at least 1")
    texts = load_texts(data, max_samples)
    if kind == "fisher":
        return compute_fisher(
            model_dir, texts, max_length=max_length, batch_size=batch_size, target=target, progress=progress
        )
    return compute_gram(model_dir, texts, max_length=max_length, batch_size=batch_size, progress=progress)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a statistics file written by :func:`save_statistics`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise StatisticsError(f"statistics file {path} not found", "compute one with 'convergent stats'")
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as exc:
        raise StatisticsError(f"{path} is not a safetensors file ({exc})") from None
    return meta


def check_statistics(
    stats_path: str | Path, checkpoint: str | Path | object, kind: str | None = None, model_sha256: str | None = None
) -> dict[str, str]:
    """Check that a statistics file fits a checkpoint; returns its metadata.

    ``checkpoint`` is a path or an open :class:`~convergent.checkpoint.source.TensorSource`.
    Checks: the file's ``kind`` (and ``kind`` if given); every tensor names a
    tensor of the checkpoint; Fisher tensors have the weight's shape, Gram
    tensors are [d_in, d_in] for a 2-D weight [d_out, d_in]; values are
    finite (and non-negative for Fisher); with ``model_sha256``, the file was
    computed on that model. Problems are a MergeInputError naming the tensor.
    """
    meta = read_metadata(stats_path)
    file_kind = meta.get("kind")
    if file_kind not in KINDS:
        raise MergeInputError(f"{stats_path}: not a convergent statistics file (no kind fisher/gram in its metadata)")
    if kind is not None and file_kind != kind:
        raise MergeInputError(f"{stats_path} holds '{file_kind}' statistics, expected '{kind}'")
    if model_sha256 is not None and meta.get("model_sha256") not in (None, model_sha256):
        raise MergeInputError(
            f"{stats_path} was computed on another model (model_sha256 {meta.get('model_sha256', '')[:12]}…)",
            "compute the statistics on this contribution's own checkpoint",
        )
    source = open_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    stats = open_checkpoint(stats_path)
    try:
        names = set(source.names())
        for name in stats.names():
            if name not in names:
                raise MergeInputError(f"{stats_path}: tensor '{name}' is not a tensor of {source.label}")
            weight = tuple(source.info(name).shape)
            got = tuple(stats.info(name).shape)
            if file_kind == "fisher":
                want = weight
            elif len(weight) == 2:
                want = (weight[1], weight[1])
            else:
                raise MergeInputError(f"{stats_path}: Gram matrix for '{name}', which is not a 2-D weight")
            if got != want:
                raise MergeInputError(
                    f"{stats_path}: {file_kind} of tensor '{name}' has shape {list(got)}, expected {list(want)}"
                )
            value = stats.read(name).to(torch.float32)
            if not bool(torch.isfinite(value).all()):
                raise MergeInputError(f"{stats_path}: {file_kind} of tensor '{name}' has NaN or inf")
            if file_kind == "fisher" and bool((value < 0).any()):
                raise MergeInputError(f"{stats_path}: Fisher of tensor '{name}' has negative values")
    finally:
        stats.close()
        if isinstance(checkpoint, (str, Path)):
            source.close()  # type: ignore[union-attr]
    return meta


__all__ = [
    "KINDS",
    "Statistics",
    "StatisticsError",
    "check_statistics",
    "compute_fisher",
    "compute_gram",
    "compute_statistics",
    "read_metadata",
    "save_statistics",
]
