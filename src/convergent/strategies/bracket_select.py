"""Exact k-th largest magnitudes in one pass over the data, guided by a sample.

The radix select in ``order_stats`` needs two full passes (a 16-bit
histogram of every element, then the bucket's low bits), and histogramming
costs about a nanosecond per element. Here a small sample of evenly spaced
rows brackets the wanted value, ``lo <= v <= hi``, and one full pass then
only compares: it counts the magnitudes above ``hi`` and collects those
inside the bracket (a few percent of them), block by block. The k-th
largest is picked exactly among the collected ones.

The answer is exact or absent, never approximate: when the count above
``hi`` shows that the bracket missed the wanted rank (an unlucky sample, or
the value is infinite or NaN), the stream is reported as missed and the
caller falls back to the radix select. NaN magnitudes count as above every
number, as they do in the radix select (their bit patterns are the largest).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from convergent import determinism
from convergent.strategies import kernels
from convergent.strategies.api import TensorBlocks, TensorTask

#: a stream of values for the order statistics: called once per block, returns
#: ``piece(i, start, stop, out)`` giving stream i's flat elements [start, stop)
#: of the block (written to ``out`` or a new tensor; the caller overwrites it).
#: A piece may also offer ``piece.raw(start, stop)``: the (models, base) arrays
#: whose ``|models[i] - base|`` the streams are, for the fused tally (or None).
Streams = Callable[[TensorTask[Any, Any]], Callable[[int, int, int, torch.Tensor], torch.Tensor]]

#: Tensors smaller than this go straight to the radix select (already cheap).
MIN_NUMEL = 1 << 18
#: About this many sampled elements per stream.
SAMPLE_ELEMENTS = 1 << 16
#: Elements per piece of the full pass on the tensor path (the fused tally takes whole blocks).
PIECE = 1 << 18
#: Beyond this share of the elements inside the bracket, the pass would collect
#: too much; the radix select is used instead.
MAX_BRACKET_SHARE = 0.125


@dataclass(frozen=True)
class OrderStat:
    """The k-th largest magnitude of a stream, and how many magnitudes are larger or equal."""

    value: float
    greater: int
    equal: int
    per_block: tuple[int, ...]  # elements equal to ``value``, block by block


def _sample_runs(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """64 evenly spaced runs of rows holding about ``SAMPLE_ELEMENTS`` elements in all (one load each)."""
    rows = determinism.num_rows(shape)
    runs = min(rows, 64)
    run_rows = max(1, math.ceil(SAMPLE_ELEMENTS / (runs * max(1, determinism.row_numel(shape)))))
    starts = sorted({(2 * j + 1) * rows // (2 * runs) for j in range(runs)})
    return [(start, min(rows, start + run_rows)) for start in starts]


def _bracket(sample: np.ndarray, k: int, numel: int) -> tuple[float, float] | None:
    """Bounds that hold the k-th largest of the full data with overwhelming probability.

    The sampled rank of the answer is binomial: 6 standard deviations plus a
    small margin for rows that are not alike; a miss only costs the fallback.
    """
    finite = sample[np.isfinite(sample)]
    m = finite.size
    if m == 0:
        return None
    q = k / numel
    width = 6 * math.sqrt(m * q * (1 - q)) + m / 1024 + 4
    if 2 * width > MAX_BRACKET_SHARE * m:
        return None
    top = int(q * m - width)  # rank from the top of the upper bound
    bottom = int(q * m + width)  # ... of the lower bound
    hi = float(_kth_smallest(finite, m - 1 - top)) if top >= 0 else float("inf")
    lo = float(_kth_smallest(finite, m - 1 - bottom)) if bottom < m else 0.0
    return lo, hi


def _kth_smallest(values: np.ndarray, k: int) -> np.float32:
    """The k-th smallest (0-based) of non-negative finite float32 values: the same value on either path.

    ``fused_kernels.kth_smallest`` (a radix select, 4-7x faster) once the
    kernels are loaded (waited for when ``values`` are many), else
    ``np.partition`` of the bit patterns (such floats order like their bits,
    and integers partition faster).
    """
    fused = kernels.for_size(values.size)
    if fused is not None:
        return fused.kth_smallest(values, k, np.empty(values.size + fused.COLLECT_SLACK, np.float32))
    return np.partition(values.view(np.uint32), k)[k].view(np.float32)


def kth_largest_bracketed(
    blocks: TensorBlocks[Any, Any], streams: Streams, wanted: Mapping[int, Sequence[int]]
) -> dict[int, list[OrderStat | None]]:
    """For each stream ``i`` and ``k`` in ``wanted[i]``: the exact k-th largest magnitude, or None if missed."""
    numel = blocks.numel
    if numel < MIN_NUMEL:
        return {i: [None] * len(ks) for i, ks in wanted.items()}
    samples: dict[int, list[np.ndarray]] = {i: [] for i in wanted}
    sampler = kernels.for_size(numel)
    for start, stop in _sample_runs(blocks.shape):
        task = blocks.rows(start, stop)
        piece = streams(task)
        size = (stop - start) * determinism.row_numel(blocks.shape)
        raw = getattr(piece, "raw", None)
        arrays = raw(0, size) if raw is not None and sampler is not None else None
        if arrays is not None:  # the same float32 values as the stream, in one call for every stream
            rows = np.empty((len(wanted), size), dtype=np.float32)
            sampler.magnitudes(*arrays, np.fromiter(wanted, dtype=np.int64), rows)
            for row, i in zip(rows, wanted):
                samples[i].append(row)
            continue
        for i in wanted:
            samples[i].append(piece(i, 0, size, torch.empty(size)).abs_().numpy().copy())
    # keys are (stream, position in wanted[stream]): the same k may be asked twice
    brackets: dict[tuple[int, int], tuple[float, float]] = {}
    for i, ks in wanted.items():
        sample = np.concatenate(samples[i])
        for pos, k in enumerate(ks):
            bounds = _bracket(sample, k, numel)
            if bounds is not None:
                brackets[(i, pos)] = bounds
    result: dict[int, list[OrderStat | None]] = {i: [None] * len(ks) for i, ks in wanted.items()}
    if not brackets:
        return result
    keys_of = {i: [key for key in brackets if key[0] == i] for i in wanted}
    tallies = {key: _Tally(*brackets[key]) for key in brackets}
    fused = _FusedTally(tallies)
    scratch = torch.empty(PIECE)
    for blk in blocks.blocks():
        piece = streams(blk)
        total = blk.models[0].numel() if blk.models else 0
        for tally in tallies.values():
            tally.new_block()
        raw = getattr(piece, "raw", None)
        arrays = raw(0, total) if raw is not None else None
        if arrays is not None:  # the kernel's working set stays in L1 at any length: one call per block
            fused.add(*arrays)
            continue
        for start in range(0, total, PIECE):
            stop = min(total, start + PIECE)
            for i, keys in keys_of.items():
                if keys:
                    magnitudes = piece(i, start, stop, scratch[: stop - start]).abs_().numpy()
                    for key in keys:
                        tallies[key].add(magnitudes)
    for (i, pos), tally in tallies.items():
        result[i][pos] = tally.select(wanted[i][pos])
    return result


class _Tally:
    """Counts around a bracket ``[lo, hi]``, block by block, and the values strictly inside it.

    Values equal to an end are only counted (bf16 checkpoints put many
    elements on the same magnitude), so what is collected stays small.
    """

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = np.float32(lo), np.float32(hi)
        self.above = 0  # > hi, or NaN
        self.at_hi: list[int] = []
        self.at_lo: list[int] = []
        self.inside: list[list[np.ndarray]] = []

    def new_block(self) -> None:
        self.at_hi.append(0)
        self.at_lo.append(0)
        self.inside.append([])

    def add(self, magnitudes: np.ndarray) -> None:
        below_hi = magnitudes < self.hi
        at_hi = int(np.count_nonzero(magnitudes == self.hi))
        self.at_hi[-1] += at_hi
        self.above += magnitudes.size - int(np.count_nonzero(below_hi)) - at_hi  # NaN compares False
        if self.lo < self.hi:
            self.at_lo[-1] += int(np.count_nonzero(magnitudes == self.lo))
            below_hi &= magnitudes > self.lo
            self.inside[-1].append(magnitudes[below_hi])

    def select(self, k: int) -> OrderStat | None:
        """The exact k-th largest, or None when it is not inside the bracket."""
        rank = k - self.above  # rank among the elements from hi down to lo
        n_hi = sum(self.at_hi)
        if rank < 1:
            return None
        if rank <= n_hi:
            return OrderStat(float(self.hi), self.above, n_hi, tuple(self.at_hi))
        if self.lo == self.hi:
            return None
        blocks = [np.concatenate(parts) if parts else np.zeros(0, np.float32) for parts in self.inside]
        n_inside = sum(b.size for b in blocks)
        rank -= n_hi
        if rank <= n_inside:
            collected = np.concatenate(blocks)
            # the rank-th largest is the (n_inside - rank)-th smallest, 0-based
            value = _kth_smallest(collected, n_inside - rank)
            greater = self.above + n_hi + int(np.count_nonzero(collected > value))
            per_block = tuple(int(np.count_nonzero(b == value)) for b in blocks)
            return OrderStat(float(value), greater, sum(per_block), per_block)
        rank -= n_inside
        n_lo = sum(self.at_lo)
        if rank <= n_lo:
            return OrderStat(float(self.lo), self.above + n_hi + n_inside, n_lo, tuple(self.at_lo))
        return None


class _FusedTally:
    """Every bracket's tally of a piece in one pass over the stored bytes (``fused_kernels.bracket_tally``)."""

    def __init__(self, tallies: Mapping[tuple[int, int], _Tally]):
        self.tallies = list(tallies.values())
        self.key_model = np.array([i for i, _ in tallies], dtype=np.int64)
        self.lo = np.array([t.lo.view(np.uint32) for t in self.tallies], dtype=np.uint32)
        self.hi = np.array([t.hi.view(np.uint32) for t in self.tallies], dtype=np.uint32)
        self.counts = np.zeros((len(self.tallies), 4), dtype=np.int64)
        self.inside = np.empty((len(self.tallies), 0), dtype=np.float32)

    def add(self, models: tuple[np.ndarray, ...], base: np.ndarray) -> None:
        """Tally the magnitudes ``|models[i] - base|`` of one piece (arrays as ``fused_kernels`` takes them)."""
        fused_kernels = kernels.require()
        if self.inside.shape[1] < base.shape[0] + fused_kernels.COLLECT_SLACK:
            self.inside = np.empty((len(self.tallies), base.shape[0] + fused_kernels.COLLECT_SLACK), dtype=np.float32)
        fused_kernels.bracket_tally(models, base, self.key_model, self.lo, self.hi, self.inside, self.counts)
        for tally, (above, at_hi, at_lo, n_inside), inside in zip(self.tallies, self.counts, self.inside):
            tally.above += int(above)
            tally.at_hi[-1] += int(at_hi)
            if tally.lo < tally.hi:
                tally.at_lo[-1] += int(at_lo)
                tally.inside[-1].append(inside[:n_inside].copy())
