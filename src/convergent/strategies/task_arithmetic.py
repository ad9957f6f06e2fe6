"""Generalized task arithmetic: mergekit's task_arithmetic, TIES, DARE, breadcrumbs, DELLA family.

Every method of the family is the same pipeline over task vectors
``delta_i = model_i - base`` (mergekit 0.1.5, ``GeneralizedTaskArithmeticMerge``):

1. sparsify each ``delta_i`` (magnitude top-k for TIES, random drop for DARE,
   magnitude band for breadcrumbs, rank-dependent random drop for DELLA), and
   with ``rescale`` multiply the survivors by ``sum|delta_i| / sum|kept_i|``
   (mergekit's L1 rescaling, over the whole tensor);
2. multiply by ``weight``;
3. with sign consensus (TIES-style methods) keep, per element, only the
   deltas whose sign is the majority sign (sign of the sum of the weighted
   deltas, or of the count of signs with ``consensus_method: count``);
4. sum; with ``normalize`` divide by the sum of the weights (of the agreeing
   models under consensus; 1 where that is 0); multiply by ``lambda``; add the
   base.

Whole-tensor statistics (top-k thresholds, L1 sums) are computed in
``prepare`` from fixed blocks: thresholds exactly by
:func:`convergent.strategies.order_stats.kth_largest_abs_many` (one pass
bracketed by a sample, or a two-pass radix select; one more pass only with
``rescale``), sums in float64 over fixed pieces added in order (for the
masking sparsifiers, DARE and DELLA, in the fixed lane order of
``fused_kernels.masked_l1``). ``apply`` is then elementwise (row-local for
DELLA), so a tensor merged whole or in row chunks, on any number of threads,
gives the same bytes. Random keep masks come from ``task.keep_mask(f"dare/{i}")``
/ ``task.keep_mask(f"della/{i}")`` (model i; counter-based, chunk-invariant);
DELLA's, costly to rank, are kept from the rescale pass for ``apply``.

Parameters are mergekit's, with its per-method defaults. Differences:
``weight`` defaults to 1 (mergekit requires it), ``int8_mask`` is accepted
and changes nothing (it only saves memory in mergekit), and the consensus
methods also take ``consensus_method: count`` (mergekit always uses ``sum``).

Ties at a selection boundary: like mergekit, exactly ``k`` elements are kept
(bf16 checkpoints have many equal magnitudes, so this matters). mergekit picks
among equal magnitudes in ``argsort`` order, which is unspecified; here the
first ones in flat (row-major) order over the whole tensor are kept, which is
deterministic and chunk-invariant: the selection also counts, block by
block, the elements equal to each threshold, so a chunk knows how many
tied elements precede it.

The family takes raw inputs (``Strategy.raw_inputs``): base and models
arrive in their stored dtype and are converted piece by piece. Sign election
and the disjoint mean run as one fused kernel
(:mod:`convergent.strategies.fused_kernels`); a ``ties`` piece whose inputs
are all float32 or all bfloat16 runs its whole pipeline in one kernel
(:class:`_FusedTies`), the other pieces take the tensor path, and both give
the same bits. The top-k bracket tally, and the masked deltas of DARE and
DELLA (``fused_kernels.masked_delta``), also read the stored bytes directly.

This module holds the shared pipeline and registers ``task_arithmetic``; the
sparsifying methods live in ``ties``, ``dare``, ``breadcrumbs`` and ``della``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
import torch
from pydantic import Field, create_model
from torch import Tensor

from convergent import determinism
from convergent.strategies import kernels, order_stats
from convergent.strategies.api import ModelParams, Params, TensorBlocks, TensorTask, strategy
from convergent.strategies.bracket_select import OrderStat
from convergent.strategies.kernels import kernel_ready, raw_array
from convergent.strategies.order_stats import bits_f32, f32_bits, kth_largest_abs_many, pieces

FAMILY = "mergekit"
RESCALE_EPS = 1e-7  # mergekit's rescaled_masked_tensor: no rescaling below this L1 norm


# --------------------------------------------------------------------------- parameters


class GtaModelParams(ModelParams):
    """Per-model parameters shared by the family (mergekit's non-base parameters)."""

    weight: float = Field(
        1.0,
        description="multiplier of this model's task vector (required by mergekit; defaults to 1 here, as for linear)",
    )
    density: float = Field(
        1.0, description="fraction of the task vector's elements kept by sparsification (1 keeps all)"
    )


class _GtaBaseParams(Params):
    int8_mask: bool = Field(
        False, description="store the sign-consensus mask as int8 to save memory (no effect on the result)"
    )


def gta_params(name: str, *, normalize: bool, rescale: bool, consensus: bool) -> type[Params]:
    """The global parameter class of one method (mergekit's names, that method's defaults)."""
    fields: dict[str, Any] = {
        "normalize": (
            bool,
            Field(normalize, description="divide the summed deltas by the sum of the (agreeing) models' weights"),
        ),
        "rescale": (
            bool,
            Field(rescale, description="after sparsifying, rescale each task vector to its original L1 norm"),
        ),
        "lambda": (float, Field(1.0, description="scaling factor applied to the merged task vector")),
    }
    if consensus:
        fields["consensus_method"] = (
            Literal["sum", "count"],
            Field(
                "sum",
                description="majority sign per element: sign of the summed deltas (TIES paper) or of the "
                "count of signs (convergent extension; mergekit always uses sum)",
            ),
        )
    return create_model(name, __base__=_GtaBaseParams, **fields)


def lam(params: Params) -> float:
    return float(getattr(params, "lambda"))


def below(threshold: float) -> float:
    """The largest float32 strictly below a non-negative float32 ``threshold``.

    ``hardshrink(x, below(t))`` keeps exactly the elements with ``|x| >= t``.
    """
    if threshold > 0:
        return bits_f32(f32_bits(threshold) - 1)
    return -bits_f32(1)  # any negative value: hardshrink then keeps everything


def above(threshold: float) -> float:
    """The smallest float32 strictly above a finite non-negative float32 ``threshold``.

    ``|x| < above(t)`` exactly when ``|x| <= t``.
    """
    return bits_f32(f32_bits(threshold) + 1)


def keep_at_least(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Zero, in place, the elements with ``|x| < threshold`` (one fused pass)."""
    return torch.hardshrink(x, below(threshold), out=x)


def keep_at_most(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Zero, in place, the elements with ``|x| > threshold``."""
    return x.sub_(torch.hardshrink(x, threshold))


#: PyTorch runs an op on at most this many elements on one thread
#: (``at::internal::GRAIN_SIZE``). Working in pieces of this size keeps the
#: buffers in cache, makes every reduction independent of the thread count,
#: and avoids OpenMP synchronisation per op, which is very slow when the
#: machine is oversubscribed (the engine already runs tensors in parallel).
GRAIN = 1 << 15


def as_f32(t: Tensor) -> Tensor:
    """``t`` in float32 (the family takes raw inputs: see ``Strategy.raw_inputs``)."""
    return t if t.dtype == torch.float32 else t.to(torch.float32)


#: stored dtypes that float32 arithmetic may take directly: promotion converts them exactly.
_EXACT_IN_F32 = (torch.float32, torch.bfloat16, torch.float16)


def sub_into(model: Tensor, base32: Tensor, out: Tensor) -> Tensor:
    """``float32(model) - base32`` into ``out``, whatever the model's floating dtype."""
    if model.dtype in _EXACT_IN_F32:
        return torch.sub(model, base32, out=out)  # promoted to float32 inside the kernel
    return out.copy_(model).sub_(base32)  # float64 rounds to float32 first, as everywhere else


class DeltaStreams:
    """The task vectors ``model_i - base`` of a block, as flat float32 pieces (see ``bracket_select.Streams``).

    ``raw`` offers the stored bytes to fused kernels instead, when base and
    models are all float32 or all bfloat16.
    """

    def __init__(self, blk: TensorTask[Any, Any]):
        assert blk.base is not None
        self._raw_base = blk.base.reshape(-1)
        self._base: Tensor | None = None
        self._models = [m.reshape(-1) for m in blk.models]

    def __call__(self, i: int, start: int, stop: int, out: Tensor) -> Tensor:
        if self._base is None:
            self._base = as_f32(self._raw_base)
        return sub_into(self._models[i][start:stop], self._base[start:stop], out)

    def raw(self, start: int, stop: int) -> tuple[tuple[np.ndarray, ...], np.ndarray] | None:
        """(models, base) elements [start, stop) as arrays for ``fused_kernels``, or None.

        Offered when base and every model are float32, or all bfloat16.
        """
        if not kernel_ready(self._raw_base, self._models):
            return None
        return tuple(raw_array(m[start:stop]) for m in self._models), raw_array(self._raw_base[start:stop])


@dataclass(frozen=True)
class TieClass:
    """Of the elements of magnitude ``value``, only the first ``keep`` in flat order survive.

    ``per_block`` counts them block by block, which locates the one block where
    the cut falls: before it every tied element survives, after it none does,
    so only that block needs an element-by-element look.
    """

    value: float
    keep: int
    per_block: tuple[int, ...]

    def cursor(self, task: TensorTask[Any, Any]) -> TieCursor:
        """A cursor for the chunk ``task`` (which starts on a block boundary), walked piece by piece in order."""
        before = 0
        cut = len(self.per_block)
        for b, count in enumerate(self.per_block):
            if before + count >= self.keep:
                cut = b
                break
            before += count
        row = determinism.row_numel(task.shape)
        block = determinism.block_rows(task.shape) * row
        total = determinism.num_rows(task.shape) * row
        return TieCursor(
            np.float32(self.value), self.keep - before, cut * block, min(total, (cut + 1) * block), task.rows[0] * row
        )


@dataclass
class TieCursor:
    """The tie rule inside one chunk: tied elements before ``cut_start`` survive, after ``cut_stop`` none do.

    In between (the block where the cut falls), the first ``keep`` survive.
    Offsets are flat positions in the whole tensor; ``offset`` is the chunk's.
    """

    value: np.float32
    keep: int  # survivors wanted from cut_start on
    cut_start: int
    cut_stop: int
    offset: int
    seen: int = 0

    def survive(self, start: int, stop: int) -> bool | None:
        """For the chunk's piece [start, stop): True if all its tied elements survive, False if none, else None."""
        if self.offset + stop <= self.cut_start:
            return True
        if self.offset + start >= self.cut_stop:
            return False
        return None

    def trim(self, piece: Tensor, start: int) -> Tensor:
        """Zero, in place, the tied elements of the piece (starting at ``start``) beyond the budget."""
        skip = max(0, self.cut_start - (self.offset + start))
        values = piece[skip:].numpy()
        tied = np.flatnonzero(np.abs(values) == self.value)
        if tied.size:
            first = max(0, self.keep - self.seen)
            if first < tied.size:
                values[tied[first:]] = 0
            self.seen += int(tied.size)
        return piece


def keep_top(x: Tensor, threshold: float, ties: TieCursor | None, start: int, stop: int) -> Tensor:
    """Zero, in place, ``|x| < threshold``; of ``|x| == threshold`` keep what the tie rule says (all if None)."""
    fate = True if ties is None else ties.survive(start, stop)
    if fate is False:
        return torch.hardshrink(x, threshold, out=x)  # |x| > threshold only
    keep_at_least(x, threshold)
    return x if fate else ties.trim(x, start)  # type: ignore[union-attr]


def keep_bottom(x: Tensor, threshold: float, ties: TieCursor | None, start: int, stop: int) -> Tensor:
    """Zero, in place, ``|x| > threshold``; of ``|x| == threshold`` keep what the tie rule says (all if None)."""
    fate = True if ties is None else ties.survive(start, stop)
    if fate is False:
        return keep_at_most(x, below(threshold))  # |x| < threshold only
    keep_at_most(x, threshold)
    return x if fate else ties.trim(x, start)  # type: ignore[union-attr]


def tie_class(stat: OrderStat, keep: int) -> TieClass | None:
    """The rule keeping ``keep`` of the elements equal to ``stat.value``; None when all of them are kept.

    Zero magnitudes need no rule: a zero delta contributes nothing either way.
    """
    if keep >= stat.equal or stat.value == 0:
        return None
    return TieClass(stat.value, max(0, keep), stat.per_block)


# --------------------------------------------------------------------------- sign consensus


def consensus_merge(
    deltas: Tensor, base: Tensor, weights: Sequence[float], method: str, normalize: bool, lam: float, out: Tensor
) -> Tensor:
    """TIES' sign election and disjoint mean of ``deltas`` (n x m), written to ``out`` as ``base + lam * merged``.

    One fused pass (:func:`convergent.strategies.fused_kernels.consensus_merge`)
    with mergekit's semantics: majority sign +1 where the sum of the weighted
    deltas (``count``: of their signs) is >= 0; only deltas of that sign are
    summed; with ``normalize`` the sum is divided by their weights' sum (1
    where no model agrees). ``out`` is float32, or bfloat16 rounded as
    torch's cast rounds.
    """
    fused_kernels = kernels.require()
    if method not in ("sum", "count"):
        raise ValueError(f"unknown consensus method {method!r}")
    fused_kernels.consensus_merge(
        deltas.numpy(),
        base.numpy(),
        np.asarray(weights, dtype=np.float32),
        method == "count",
        normalize,
        np.float32(lam),
        raw_array(out),
    )
    return out


@dataclass
class _FusedTies:
    """One chunk of a sign-consensus merge through :func:`fused_kernels.ties_merge`, piece by piece.

    Used when every input is float32, or every input bfloat16, and the
    sparsifier (if any) declares its pieces' cuts; a piece whose cut it cannot
    declare (a tie rule to walk) takes the tensor path, which gives the same bits.
    """

    sparsifier: Sparsifier | None
    model_params: Sequence[Any]
    states: Sequence[ModelState | None]
    contexts: Sequence[Any]
    weights: np.ndarray
    scales: np.ndarray
    count: bool
    normalize: bool
    lam: np.float32

    @classmethod
    def of(
        cls,
        sparsifier: Sparsifier | None,
        task: TensorTask[Any, Any],
        states: Sequence[ModelState | None],
        contexts: Sequence[Any],
        weights: Sequence[float],
        lam_value: float,
    ) -> _FusedTies | None:
        assert task.base is not None
        if not kernel_ready(task.base, task.models):
            return None
        if sparsifier is not None and type(sparsifier).cut is Sparsifier.cut:
            return None
        p = task.params
        return cls(
            sparsifier,
            task.model_params,
            states,
            contexts,
            np.asarray(weights, dtype=np.float32),
            np.asarray([1.0 if s is None or s.scale is None else s.scale for s in states], dtype=np.float32),
            p.consensus_method == "count",
            bool(p.normalize),
            np.float32(lam_value),
        )

    def merge(self, base: Tensor, models: Sequence[Tensor], start: int, stop: int, out: Tensor) -> bool:
        """Merge the flat piece ``start:stop`` into ``out``; False (nothing done) if a cut is unknown."""
        fused_kernels = kernels.require()
        n = len(models)
        cuts = np.full(n, KEEP_ALL, dtype=np.float32)
        tie_value = np.zeros(n, dtype=np.float32)
        tie_from = np.full(n, stop - start, dtype=np.int64)  # the end: no tie rule
        tie_keep = np.zeros(n, dtype=np.int64)
        tie_seen = np.zeros(n, dtype=np.int64)
        cursors: dict[int, TieCursor] = {}
        for i, state in enumerate(self.states):
            if self.sparsifier is None or state is None:
                continue
            cut = self.sparsifier.cut(self.contexts[i], start, stop, self.model_params[i], state)
            if cut is None:
                return False
            cuts[i] = cut.drop_below
            if cut.ties is not None:
                ties = cursors[i] = cut.ties
                tie_value[i] = ties.value
                tie_from[i] = max(0, ties.cut_start - (ties.offset + start))
                tie_keep[i], tie_seen[i] = ties.keep, ties.seen
        fused_kernels.ties_merge(
            raw_array(base[start:stop]),
            tuple(raw_array(m[start:stop]) for m in models),
            cuts,
            cuts == ZERO_ALL,
            tie_value,
            tie_from,
            tie_keep,
            tie_seen,
            self.scales,
            self.weights,
            self.count,
            self.normalize,
            self.lam,
            raw_array(out[start:stop]),
        )
        for i, ties in cursors.items():
            ties.seen = int(tie_seen[i])
        return True


# --------------------------------------------------------------------------- sparsification


@dataclass(frozen=True)
class ModelState:
    """What ``prepare`` learnt about one model's task vector."""

    plan: Any = None  # from Sparsifier.plan (thresholds, tie rules)
    extra: Any = None  # from Sparsifier.whole (DELLA's 1-D ranks)
    scale: float | None = None  # float32 L1 rescaling factor, None for none
    #: a masking sparsifier's keep masks from the rescale pass, so ``gta_apply`` need not
    #: draw (and for DELLA rank) them again: block's first row -> (packed bits, elements)
    masks: dict[int, tuple[np.ndarray, int]] | None = None


class Sparsifier:
    """How one task vector is thinned (mergekit's ``SparsificationMethod``).

    ``sparsify`` sees flat pieces of the chunk, in order (the pipeline works
    through a chunk in cache-sized pieces); what needs the chunk's rows or
    random draws is computed once per chunk by ``context`` (for instance a flat
    keep mask, which ``sparsify`` slices with ``start:stop``).
    """

    name: ClassVar[str] = ""
    stochastic: ClassVar[bool] = False
    #: ``sparsify`` multiplies by ``context``, a flat 1.0/0.0 mask (None: drop all): then the
    #: rescaling's L1 norms are taken by ``masked_l1`` in one fused pass.
    masks: ClassVar[bool] = False
    #: a masking sparsifier whose ``context`` is costly (DELLA ranks every row): the rescale
    #: pass keeps its masks, 1 bit per element, for ``gta_apply``. DARE's draws cost less
    #: than packing and unpacking them.
    keeps_masks: ClassVar[bool] = False

    def active(self, mp: Any) -> bool:
        """Whether this model's delta is sparsified at all (mergekit: density < 1)."""
        return bool(mp.density < 1)

    def ranks(self, numel: int, mp: Any) -> tuple[int, ...]:
        """The k's (k-th largest |delta|, 1-based) the sparsifier needs for this model."""
        return ()

    def plan(self, numel: int, mp: Any, stats: Sequence[OrderStat]) -> Any:
        """What ``sparsify`` needs, from the order statistics asked for by ``ranks``."""
        return tuple(stats)

    def whole(self, blocks: TensorBlocks[Any, Any], i: int, mp: Any) -> Any:
        """Extra whole-tensor data for model ``i`` (computed once in ``prepare``)."""
        return None

    def context(self, task: TensorTask[Any, Any], i: int, mp: Any, state: ModelState) -> Any:
        """Per-chunk data for ``sparsify`` (a flat mask, tie cursors, ...)."""
        return None

    def sparsify(self, delta: Tensor, context: Any, start: int, stop: int, mp: Any, state: ModelState) -> Tensor:
        """The sparsified (not yet rescaled) flat piece ``start:stop`` of the chunk; may overwrite ``delta``."""
        raise NotImplementedError

    def cut(self, context: Any, start: int, stop: int, mp: Any, state: ModelState) -> PieceCut | None:
        """``sparsify`` of this piece as a magnitude cut, when it is one; else None.

        None (random draws, bands) sends the piece through the tensor path
        instead of the fused kernel.
        """
        return None


class PieceCut(NamedTuple):
    """``Sparsifier.sparsify`` of one piece as the fused kernel does it.

    Deltas with ``|delta| < drop_below`` are zeroed (``ZERO_ALL``: all of them);
    then ``ties``, if given, walks its tie rule over the piece (and advances).
    """

    drop_below: float
    ties: TieCursor | None = None


#: ``Sparsifier.cut``: the piece is zeroed whole.
ZERO_ALL = float("inf")
#: ``Sparsifier.cut``: nothing is zeroed.
KEEP_ALL = -1.0


def _context(sparsifier: Sparsifier | None, task: TensorTask[Any, Any], i: int, mp: Any, state: ModelState | None):
    """Model ``i``'s ``sparsify`` context for this chunk: the mask ``gta_prepare`` kept, else a new one."""
    if sparsifier is None or state is None:
        return None
    kept = _kept_mask(task, state) if state.masks else None
    return kept if kept is not None else sparsifier.context(task, i, mp, state)


def _kept_mask(task: TensorTask[Any, Any], state: ModelState) -> Tensor | None:
    """The chunk's keep mask from the blocks ``gta_prepare`` kept, or None if one is missing.

    Chunks are whole blocks, so the chunk's mask is its blocks' masks in order.
    """
    assert state.masks is not None
    step = determinism.block_rows(task.shape)
    start, stop = task.rows
    parts = []
    for first in range(start, stop, step):
        entry = state.masks.get(first)
        if entry is None:
            return None
        packed, count = entry
        parts.append(np.unpackbits(packed, count=count))
    if not parts or sum(len(p) for p in parts) != (stop - start) * determinism.row_numel(task.shape):
        return None
    bits = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return torch.from_numpy(bits.astype(np.float32))


#: the mask ``fused_kernels.masked_delta`` is given when it does not mask
_NO_MASK = np.zeros(1, np.float32)


def _masking_kernels(sparsifier: Sparsifier | None, base: Tensor, models: list[Tensor]) -> Any:
    """``fused_kernels`` when a masking sparsifier's deltas can be formed by ``masked_delta``, else None.

    Needs the kernels (waited for only when the piece is big: the tensor path
    gives the same bits) and base and models all float32 or all bfloat16, contiguous.
    """
    if sparsifier is None or not sparsifier.masks or not kernel_ready(base, models):
        return None
    if not base.is_contiguous() or not all(m.is_contiguous() for m in models):
        return None
    return kernels.for_size(base.numel())


def masked_l1(
    streams: DeltaStreams,
    raw: tuple[tuple[np.ndarray, ...], np.ndarray] | None,
    i: int,
    mask: Tensor | None,
    start: int,
    stop: int,
    scratch: Tensor,
) -> tuple[float, float]:
    """(sum |delta_i|, sum |delta_i| kept by ``mask``) over the piece [start, stop), in float64.

    The L1 norms of a masking sparsifier's rescaling, summed in the fixed lane
    order of ``fused_kernels.masked_l1``: one fused pass over the stored bytes
    ``raw`` (``streams.raw`` of the piece; the tensor path took five), or the
    same order in numpy for inputs the kernel cannot read.
    """
    keep = np.zeros(stop - start, np.float32) if mask is None else mask[start:stop].numpy()
    if raw is not None:
        sums = kernels.masked_l1(raw[0][i], raw[1], keep)
        if sums is not None:
            return sums
    return kernels.masked_l1_reference(streams(i, start, stop, scratch).numpy(), keep)


def delta_of(blk: TensorTask[Any, Any], i: int) -> Tensor:
    assert blk.base is not None
    return sub_into(blk.models[i], as_f32(blk.base), torch.empty(blk.base.shape))


def square_sum(values: Tensor) -> float:
    """sum values**2 in float64, in pieces of ``GRAIN`` added in order: the same bits whatever the thread count."""
    flat = values.reshape(-1)
    total = 0.0
    for start in range(0, flat.numel(), GRAIN):
        part = flat[start : start + GRAIN].to(torch.float64)
        total += float(part.mul_(part).sum())
    return total


def l1_scale(before: float, after: float) -> float | None:
    """mergekit's ``before / after`` in float32, None when either norm is below its epsilon."""
    b = torch.tensor(before, dtype=torch.float32)
    a = torch.tensor(after, dtype=torch.float32)
    if b < RESCALE_EPS or a < RESCALE_EPS:
        return None
    return float(b / a)


def gta_prepare(sparsifier: Sparsifier, blocks: TensorBlocks[Any, Any]) -> tuple[ModelState | None, ...] | None:
    """Whole-tensor statistics for each model: thresholds, extras, L1 rescaling factors."""
    mps = blocks.model_params
    numel = blocks.numel
    active = [sparsifier.active(mp) for mp in mps]
    if not any(active) or numel == 0:
        return None
    ranks = {i: sparsifier.ranks(numel, mp) for i, mp in enumerate(mps) if active[i]}
    stats = kth_largest_abs_many(blocks, DeltaStreams, ranks)
    states: list[ModelState | None] = [
        ModelState(sparsifier.plan(numel, mp, stats.get(i, ())), sparsifier.whole(blocks, i, mp)) if active[i] else None
        for i, mp in enumerate(mps)
    ]
    if blocks.params.rescale:
        before = [0.0] * len(mps)
        after = [0.0] * len(mps)
        scratch = torch.empty(order_stats.STAT_PIECE)
        kept_masks: list[dict[int, tuple[np.ndarray, int]] | None] = [
            {} if sparsifier.keeps_masks and s is not None else None for s in states
        ]
        for blk in blocks.blocks():
            piece = DeltaStreams(blk)
            contexts = {i: sparsifier.context(blk, i, mps[i], st) for i, st in enumerate(states) if st is not None}
            for i, ctx in contexts.items():
                masks = kept_masks[i]
                if masks is not None and ctx is not None:  # 1 bit per element, held for gta_apply
                    masks[blk.rows[0]] = (np.packbits(ctx.numpy() != 0), ctx.numel())
            for start, stop in pieces(blk):
                raw = piece.raw(start, stop) if sparsifier.masks else None
                for i, ctx in contexts.items():
                    if sparsifier.masks:
                        norm, kept_norm = masked_l1(piece, raw, i, ctx, start, stop, scratch[: stop - start])
                        before[i] += norm
                        after[i] += kept_norm
                        continue
                    d = piece(i, start, stop, scratch[: stop - start])
                    before[i] += float(d.abs().sum(dtype=torch.float64))
                    kept = sparsifier.sparsify(d, ctx, start, stop, mps[i], states[i])
                    after[i] += float(kept.abs_().sum(dtype=torch.float64))
        states = [
            None if s is None else ModelState(s.plan, s.extra, l1_scale(before[i], after[i]), kept_masks[i])
            for i, s in enumerate(states)
        ]
    return tuple(states)


#: elements per piece of a chunk in ``gta_apply`` (see ``GRAIN``).
PIECE = 1 << 18
#: ... when the fused kernel merges it: its working set stays in L1 at any length, so
#: bigger pieces only mean fewer Python calls (a quarter of them at 1B parameters).
FUSED_PIECE = 1 << 20


def gta_apply(
    sparsifier: Sparsifier | None,
    consensus: bool,
    task: TensorTask[Any, Any],
    prepared: tuple[ModelState | None, ...] | None,
) -> Tensor:
    """The generalized task arithmetic merge of one chunk (see the module docstring).

    Elementwise, so the chunk is worked through in flat pieces of ``PIECE``
    elements with reused buffers; the arithmetic per element (and so the
    result) does not depend on the piece size.
    """
    base = task.base
    if base is None:
        raise ValueError(f"{task.name}: this strategy needs a base model")
    if not task.models:
        return base.to(torch.float32, copy=True)
    p = task.params
    n = len(task.models)
    weights = [float(torch.tensor(mp.weight, dtype=torch.float32)) for mp in task.model_params]
    states = prepared if prepared is not None else (None,) * n
    contexts = [_context(sparsifier, task, i, mp, st) for i, (mp, st) in enumerate(zip(task.model_params, states))]
    base_flat = base.reshape(-1)
    flats = [m.reshape(-1) for m in task.models]
    total = base_flat.numel()
    fused = _FusedTies.of(sparsifier, task, states, contexts, weights, lam(p)) if consensus else None
    # every consensus piece ends in a kernel (ties_merge or consensus_merge) that rounds to bfloat16 as it writes
    narrow = consensus and task.out_dtype == torch.bfloat16
    out = torch.empty(total, dtype=torch.bfloat16 if narrow else torch.float32)
    piece = min(PIECE if fused is None else FUSED_PIECE, max(1, total))
    # one buffer for the n deltas of a piece, so the fused kernel sees an n x size array
    stack = torch.empty(n * piece)
    base32 = torch.empty(piece)
    scale_total = 1.0
    if not consensus and p.normalize:
        summed = float(torch.tensor(weights, dtype=torch.float32).sum())
        scale_total = 1.0 if abs(summed) < 1e-8 else summed
    lam_value = lam(p)
    masking = _masking_kernels(sparsifier, base_flat, flats)
    for start in range(0, total, piece):
        stop = min(total, start + piece)
        size = stop - start
        if fused is not None and fused.merge(base_flat, flats, start, stop, out):
            continue
        b = base_flat[start:stop]
        if b.dtype != torch.float32:
            b = base32[:size].copy_(b)
        rows = stack[: n * size].view(n, size)
        deltas = []
        for i in range(n):
            state, context = states[i], contexts[i]
            if masking is not None and (state is None or context is not None):
                mask = context[start:stop].numpy() if state is not None else _NO_MASK
                scale = None if state is None else state.scale
                masking.masked_delta(
                    raw_array(flats[i][start:stop]),
                    raw_array(base_flat[start:stop]),
                    mask,
                    state is not None,
                    np.float32(1.0 if scale is None else scale),
                    scale is not None,
                    np.float32(weights[i]),
                    weights[i] != 1,
                    rows[i].numpy(),
                )
                deltas.append(rows[i])
                continue
            d = sub_into(flats[i][start:stop], b, rows[i])
            if sparsifier is not None and state is not None:
                d = sparsifier.sparsify(d, contexts[i], start, stop, task.model_params[i], state)
                if state.scale is not None:
                    d.mul_(state.scale)
            if weights[i] != 1:
                d.mul_(weights[i])
            if consensus and d.data_ptr() != rows[i].data_ptr():
                rows[i].copy_(d)
            deltas.append(d)
        if consensus:
            consensus_merge(rows, b, weights, p.consensus_method, p.normalize, lam_value, out[start:stop])
            continue
        acc = deltas[0]
        for d in deltas[1:]:
            acc.add_(d)
        if scale_total != 1.0:
            acc.div_(scale_total)
        if lam_value != 1:
            acc.mul_(lam_value)
        torch.add(acc, b, out=out[start:stop])
    return out.view(base.shape)


def register_gta(
    name: str,
    *,
    sparsifier: Sparsifier | None,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    model_params: type[ModelParams],
    paper: str,
    summary: str,
) -> None:
    """Register one member of the family under mergekit's ``name`` and defaults."""
    params = gta_params(
        f"{name.title().replace('_', '')}Params", normalize=normalize, rescale=rescale, consensus=consensus
    )

    def prepare(blocks: TensorBlocks[Any, Any]) -> tuple[ModelState | None, ...] | None:
        assert sparsifier is not None
        return gta_prepare(sparsifier, blocks)

    def apply(task: TensorTask[Any, Any], prepared: tuple[ModelState | None, ...] | None) -> Tensor:
        return gta_apply(sparsifier, consensus, task, prepared)

    apply.__name__ = name
    apply.__doc__ = summary
    stochastic = sparsifier is not None and sparsifier.stochastic
    strategy(
        name,
        params=params,
        model_params=model_params,
        base="required",
        chunkable=True,
        prepare=prepare if sparsifier is not None else None,
        stochastic=stochastic,
        paper=paper,
        summary=summary,
        family=FAMILY,
        # without sparsification or sign election every delta reaches the sum
        propagates_nonfinite=sparsifier is None and not consensus,
        raw_inputs=True,
        # the kernels serve sign consensus, the top-k selection (sparsifiers that ask for ranks)
        # and the random draws of stochastic sparsifiers
        warm_up=kernels.load if consensus or _selects_top_k(sparsifier) or stochastic else None,
    )(apply)


def _selects_top_k(sparsifier: Sparsifier | None) -> bool:
    return sparsifier is not None and type(sparsifier).ranks is not Sparsifier.ranks


register_gta(
    "task_arithmetic",
    sparsifier=None,
    consensus=False,
    normalize=False,
    rescale=False,
    model_params=GtaModelParams,
    paper="Ilharco et al. 2023, Editing Models with Task Arithmetic (arXiv:2212.04089)",
    summary="Add the weighted sum of task vectors (model - base) to the base "
    "(density and rescale are accepted for mergekit compatibility and have no effect).",
)
