"""Exact k-th largest magnitudes of streamed data: the radix select, and the entry point.

:func:`kth_largest_abs_many` first tries the one-pass bracketed selection
(:mod:`convergent.strategies.bracket_select`); any rank it misses comes from
:class:`MagnitudeSelect`, a two-pass radix select on the float32 bit patterns
of the magnitudes (non-negative floats order like their bits). Both are
exact and count, block by block, the elements equal to the answer, so a
strategy can keep exactly ``k`` elements chunk by chunk (ties at the
threshold broken by flat order).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from convergent.strategies.api import TensorBlocks, TensorTask
from convergent.strategies.bracket_select import OrderStat, Streams, kth_largest_bracketed

#: elements per piece of a block in the statistics passes (PyTorch's grain size:
#: see ``task_arithmetic.GRAIN``).
STAT_PIECE = 1 << 15


def f32_bits(value: float) -> int:
    return struct.unpack("<i", struct.pack("<f", value))[0]


def bits_f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<i", bits))[0]


_HIGH = 1 << 15  # |x| has a clear sign bit: the top 16 bits take 2**15 values
_LOW = 1 << 16
_FINITE_HIGH = 0x7F80  # buckets from here on hold inf and NaN


def _in_bucket(magnitudes: np.ndarray, high: int) -> np.ndarray:
    """Bit patterns of the elements of ``magnitudes`` (float32 >= 0) whose top 16 bits are ``high``."""
    if high < _FINITE_HIGH:
        lo, hi = np.float32(bits_f32(high << 16)), np.float32(bits_f32((high + 1) << 16))
        inside = magnitudes >= lo
        inside &= magnitudes < hi
    else:
        inside = (magnitudes.view(np.int32) >> 16) == high
    return magnitudes[inside].view(np.int32)


def pieces(blk: TensorTask[Any, Any]) -> list[tuple[int, int]]:
    """The block's flat element ranges of ``STAT_PIECE`` elements, in order."""
    total = blk.models[0].numel() if blk.models else 0
    return [(s, min(total, s + STAT_PIECE)) for s in range(0, total, STAT_PIECE)]


#: at most this many (value, count) pairs are kept per stream and bucket to
#: count tied elements block by block in the second pass; beyond it (adversarial
#: data) the counts come from one more pass.
SUMMARY_CAP = 1 << 22


class MagnitudeSelect:
    """Exact order statistics of the magnitudes of several streams, two passes over the blocks.

    A radix select on the float32 bit patterns (non-negative floats order like
    their bits): the constructor makes the first pass, a histogram of the top
    16 bits of every stream (and, with ``count_zeros``, the number of exact
    zeros); :meth:`kth_largest` makes the second, a histogram of the low 16
    bits inside the buckets holding the wanted ranks, which also yields how
    many elements of each block equal the result. Memory stays at one block
    (plus 2**15 + 2**16 counters per stream and bucket).
    """

    def __init__(self, blocks: TensorBlocks[Any, Any], streams: Streams, which: Sequence[int], count_zeros=False):
        self.blocks = blocks
        self.streams = streams
        self.which = list(which)
        self.hist = {i: torch.zeros(_HIGH, dtype=torch.int64) for i in self.which}
        self.zeros = dict.fromkeys(self.which, 0)
        scratch = torch.empty(STAT_PIECE)
        keys: dict[int, Tensor] = {}
        ones = torch.ones(0, dtype=torch.int64)
        for blk in blocks.blocks():
            piece = streams(blk)
            ranges = pieces(blk)
            size = ranges[-1][1] if ranges else 0
            for i in self.which:
                if i not in keys or keys[i].numel() < size:
                    keys[i] = torch.empty(size, dtype=torch.int64)
            for start, stop in ranges:
                for i in self.which:
                    magnitudes = piece(i, start, stop, scratch[: stop - start]).abs_()
                    if count_zeros:
                        self.zeros[i] += magnitudes.numel() - int(torch.count_nonzero(magnitudes))
                    torch.bitwise_right_shift(magnitudes.view(torch.int32), 16, out=keys[i][start:stop])
            if ones.numel() < size:
                ones = torch.ones(size, dtype=torch.int64)
            for i in self.which:
                # scatter_add_ rather than bincount: bincount's min/max reductions run on
                # several threads and stall badly when the machine is oversubscribed
                self.hist[i].scatter_add_(0, keys[i][:size], ones[:size])

    def kth_largest(self, wanted: Mapping[int, Sequence[int]]) -> dict[int, list[OrderStat]]:
        """For each stream ``i`` and each ``k`` in ``wanted[i]`` (1-based): the k-th largest magnitude.

        ``value`` equals ``torch.topk(|x|.flatten(), k).values[-1]`` over the whole tensor.
        """
        where: dict[int, list[tuple[int, int, int]]] = {}  # (bucket, rank inside it, count above it)
        for i, ks in wanted.items():
            if not ks:
                continue
            from_top = torch.flip(self.hist[i], dims=[0]).cumsum(0)
            total = int(from_top[-1])
            spots = []
            for k in ks:
                if not 1 <= k <= total:
                    raise ValueError(f"k={k} outside 1..{total}")
                pos = int(torch.searchsorted(from_top, torch.tensor([k]))[0])
                above = int(from_top[pos - 1]) if pos > 0 else 0
                spots.append((_HIGH - 1 - pos, k - above, above))
            where[i] = spots
        if not where:
            return {}
        buckets = {i: sorted({h for h, _, _ in spots}) for i, spots in where.items()}
        keys = [(i, h) for i, hs in buckets.items() for h in hs]
        low = {key: np.zeros(_LOW, dtype=np.int64) for key in keys}
        # per block: the distinct low halves met in the bucket and their counts
        summaries: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]] | None] = {key: [] for key in keys}
        sizes = dict.fromkeys(keys, 0)
        scratch = torch.empty(STAT_PIECE)
        for blk in self.blocks.blocks():
            piece = self.streams(blk)
            found: dict[tuple[int, int], list[np.ndarray]] = {key: [] for key in keys}
            for start, stop in pieces(blk):
                for i, hs in buckets.items():
                    magnitudes = piece(i, start, stop, scratch[: stop - start]).abs_().numpy()
                    for h in hs:
                        found[(i, h)].append(_in_bucket(magnitudes, h) & 0xFFFF)
            for key, parts in found.items():
                selected = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
                if selected.size <= _LOW // 8:  # few: sort them
                    distinct, counts = np.unique(selected, return_counts=True)
                    low[key][distinct] += counts
                else:  # many: count them
                    full = np.bincount(selected, minlength=_LOW)
                    low[key] += full
                    distinct = np.flatnonzero(full)
                    counts = full[distinct]
                summary = summaries[key]
                if summary is not None:
                    sizes[key] += distinct.size
                    summary.append((distinct, counts))
                    if sizes[key] > SUMMARY_CAP:
                        summaries[key] = None
        out: dict[int, list[OrderStat]] = {}
        recount: dict[int, list[float]] = {}
        for i, spots in where.items():
            stats = []
            for h, r, above in spots:
                from_top_low = np.cumsum(low[(i, h)][::-1])
                pos = int(np.searchsorted(from_top_low, r))
                lo = _LOW - 1 - pos
                value = bits_f32((h << 16) | lo)
                equal = int(low[(i, h)][lo])
                greater = above + (int(from_top_low[pos - 1]) if pos > 0 else 0)
                summary = summaries[(i, h)]
                per_block: tuple[int, ...] = ()
                if summary is not None:
                    per_block = tuple(_count_of(distinct, counts, lo) for distinct, counts in summary)
                elif equal > 1:
                    recount.setdefault(i, []).append(value)
                stats.append(OrderStat(value, greater, equal, per_block))
            out[i] = stats
        if recount:
            counted = self._count_equal(recount)
            out = {
                i: [
                    s
                    if s.per_block or (i, s.value) not in counted
                    else OrderStat(s.value, s.greater, s.equal, counted[(i, s.value)])
                    for s in stats
                ]
                for i, stats in out.items()
            }
        return out

    def _count_equal(self, values: Mapping[int, Sequence[float]]) -> dict[tuple[int, float], tuple[int, ...]]:
        """One more pass: per block, how many magnitudes of stream i equal each value."""
        counts: dict[tuple[int, float], list[int]] = {(i, v): [] for i, vs in values.items() for v in vs}
        scratch = torch.empty(STAT_PIECE)
        for blk in self.blocks.blocks():
            piece = self.streams(blk)
            block_counts = dict.fromkeys(counts, 0)
            for start, stop in pieces(blk):
                for i, vs in values.items():
                    magnitudes = piece(i, start, stop, scratch[: stop - start]).abs_().numpy()
                    for v in vs:
                        block_counts[(i, v)] += int(np.count_nonzero(magnitudes == np.float32(v)))
            for key, c in block_counts.items():
                counts[key].append(c)
        return {key: tuple(c) for key, c in counts.items()}


def _count_of(distinct: np.ndarray, counts: np.ndarray, value: int) -> int:
    at = int(np.searchsorted(distinct, value))
    return int(counts[at]) if at < distinct.size and distinct[at] == value else 0


def kth_largest_abs_many(
    blocks: TensorBlocks[Any, Any], streams: Streams, wanted: Mapping[int, Sequence[int]]
) -> dict[int, list[OrderStat]]:
    """For each stream ``i`` and each ``k`` in ``wanted[i]``: the k-th largest of its magnitudes (exact).

    One full pass bracketed by a sample of rows (``bracket_select``); any
    rank the bracket missed comes from the two-pass radix select
    (:class:`MagnitudeSelect`). No pass when nothing is wanted.
    """
    wanted = {i: list(ks) for i, ks in wanted.items() if ks}
    if not wanted:
        return {}
    found = kth_largest_bracketed(blocks, streams, wanted)
    missed = {i: [k for k, hit in zip(ks, found[i]) if hit is None] for i, ks in wanted.items()}
    missed = {i: ks for i, ks in missed.items() if ks}
    radix = MagnitudeSelect(blocks, streams, list(missed)).kth_largest(missed) if missed else {}
    out: dict[int, list[OrderStat]] = {}
    for i in wanted:
        fallback = iter(radix.get(i, ()))
        out[i] = [hit if hit is not None else next(fallback) for hit in found[i]]
    return out
