"""Fused elementwise kernels for the hot loops of the task-arithmetic family (numba).

TIES-style sign election and the bracket tally of the top-k selection are
several to a dozen elementwise passes each when written with tensor operations
(plus a float32 copy of every input); at 1B parameters those passes, each
reading and writing whole pieces, were most of a TIES merge. Here each is one
pass over the stored bytes, compiled by numba (PyTorch has no CPU fusion
without a C++ toolchain). Kernels work in sub-blocks of ``BLOCK`` elements
with simple inner loops, so LLVM vectorizes them; they release the GIL, as
the engine runs tensors on several threads.

The arithmetic is IEEE float32 in a fixed order, element by element (no
fast-math, so no reassociation or contraction): results do not depend on the
piece size, the thread count or the machine. Compiled code is cached on disk
(numba's ``cache=True``), so only the first run on a machine compiles.

Imported lazily (only TIES-style merges and top-k selections pay numba's
import), hence not registered with the strategy families.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

#: elements per sub-block: the scratch rows stay in L1/L2 cache.
BLOCK = 2048

_jit = njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")


def decode(src, bits, out):  # pragma: no cover - replaced by the overload in compiled code
    """``out[:len(src)] = float32(src)``: bfloat16 (given as uint16 bit patterns) or float32.

    ``bits`` is ``out`` viewed as uint32 (bfloat16 is the top half of a float32).
    """
    raise NotImplementedError("decode runs only inside compiled kernels")


@overload(decode, inline="always")
def _decode(src, bits, out):
    if src.dtype == types.uint16:

        def from_bfloat16(src, bits, out):
            for j in range(src.shape[0]):
                bits[j] = np.uint32(src[j]) << np.uint32(16)

        return from_bfloat16

    def from_float32(src, bits, out):
        for j in range(src.shape[0]):
            out[j] = src[j]

    return from_float32


@_jit
def _elect_and_average(deltas, at, m, base_f, weights, count, normalize, lam, out, total, acc, div):  # pragma: no cover
    """:func:`consensus_merge` of the elements ``at:at+m`` of ``deltas``' rows, into ``out[:m]``.

    ``base_f`` holds those elements of the base (float32); ``total``, ``acc``
    and ``div`` are scratch of at least ``m`` elements.
    """
    n = deltas.shape[0]
    zero = np.float32(0.0)
    one = np.float32(1.0)
    for j in range(m):
        total[j] = zero
        acc[j] = zero
        div[j] = zero
    for i in range(n):
        d = deltas[i, at : at + m]
        if count:
            for j in range(m):
                x = d[j]
                total[j] = total[j] + (one if x > zero else (-one if x < zero else zero))
        else:
            for j in range(m):
                total[j] = total[j] + d[j]
    for j in range(m):
        total[j] = one if total[j] >= zero else -one
    for i in range(n):
        d = deltas[i, at : at + m]
        w = weights[i]
        for j in range(m):
            y = d[j] * total[j]
            agree = y > zero
            acc[j] = acc[j] + (y if agree else zero)
            div[j] = div[j] + (w if agree else zero)
    if normalize:
        for j in range(m):
            dv = div[j]
            out[j] = acc[j] / (dv if dv != zero else one) * total[j] * lam + base_f[j]
    else:
        for j in range(m):
            out[j] = acc[j] * total[j] * lam + base_f[j]


@_jit
def consensus_merge(deltas, base, weights, count, normalize, lam, out):  # pragma: no cover - compiled
    """TIES sign election and disjoint mean, then ``base + lam * merged`` (mergekit's ``get_mask`` semantics).

    ``deltas`` (n x m float32, already sparsified and weighted), ``base``,
    ``out`` (m float32), ``weights`` (n float32). Per element: the majority
    sign is +1 where the sum of the deltas (``count``: of their signs) is >= 0,
    else -1; a delta agrees when its sign equals it (zero and NaN deltas never
    agree); the merged delta is the sum of the agreeing deltas (in model
    order), divided, with ``normalize``, by the sum of their weights (1 where
    that is 0).
    """
    size = base.shape[0]
    total = np.empty(BLOCK, np.float32)
    acc = np.empty(BLOCK, np.float32)
    div = np.empty(BLOCK, np.float32)
    for start in range(0, size, BLOCK):
        m = min(BLOCK, size - start)
        _elect_and_average(
            deltas, start, m, base[start : start + m], weights, count, normalize, lam, out[start : start + m],
            total, acc, div,
        )
    return out


@_jit
def bracket_tally(models, base, key_model, lo, hi, inside, counts):  # pragma: no cover - compiled
    """Count task-vector magnitudes around brackets ``[lo[q], hi[q]]``; collect those strictly inside.

    ``models`` (a tuple of equal-length arrays) and ``base`` are float32 or
    bfloat16 bit patterns (uint16); key ``q`` looks at the magnitudes
    ``|models[key_model[q]] - base|`` in float32 (the base is decoded once for
    all keys, each model once for its keys). ``lo`` and ``hi`` hold float32
    bit patterns (uint32): non-negative floats order like their bits, and
    NaN's bits lie above every number's. Writes ``counts[q] = (above, at_hi,
    at_lo, n_inside)``: magnitudes ``> hi`` or NaN, ``== hi``, ``== lo`` (0
    unless ``lo < hi``), and how many ``lo < |x| < hi`` went, in order, to
    the front of ``inside[q]``.
    """
    n = len(models)
    keys = key_model.shape[0]
    size = base.shape[0]
    base_bits = np.empty(BLOCK, np.uint32)
    base_f = base_bits.view(np.float32)
    model_bits = np.empty(BLOCK, np.uint32)
    model_f = model_bits.view(np.float32)
    magnitude = np.empty(BLOCK, np.float32)
    magnitude_bits = magnitude.view(np.uint32)
    for q in range(keys):
        for c in range(4):
            counts[q, c] = 0
    for start in range(0, size, BLOCK):
        m = min(BLOCK, size - start)
        decode(base[start : start + m], base_bits, base_f)
        for i in range(n):
            wanted = False
            for q in range(keys):
                wanted = wanted or key_model[q] == i
            if not wanted:
                continue
            decode(models[i][start : start + m], model_bits, model_f)
            for j in range(m):
                magnitude[j] = abs(model_f[j] - base_f[j])
            for q in range(keys):
                if key_model[q] != i:
                    continue
                low = lo[q]
                high = hi[q]
                block_above = 0
                block_hi = 0
                block_lo = 0
                for j in range(m):
                    bits = magnitude_bits[j]
                    block_above += bits > high
                    block_hi += bits == high
                    block_lo += bits == low
                counts[q, 0] += block_above
                counts[q, 1] += block_hi
                if low < high:
                    counts[q, 2] += block_lo
                    past_low = low + np.uint32(1)
                    span = high - past_low  # strictly inside: (bits - past_low) < span, unsigned
                    found = counts[q, 3]
                    collected = inside[q]
                    for j in range(m):
                        if np.uint32(magnitude_bits[j] - past_low) < span:
                            collected[found] = magnitude[j]
                            found += 1
                    counts[q, 3] = found


@_jit
def ties_merge(
    base, models, drop_below, zero_all, tie_value, tie_from, tie_keep, tie_seen, scales, weights, count, normalize, lam,
    out,
):  # pragma: no cover - compiled
    """Task vectors, magnitude trimming, scaling and :func:`consensus_merge`, fused: one pass over raw inputs.

    ``base`` and each of ``models`` (a tuple of equal-length arrays) are
    float32 or bfloat16 bit patterns (uint16). Per model i and element:
    ``delta = model - base`` in float32; zeroed where ``|delta| < drop_below[i]``
    (NaN is kept, as by ``torch.hardshrink``) or everywhere with
    ``zero_all[i]``; then, from flat position ``tie_from[i]`` on (if it is
    inside the array), the tie rule of ``task_arithmetic.TieCursor``: of the
    deltas with ``|delta| == tie_value[i]``, only while ``tie_seen[i] <
    tie_keep[i]`` one survives, and every one met adds 1 to ``tie_seen[i]``
    (updated in place); finally multiplied by ``scales[i]``, then by
    ``weights[i]``. The same float32 operations, in the same order, as the
    tensor path, so both give the same bits.
    """
    n = len(models)
    size = base.shape[0]
    zero = np.float32(0.0)
    base_bits = np.empty(BLOCK, np.uint32)
    base_f = base_bits.view(np.float32)
    model_bits = np.empty(BLOCK, np.uint32)
    model_f = model_bits.view(np.float32)
    deltas = np.empty((n, BLOCK), np.float32)
    total = np.empty(BLOCK, np.float32)
    acc = np.empty(BLOCK, np.float32)
    div = np.empty(BLOCK, np.float32)
    for start in range(0, size, BLOCK):
        m = min(BLOCK, size - start)
        decode(base[start : start + m], base_bits, base_f)
        for i in range(n):
            d = deltas[i]
            if zero_all[i]:
                for j in range(m):
                    d[j] = zero
                continue
            decode(models[i][start : start + m], model_bits, model_f)
            cut = drop_below[i]
            scale = scales[i]
            w = weights[i]
            if tie_from[i] < start + m:
                for j in range(m):
                    x = model_f[j] - base_f[j]
                    d[j] = zero if abs(x) < cut else x
                value = tie_value[i]
                for j in range(max(0, tie_from[i] - start), m):
                    if abs(d[j]) == value:
                        if tie_seen[i] >= tie_keep[i]:
                            d[j] = zero
                        tie_seen[i] += 1
                for j in range(m):
                    d[j] = d[j] * scale * w
            else:
                for j in range(m):
                    x = model_f[j] - base_f[j]
                    x = zero if abs(x) < cut else x
                    d[j] = x * scale * w
        _elect_and_average(
            deltas, 0, m, base_f, weights, count, normalize, lam, out[start : start + m], total, acc, div
        )
    return out


def warm_up() -> None:
    """Load the compiled code (numba's first call costs ~0.7 s: its imports and target set-up)."""
    values = np.zeros(8, np.float32)
    bracket_tally(
        (values,), values, np.zeros(1, np.int64), np.zeros(1, np.uint32), np.ones(1, np.uint32),
        np.empty((1, 8), np.float32), np.empty((1, 4), np.int64),
    )
