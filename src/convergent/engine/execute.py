"""The streaming merge engine: plan every tensor, then compute and write them in parallel.

Planning checks everything that can be checked without reading tensor data
(names, shapes, dtypes, parameters) so bad input fails before a byte is
written. Execution runs tensors on a thread pool; each tensor is read,
merged and written either whole or in row chunks sized from the memory
budget, and a byte budget shared by all workers keeps the total bounded.
Torch runs single-threaded inside each worker, which makes every reduction's
order independent of ``--threads``: the output bytes are the same for any
thread count and chunk size.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch

from convergent import determinism
from convergent.checkpoint.source import TensorInfo, TensorSource
from convergent.checkpoint.writer import AtomicOutput, ShardedWriter
from convergent.durable import sha256_file
from convergent.engine.buffers import ReadBuffers
from convergent.engine.job import MergeJob, MergeResult, OutputTensor
from convergent.errors import MergeInputError, RecipeError, suggest
from convergent.libc import libc
from convergent.strategies import kernels
from convergent.strategies.api import ModelParams, Params, Strategy, TensorBlocks
from convergent.strategies.run import get_strategy, make_task, run_strategy, validate_model_params, validate_params

LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")

#: float32 working copies per input plus the accumulator, output and a temporary.
_WORKSPACE = 3
#: Elements per input in one streamed chunk (4 MB of float32): float32 copies this
#: size are recycled by the allocator and stay near the cache, where 4x larger ones
#: made conversions 2-3x slower per element.
CHUNK_ELEMENTS = 1 << 20
#: A strategy with whole-tensor statistics holds its inputs (in their stored dtype)
#: when they take at most this share of a worker's budget; bigger tensors are
#: re-read for each pass, which costs little from the page cache.
HOLD_SHARE = 4


def layer_of(name: str) -> int | None:
    """The layer index in a tensor name like ``model.layers.7.mlp.up_proj.weight``."""
    match = LAYER_PATTERN.search(name)
    return int(match.group(1)) if match else None


@dataclass
class TensorPlan:
    """Everything needed to produce one output tensor."""

    name: str
    source_name: str  # name read from the base (and from every model unless model_names differ)
    model_names: list[str]
    strategy: Strategy
    base: TensorSource | None
    models: list[TensorSource]
    stats: dict[str, list[TensorSource | None]]  # only sources that hold this tensor
    info: TensorInfo  # input shape/dtype (reference)
    raw_itemsize: int  # widest stored dtype among the inputs
    out: TensorInfo
    params: Params
    model_params: tuple[ModelParams, ...]
    layer: int | None
    num_layers: int | None
    #: "copy" (non-float), "whole" (held and applied whole), "hold" (held whole for
    #: prepare, applied in chunks) or "stream" (read, merged, written chunk by chunk).
    mode: str
    chunk_rows: int

    @property
    def copy_only(self) -> bool:
        return self.mode == "copy"

    @property
    def n_inputs(self) -> int:
        return len(self.models) + (self.base is not None)

    @property
    def need_bytes(self) -> int:
        return _need_bytes(self.mode, self.info.shape, self.chunk_rows, self.n_inputs, self.raw_itemsize)


class _ByteBudget:
    """Counting semaphore over bytes: a tensor starts only when its working set fits."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, amount: int):
        amount = min(amount, self.limit)  # an oversized tensor runs alone
        with self._cond:
            self._cond.wait_for(lambda: self.used + amount <= self.limit)
            self.used += amount
        try:
            yield
        finally:
            with self._cond:
                self.used -= amount
                self._cond.notify_all()


class _ParamResolver:
    """Splits raw per-tensor settings into validated global and per-model parameters."""

    def __init__(self, strat: Strategy, job: MergeJob, labels: list[str]):
        self.strat = strat
        self.job = job
        self.labels = labels
        self.global_fields = set(strat.params.model_fields)
        self.model_fields = set(strat.model_params.model_fields)
        self._cache: dict[str, Any] = {}

    def _cached(self, kind: str, values: dict[str, Any], build) -> Any:
        key = kind + json.dumps(values, sort_keys=True, default=str)
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def resolve(self, name: str, layer: int | None, num_layers: int | None, models: list[int]):
        raw = dict(self.job.params(name, layer, num_layers))
        unknown = [k for k in raw if k not in self.global_fields and k not in self.model_fields]
        if unknown:
            allowed = sorted(self.global_fields | self.model_fields)
            raise RecipeError(
                f"unknown parameter '{unknown[0]}' for merge method '{self.strat.name}'",
                f"{(suggest(unknown[0], allowed) or '')} allowed: {', '.join(allowed) or 'none'}".strip(),
            )
        glob = {k: v for k, v in raw.items() if k in self.global_fields}
        shared_model = {k: v for k, v in raw.items() if k in self.model_fields}
        params = self._cached("g", glob, lambda: validate_params(self.strat, glob))
        model_params = []
        for i in models:
            values = {**shared_model, **dict(self.job.models[i].params(name, layer, num_layers))}
            label = self.labels[i]
            model_params.append(
                self._cached(f"m{label}", values, lambda v=values, lb=label: validate_model_params(self.strat, v, lb))
            )
        return params, tuple(model_params)


def _count_layers(names: list[str]) -> int | None:
    layers = {layer for n in names if (layer := layer_of(n)) is not None}
    return (max(layers) + 1) if layers else None


def plan_merge(job: MergeJob) -> list[TensorPlan]:
    """Validate ``job`` against the inputs' headers and plan every output tensor."""
    default = get_strategy(job.method)
    if not job.models:
        raise RecipeError("no models to merge", "list at least one model")
    labels = [m.source.label for m in job.models]
    reference = job.base if job.base is not None else job.models[0].source
    outputs = job.tensors or [OutputTensor(n, n) for n in reference.names()]
    if job.tensors is None:
        _check_same_names(job, reference)
    num_layers = _count_layers([o.name for o in outputs])
    resolvers: dict[str, _ParamResolver] = {}
    names = _NameSets()
    plans = []
    for out in outputs:
        strat = get_strategy(out.method) if out.method else default
        model_ids = list(out.models) if out.models is not None else list(range(len(job.models)))
        if strat.base == "required" and job.base is None:
            raise RecipeError(f"merge method '{strat.name}' needs a base_model", "add base_model: to the recipe")
        count = len(model_ids)
        if count < strat.min_models or (strat.max_models is not None and count > strat.max_models):
            most = "" if strat.max_models is None else f" and at most {strat.max_models}"
            raise RecipeError(
                f"merge method '{strat.name}' takes at least {strat.min_models}{most} models, got {count}"
            )
        base = job.base if strat.base != "none" else None
        models = [job.models[i].source for i in model_ids]
        model_names = list(out.model_source_names or [out.source_name] * len(models))
        info, raw_itemsize = _check_tensor(out.source_name, model_names, base, models, reference, names)
        out_dtype = job.dtype if (job.dtype is not None and info.dtype.is_floating_point) else info.dtype
        layer = layer_of(out.name)
        resolver = resolvers.setdefault(strat.name, _ParamResolver(strat, job, labels))
        if out.params is not None:
            resolver = _ParamResolver(strat, _with_params(job, out.params), labels)
        params, model_params = resolver.resolve(out.name, layer, num_layers, model_ids)
        stats = {
            kind: [_holding(job.models[i].statistics.get(kind), n, names) for i, n in zip(model_ids, model_names)]
            for kind in strat.statistics
        }
        if strat.chunkable:
            _check_row_aligned(stats, model_names, info, [labels[i] for i in model_ids])
        plans.append(
            TensorPlan(
                name=out.name,
                source_name=out.source_name,
                model_names=model_names,
                strategy=strat,
                base=base,
                models=models,
                stats=stats,
                info=info,
                raw_itemsize=raw_itemsize,
                out=TensorInfo(out_dtype, info.shape),
                params=params,
                model_params=model_params,
                layer=layer,
                num_layers=num_layers,
                **_layout(job, info, len(models) + (base is not None), strat, raw_itemsize),
            )
        )
    return plans


def _check_row_aligned(
    stats: dict[str, list[TensorSource | None]], names: list[str], info: TensorInfo, labels: list[str]
) -> None:
    """Statistics that stream with the rows of a weight must have exactly its shape."""
    for kind, sources in stats.items():
        for src, label, name in zip(sources, labels, names):
            if src is not None and tuple(src.info(name).shape) != tuple(info.shape):
                raise MergeInputError(
                    f"{kind} statistics for tensor '{name}' of {label} have shape {list(src.info(name).shape)}, "
                    f"the weight has {list(info.shape)}",
                    "recompute the statistics for this checkpoint (convergent stats)",
                )


def _holding(src: TensorSource | None, name: str, names: _NameSets) -> TensorSource | None:
    return src if src is not None and names.has(src, name) else None


def _with_params(job: MergeJob, params) -> MergeJob:
    from dataclasses import replace

    return replace(job, params=params)


def _check_same_names(job: MergeJob, reference: TensorSource) -> None:
    ref_names = set(reference.names())
    for model in job.models:
        extra = sorted(set(model.source.names()) - ref_names)
        if extra:
            raise MergeInputError(
                f"tensor '{extra[0]}' is in {model.source.label} but not in {reference.label}"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""),
                "merge checkpoints of the same architecture",
            )


class _NameSets:
    """Each source's tensor names as a set, computed once."""

    def __init__(self) -> None:
        self._sets: dict[int, set[str]] = {}

    def has(self, src: TensorSource, name: str) -> bool:
        if id(src) not in self._sets:
            self._sets[id(src)] = set(src.names())
        return name in self._sets[id(src)]


def _check_tensor(
    name: str,
    model_names: list[str],
    base: TensorSource | None,
    models: list[TensorSource],
    reference: TensorSource,
    names: _NameSets,
) -> tuple[TensorInfo, int]:
    """The reference info of tensor ``name`` and the widest stored itemsize among its inputs."""
    sources = ([base] if base is not None else []) + models
    wanted = ([name] if base is not None else []) + model_names
    infos: list[TensorInfo] = []
    for src, name in zip(sources, wanted):
        if not names.has(src, name):
            raise MergeInputError(
                f"tensor '{name}' is in {reference.label} but missing from {src.label}",
                "merge checkpoints of the same architecture",
            )
        infos.append(src.info(name))
    shapes = {tuple(i.shape) for i in infos}
    if len(shapes) > 1:
        listing = ", ".join(f"{s.label}: {list(i.shape)}" for s, i in zip(sources, infos, strict=False))
        raise MergeInputError(f"shape mismatch for tensor '{name}': {listing}", "merge models of the same size")
    floating = {i.dtype.is_floating_point for i in infos}
    if len(floating) > 1:
        raise MergeInputError(f"tensor '{name}' is floating point in some inputs and not in others")
    return infos[0], max(i.dtype.itemsize for i in infos)


def _need_bytes(mode: str, shape: tuple[int, ...], chunk_rows: int, n_inputs: int, raw_itemsize: int) -> int:
    """Working set of one tensor: stored-dtype reads, float32 copies of a chunk, workspace."""
    rows = determinism.num_rows(shape)
    per_row = determinism.row_numel(shape)
    chunk = min(rows, chunk_rows)
    f32_chunk = per_row * chunk * 4 * (n_inputs + _WORKSPACE)
    if mode == "stream":
        return per_row * chunk * raw_itemsize * n_inputs + f32_chunk
    return per_row * rows * raw_itemsize * n_inputs + f32_chunk


def _layout(job: MergeJob, info: TensorInfo, n_inputs: int, strat: Strategy, raw_itemsize: int) -> dict[str, Any]:
    """How a tensor is processed (mode) and in how many rows per chunk."""
    rows = determinism.num_rows(info.shape)
    if not info.dtype.is_floating_point:
        return {"mode": "copy", "chunk_rows": rows}
    if not strat.chunkable:
        return {"mode": "whole", "chunk_rows": rows}
    block = determinism.block_rows(info.shape)
    per_row = determinism.row_numel(info.shape)
    per_worker = job.memory_limit // max(1, job.threads)
    if job.chunk_rows is not None:
        wanted = job.chunk_rows
    else:
        wanted = min(
            CHUNK_ELEMENTS // per_row, per_worker // (per_row * (raw_itemsize * n_inputs + 4 * (n_inputs + _WORKSPACE)))
        )
    chunk = min(rows, max(block, wanted // block * block))
    if chunk >= rows:
        return {"mode": "whole", "chunk_rows": rows}
    # Strategies with whole-tensor statistics read their inputs once when they fit.
    held = rows * per_row * raw_itemsize * n_inputs
    if strat.prepare is not None and held <= per_worker // HOLD_SHARE and job.chunk_rows is None:
        return {"mode": "hold", "chunk_rows": chunk}
    return {"mode": "stream", "chunk_rows": chunk}


class _Executor:
    def __init__(self, job: MergeJob, plans: list[TensorPlan], writer: ShardedWriter):
        self.job = job
        self.plans = plans
        self.writer = writer
        self.budget = _ByteBudget(job.memory_limit)
        self.buffers = ReadBuffers()
        self.total = sum(p.out.nbytes for p in plans)
        self.done = 0
        self._lock = threading.Lock()

    def _load_raw(
        self, src: TensorSource, rows: tuple[int, int] | None, name: str, slot: int, probe: bool = True
    ) -> torch.Tensor:
        """Tensor ``name`` (or some rows) in its stored dtype: mapped from the file, or read into buffer ``slot``.

        Valid until the plan's inputs are released (``_release``) or the slot is read again.

        ``probe``: check it for NaN/Inf (unless ``--allow-nonfinite``).
        """
        info = src.info(name)
        raw = src.view(name, rows)
        if raw is None:
            whole = rows is None or not info.shape
            count = info.numel if whole else (rows[1] - rows[0]) * determinism.row_numel(info.shape)  # type: ignore[index]
            raw = src.read(name, rows, out=self.buffers.get(slot, count * info.dtype.itemsize))
        if probe and info.dtype.is_floating_point and not self.job.allow_nonfinite:
            self._check_finite(raw, src, name)
        return raw

    def _check_output(self, plan: TensorPlan, out: torch.Tensor, start: int) -> None:
        """For strategies that propagate NaN/Inf: one probe of the output replaces one per input.

        A non-finite output then names the input that caused it (read afresh:
        held inputs stay untouched); when every input is finite, the output
        simply overflowed, which is not an input error.
        """
        if self.job.allow_nonfinite or not plan.strategy.propagates_nonfinite:
            return
        if _all_finite(out):
            return
        rows = (start, start + (out.shape[0] if out.dim() else 1)) if plan.info.shape else None
        for src, name in self._sources(plan):
            self._check_finite(src.read(name, rows), src, name)

    @staticmethod
    def _check_finite(raw: torch.Tensor, src: TensorSource, name: str) -> None:
        if not _all_finite(raw):
            raise MergeInputError(
                f"tensor '{name}' in {src.label} contains NaN or Inf",
                "fix the checkpoint, or pass --allow-nonfinite to merge anyway",
            )

    def _load(
        self, src: TensorSource, rows: tuple[int, int] | None, name: str, slot: int, probe: bool = True
    ) -> torch.Tensor:
        """A float32 copy of the tensor or rows (its own memory: strategies may keep it)."""
        return self._load_raw(src, rows, name, slot, probe).to(torch.float32, copy=True)

    def _load_stats(self, plan: TensorPlan, rows: tuple[int, int] | None) -> dict[str, list[torch.Tensor | None]]:
        out: dict[str, list[torch.Tensor | None]] = {}
        for kind, sources in plan.stats.items():
            out[kind] = [s.read(plan.source_name, rows).to(torch.float32) if s is not None else None for s in sources]
        return out

    def run_one(self, plan: TensorPlan) -> None:
        with self.budget.hold(plan.need_bytes):
            try:
                if plan.mode == "copy":
                    self._copy(plan)
                elif plan.mode == "stream":
                    self._streamed(plan)
                else:
                    self._held(plan)
            finally:
                self.buffers.trim()
                self._release(plan)
        with self._lock:
            self.done += plan.out.nbytes
            if self.job.progress:
                self.job.progress(self.done, self.total)

    def _copy(self, plan: TensorPlan) -> None:
        sources = self._sources(plan)
        first = self._load_raw(sources[0][0], None, sources[0][1], 0)
        for src, name in sources[1:]:
            if not torch.equal(first, self._load_raw(src, None, name, 1)):
                raise MergeInputError(
                    f"non-floating tensor '{name}' differs between {sources[0][0].label} and {src.label}",
                    "integer and boolean tensors cannot be merged arithmetically; make them equal",
                )
        self.writer.write(plan.name, first)

    def _release(self, plan: TensorPlan, rows: tuple[int, int] | None = None) -> None:
        """Unmap the plan's inputs (or those rows) from this process; the page cache keeps them."""
        for src, name in self._sources(plan):
            src.release(name, rows)

    @staticmethod
    def _sources(plan: TensorPlan) -> list[tuple[TensorSource, str]]:
        base = [(plan.base, plan.source_name)] if plan.base is not None else []
        return base + list(zip(plan.models, plan.model_names))

    def _read_inputs(self, plan: TensorPlan, rows: tuple[int, int] | None, raw: bool = False, probe: bool = True):
        """Base and models: float32 copies, or (``raw``) stored-dtype views of the read buffers.

        ``probe``: False when these rows have had their NaN/Inf probe already.
        """
        load = self._load_raw if raw else self._load
        probe = probe and not plan.strategy.propagates_nonfinite  # else the output is checked (_check_output)
        base = load(plan.base, rows, plan.source_name, 0, probe) if plan.base is not None else None
        models = [load(m, rows, n, 1 + i, probe) for i, (m, n) in enumerate(zip(plan.models, plan.model_names))]
        return base, models

    def _key(self, plan: TensorPlan) -> bytes:
        return determinism.seed_key(self.job.seed, plan.name)

    def _held(self, plan: TensorPlan) -> None:
        """Inputs read whole once (stored dtype; float32 block by block); results written chunk by chunk."""
        base, models = self._read_inputs(plan, None, raw=True)

        def sink(out: torch.Tensor, start: int) -> None:
            self._check_output(plan, out, start)
            self.writer.write(plan.name, out.to(plan.out.dtype), start)

        run_strategy(
            plan.strategy,
            plan.name,
            plan.info.shape,
            base,
            models,
            plan.params,
            plan.model_params,
            self._key(plan),
            chunk_rows=plan.chunk_rows,
            layer=plan.layer,
            num_layers=plan.num_layers,
            extras=self._load_stats(plan, None),
            sink=sink,
            out_dtype=plan.out.dtype,
        )

    def _streamed(self, plan: TensorPlan) -> None:
        """Inputs read, merged and written one chunk of rows at a time."""
        strat = plan.strategy
        key = self._key(plan)

        loaded: list[tuple[int, int]] = []  # the rows mapped last: streaming keeps one chunk resident
        # rows [0, probed) have had their NaN/Inf probe: a strategy's prepare pass reads the
        # tensor in order, and the apply pass then need not probe the same rows again
        probed = 0

        def load(start: int, stop: int):
            nonlocal probed
            rows = (start, stop)
            if loaded:
                self._release(plan, loaded.pop())
            loaded.append(rows)
            base, models = self._read_inputs(plan, rows, raw=strat.raw_inputs, probe=stop > probed)
            if start <= probed:
                probed = max(probed, stop)
            return make_task(
                strat,
                plan.name,
                plan.info.shape,
                rows,
                base,
                models,
                plan.params,
                plan.model_params,
                key,
                plan.layer,
                plan.num_layers,
                self._load_stats(plan, rows),
                plan.out.dtype,
            )

        prepared = None
        if strat.prepare is not None:
            prepared = strat.prepare(TensorBlocks(plan.name, plan.info.shape, plan.params, plan.model_params, load))
        total = determinism.num_rows(plan.info.shape)
        for start in range(0, total, plan.chunk_rows):
            stop = min(total, start + plan.chunk_rows)
            out = strat.apply(load(start, stop), prepared)
            self._check_output(plan, out, start)
            self.writer.write(plan.name, out.to(plan.out.dtype), start)

    def run(self) -> None:
        # Biggest first packs the byte budget best; order never affects the bytes written.
        ordered = sorted(self.plans, key=lambda p: (-p.out.nbytes, p.name))
        if self.job.threads <= 1:
            for plan in ordered:
                self.run_one(plan)
            return
        with ThreadPoolExecutor(max_workers=self.job.threads, thread_name_prefix="merge") as pool:
            futures = [pool.submit(self.run_one, p) for p in ordered]
            _done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for f in pending:
                f.cancel()
            for f in futures:
                if f.done() and not f.cancelled() and f.exception() is not None:
                    raise f.exception()  # type: ignore[misc]


def _keep_freed_memory() -> None:
    """Ask glibc to recycle freed chunk buffers instead of returning them to the OS.

    Every chunk allocates and frees tens of MB; with glibc's defaults each new
    buffer is a fresh mmap that page-faults on first touch, which costs more
    than the arithmetic. Raising the mmap and trim thresholds keeps them in the
    heap (the peak working set is bounded by the memory budget anyway).
    No-op elsewhere than glibc.
    """
    lib = libc()
    mallopt = None if lib is None else getattr(lib, "mallopt", None)
    if mallopt is not None:
        mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD
        mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD


@contextmanager
def _single_threaded_torch():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``: by the fused kernels' bit test once loaded, else with torch (the same answer)."""
    finite = kernels.all_finite(t)
    if finite is not None:
        return finite
    # A sum is non-finite whenever an element is; confirm exactly only then. bfloat16
    # and float32 sums share float32's range (float16 sums would overflow).
    probe = t if t.dtype in (torch.bfloat16, torch.float32) else t.to(torch.float32)
    return math.isfinite(float(probe.sum())) or bool(torch.isfinite(t).all())


def _start_warm_ups(plans: list[TensorPlan]) -> list[threading.Thread]:
    """Start the strategies' warm-ups on threads of their own: they overlap the first reads.

    A failing warm-up is ignored; the same failure then surfaces, with its
    context, where the strategy really runs. The caller joins the threads, so
    none outlives the merge.
    """

    def quietly(fn: Callable[[], None]) -> None:
        with suppress(Exception):
            fn()

    threads = [
        threading.Thread(target=quietly, args=(fn,), name="warm-up", daemon=True)
        for fn in {p.strategy.warm_up for p in plans if p.strategy.warm_up is not None}
    ]
    for t in threads:
        t.start()
    return threads


def run_merge(job: MergeJob, hash_outputs: bool = True) -> MergeResult:
    """Plan, execute and atomically write ``job``; returns the files written with sha256."""
    started = time.perf_counter()
    plans = plan_merge(job)
    warm_ups = _start_warm_ups(plans)
    _keep_freed_memory()
    with AtomicOutput(job.out_dir, job.overwrite) as output:
        writer = ShardedWriter(output.tmp, [(p.name, p.out) for p in plans], job.max_shard_size)
        try:
            with _single_threaded_torch():
                _Executor(job, plans, writer).run()
        finally:
            writer.close()
            for t in warm_ups:
                t.join()
        for name, src in sorted(job.files.items()):
            shutil.copyfile(src, output.tmp / name)
        for name, data in sorted(job.extra_files.items()):
            (output.tmp / name).write_bytes(data)
        files: dict[str, str] = {}
        if hash_outputs or job.finalize is not None:
            files = {p.name: sha256_file(p) for p in sorted(output.tmp.iterdir()) if p.is_file()}
        if job.finalize is not None:
            for name, data in sorted(job.finalize(dict(files)).items()):
                (output.tmp / name).write_bytes(data)
        output.commit()
    return MergeResult(
        out_dir=job.out_dir,
        files=files,
        tensors=len(plans),
        parameters=sum(p.out.numel for p in plans),
        seconds=time.perf_counter() - started,
    )
