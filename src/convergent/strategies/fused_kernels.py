"""Fused kernels for the hot loops of merges (numba): one pass over the stored bytes each.

Written with tensor operations, TIES-style sign election, the bracket tally of
the top-k selection and even a weighted average are several to a dozen
elementwise passes (plus a float32 copy of every input); at 1B parameters
those passes, each reading and writing whole pieces, were most of a merge.
Here each is one pass over the stored float32 or bfloat16 bytes, compiled by
numba (PyTorch has no CPU fusion without a C++ toolchain):

* ``weighted_sum``: ``linear``, rounded to bfloat16 in the same pass when that is the output;
* ``ties_merge``, ``consensus_merge``: the sign-consensus methods;
* ``bracket_tally``, ``kth_smallest``: the exact top-k magnitude selection;
* ``all_finite``: the engine's NaN/Inf probe of every input;
* ``splitmix_keep``: the counter-based random keep masks of DARE and DELLA;
* ``masked_l1``, ``masked_delta``: the L1 norms of their rescaling, and their masked deltas;
* ``row_ranks``: DELLA's magnitude ranks within each row.

Kernels work in sub-blocks of ``BLOCK`` elements with simple inner loops, so
LLVM vectorizes them; they release the GIL, as the engine runs tensors on
several threads.

The arithmetic is IEEE float32 in a fixed order, element by element (no
fast-math, so no reassociation or contraction): results do not depend on the
piece size, the thread count or the machine, and equal the tensor paths' bits.
Compiled code is cached on disk (numba's ``cache=True``), so only the first
run on a machine compiles.

Imported lazily through ``kernels`` (numba's import and set-up cost most of a
second), hence not registered with the strategy families.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from convergent.determinism import SPLITMIX_GAMMA, SPLITMIX_MIX1, SPLITMIX_MIX2, UNIFORM_SCALE
from convergent.strategies.kernels import L1_LANES

#: elements per sub-block: every scratch row of a kernel together stays in L1
#: cache (2048 ran half as fast as 256 on a 32 KB L1).
BLOCK = 256
#: elements :func:`_collect_inside` looks at per call (one AVX-512 register).
COLLECT_WIDTH = 16
#: spare elements a :func:`bracket_tally` ``inside`` row needs past the
#: piece's length: a collect writes a whole register, valid or not.
COLLECT_SLACK = COLLECT_WIDTH

_jit = njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")


@intrinsic
def _to_f32(typingctx, value):
    """One stored element as float32: a bfloat16 bit pattern (uint16) is the top half of a float32's bits.

    An intrinsic because numba has no scalar bit cast: with it, decoding sits
    inside each kernel's arithmetic loop instead of a loop of its own through
    scratch arrays (the TIES apply pass ran 30% faster).
    """
    if value == types.uint16:

        def widen(context, builder, signature, args):
            word = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(word, ir.FloatType())

        return types.float32(value), widen
    if value == types.float32:
        return types.float32(value), lambda context, builder, signature, args: args[0]
    return None


@intrinsic
def _f32_bits(typingctx, value):
    """A float32's bit pattern as uint32 (the inverse of ``_to_f32`` for float32)."""
    if value == types.float32:

        def cast(context, builder, signature, args):
            return builder.bitcast(args[0], ir.IntType(32))

        return types.uint32(value), cast
    return None


#: bfloat16 bits of every NaN in torch's vectorized float32 -> bfloat16 cast (the one
#: x86 and ARM builds run): the engine's output must not depend on which path a chunk took
BF16_NAN = 0xFFFF


def _narrow(value, like):  # pragma: no cover - replaced in compiled code by its overload
    """float32 ``value`` as an element of arrays like ``like``: itself, or its bfloat16 bits (uint16)."""
    raise NotImplementedError("only callable from compiled kernels")


@overload(_narrow)
def _narrow_overload(value, like):
    if like.dtype == types.float32:
        return lambda value, like: value
    if like.dtype == types.uint16:

        def to_bfloat16(value, like):
            # round to nearest, ties to even, on the bits: torch's float32 -> bfloat16 cast
            bits = _f32_bits(value)
            rounded = np.uint16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
            return np.uint16(BF16_NAN) if value != value else rounded

        return to_bfloat16
    return None


@intrinsic
def _collect_inside(typingctx, src, at, past_low, span, dst, found):
    """``src[at:at+16]``'s values whose bits ``b`` have ``b - past_low < span`` (unsigned), to ``dst[found:]``.

    Returns the new ``found``. LLVM has no automatic vectorization for this
    filter (a loop with a data-dependent store index costs ~0.4 ns per
    element, half of the tally); this is one vector compress in a register
    (``vpcompressd`` with AVX-512, a generic expansion elsewhere) and a full
    16-element store, so ``dst`` needs ``COLLECT_SLACK`` spare elements. Not
    the memory form of the compress: that is microcoded and slow on AMD Zen 4.
    """
    f32 = types.float32
    c_float_row = types.Array(f32, 1, "C")
    if not (src == c_float_row and dst == c_float_row):
        return None
    sig = types.int64(src, types.int64, types.uint32, types.uint32, dst, types.int64)

    def codegen(context, builder, signature, args):
        src_v, at_v, past_v, span_v, dst_v, found_v = args
        width = COLLECT_WIDTH
        floats = ir.VectorType(ir.FloatType(), width)
        words = ir.VectorType(ir.IntType(32), width)
        flags = ir.VectorType(ir.IntType(1), width)
        mask_int = ir.IntType(width)
        module = builder.module

        def declare(name, ret, params):
            existing = module.globals.get(name)
            return existing if existing is not None else ir.Function(module, ir.FunctionType(ret, params), name=name)

        def splat(value):
            one = builder.insert_element(ir.Constant(words, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
            return builder.shuffle_vector(one, ir.Constant(words, ir.Undefined), ir.Constant(words, [0] * width))

        source = context.make_array(signature.args[0])(context, builder, src_v)
        target = context.make_array(signature.args[4])(context, builder, dst_v)
        values = builder.load(builder.bitcast(builder.gep(source.data, [at_v]), floats.as_pointer()), align=4)
        bits = builder.bitcast(values, words)
        wanted = builder.icmp_unsigned("<", builder.sub(bits, splat(past_v)), splat(span_v))
        compress = declare(f"llvm.experimental.vector.compress.v{width}f32", floats, [floats, flags, floats])
        packed = builder.call(compress, [values, wanted, ir.Constant(floats, ir.Undefined)])
        builder.store(packed, builder.bitcast(builder.gep(target.data, [found_v]), floats.as_pointer()), align=4)
        popcount = declare(f"llvm.ctpop.i{width}", mask_int, [mask_int])
        taken = builder.call(popcount, [builder.bitcast(wanted, mask_int)])
        return builder.add(found_v, builder.zext(taken, ir.IntType(64)))

    return sig, codegen


@_jit
def _collect_range(values, count, past_low, span, dst, found):  # pragma: no cover - compiled
    """Append to ``dst[found:]``, in order, the ``values[:count]`` whose bits ``b`` have ``b - past_low < span``.

    Unsigned arithmetic: the values in ``[past_low, past_low + span)`` as bit
    patterns. Returns the new ``found``; ``dst`` needs ``COLLECT_SLACK``
    spare elements (see :func:`_collect_inside`).
    """
    bits = values.view(np.uint32)
    whole = count - count % COLLECT_WIDTH
    for j in range(0, whole, COLLECT_WIDTH):
        found = _collect_inside(values, j, past_low, span, dst, found)
    for j in range(whole, count):
        if np.uint32(bits[j] - past_low) < span:
            dst[found] = values[j]
            found += 1
    return found


@_jit
def _ballot(x, count):  # pragma: no cover - compiled
    """One delta's vote in the sign election: the delta itself, or (``count``) its sign."""
    zero = np.float32(0.0)
    one = np.float32(1.0)
    if count:
        return one if x > zero else (-one if x < zero else zero)
    return x


@_jit
def _vote(total, m, x, count):  # pragma: no cover - compiled
    """Add delta row ``x[:m]``'s votes to ``total[:m]``."""
    for j in range(m):
        total[j] = total[j] + _ballot(x[j], count)


@_jit
def _average_agreeing(deltas, at, m, base_f, weights, normalize, lam, out, total, acc, div):  # pragma: no cover
    """Given the votes ``total[:m]``: sign election and disjoint mean of ``deltas[:, at:at+m]``, into ``out[:m]``.

    ``base_f`` holds those elements of the base (float32); ``acc`` and
    ``div`` are scratch of at least ``m`` elements; ``total`` is overwritten
    with the elected signs. ``out`` is float32, or uint16 for bfloat16 results
    (rounded as torch's cast, see ``_narrow``).
    """
    n = deltas.shape[0]
    zero = np.float32(0.0)
    one = np.float32(1.0)
    for j in range(m):
        total[j] = one if total[j] >= zero else -one
        acc[j] = zero
        div[j] = zero
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
            out[j] = _narrow(acc[j] / (dv if dv != zero else one) * total[j] * lam + base_f[j], out)
    else:
        for j in range(m):
            out[j] = _narrow(acc[j] * total[j] * lam + base_f[j], out)


@_jit
def consensus_merge(deltas, base, weights, count, normalize, lam, out):  # pragma: no cover - compiled
    """TIES sign election and disjoint mean, then ``base + lam * merged`` (mergekit's ``get_mask`` semantics).

    ``deltas`` (n x m float32, already sparsified and weighted), ``base``
    (m float32), ``out`` (m float32, or uint16 for bfloat16 results),
    ``weights`` (n float32). Per element: the majority
    sign is +1 where the sum of the deltas (``count``: of their signs) is >= 0,
    else -1; a delta agrees when its sign equals it (zero and NaN deltas never
    agree); the merged delta is the sum of the agreeing deltas (in model
    order), divided, with ``normalize``, by the sum of their weights (1 where
    that is 0).
    """
    size = base.shape[0]
    n = deltas.shape[0]
    total = np.empty(BLOCK, np.float32)
    acc = np.empty(BLOCK, np.float32)
    div = np.empty(BLOCK, np.float32)
    for start in range(0, size, BLOCK):
        m = min(BLOCK, size - start)
        total[:m] = 0
        for i in range(n):
            _vote(total, m, deltas[i, start : start + m], count)
        _average_agreeing(
            deltas, start, m, base[start : start + m], weights, normalize, lam, out[start : start + m], total, acc, div
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
    the front of ``inside[q]`` (whose length must exceed the piece's by
    ``COLLECT_SLACK``).
    """
    n = len(models)
    keys = key_model.shape[0]
    size = base.shape[0]
    base_f = np.empty(BLOCK, np.float32)
    magnitude = np.empty(BLOCK, np.float32)
    magnitude_bits = magnitude.view(np.uint32)
    for q in range(keys):
        for c in range(4):
            counts[q, c] = 0
    for start in range(0, size, BLOCK):
        m = min(BLOCK, size - start)
        base_src = base[start : start + m]
        for j in range(m):
            base_f[j] = _to_f32(base_src[j])
        for i in range(n):
            wanted = False
            for q in range(keys):
                wanted = wanted or key_model[q] == i
            if not wanted:
                continue
            src = models[i][start : start + m]
            for j in range(m):
                magnitude[j] = abs(_to_f32(src[j]) - base_f[j])
            for q in range(keys):
                if key_model[q] != i:
                    continue
                low = lo[q]
                high = hi[q]
                block_above = np.int32(0)  # 32-bit block counts: twice the vector lanes of 64-bit ones
                block_hi = np.int32(0)
                block_lo = np.int32(0)
                for j in range(m):
                    bits = magnitude_bits[j]
                    block_above += np.int32(bits > high)
                    block_hi += np.int32(bits == high)
                    block_lo += np.int32(bits == low)
                counts[q, 0] += block_above
                counts[q, 1] += block_hi
                if low < high:
                    counts[q, 2] += block_lo
                    past_low = low + np.uint32(1)
                    span = high - past_low  # strictly inside: (bits - past_low) < span, unsigned
                    counts[q, 3] = _collect_range(magnitude, m, past_low, span, inside[q], counts[q, 3])


@_jit
def ties_merge(
    base,
    models,
    drop_below,
    zero_all,
    tie_value,
    tie_from,
    tie_keep,
    tie_seen,
    scales,
    weights,
    count,
    normalize,
    lam,
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
    tensor path, so both give the same bits. ``out`` as in :func:`consensus_merge`.
    """
    n = len(models)
    size = base.shape[0]
    zero = np.float32(0.0)
    base_f = np.empty(BLOCK, np.float32)
    deltas = np.empty((n, BLOCK), np.float32)
    total = np.empty(BLOCK, np.float32)
    acc = np.empty(BLOCK, np.float32)
    div = np.empty(BLOCK, np.float32)
    for start in range(0, size, BLOCK):
        m = min(BLOCK, size - start)
        base_src = base[start : start + m]
        for j in range(m):
            base_f[j] = _to_f32(base_src[j])
            total[j] = zero
        for i in range(n):
            d = deltas[i]
            if zero_all[i]:
                for j in range(m):
                    d[j] = zero
                continue  # zero deltas add no votes
            src = models[i][start : start + m]
            cut = drop_below[i]
            scale = scales[i]
            w = weights[i]
            if tie_from[i] < start + m:
                for j in range(m):
                    x = _to_f32(src[j]) - base_f[j]
                    d[j] = zero if abs(x) < cut else x
                value = tie_value[i]
                for j in range(max(0, tie_from[i] - start), m):
                    if abs(d[j]) == value:
                        if tie_seen[i] >= tie_keep[i]:
                            d[j] = zero
                        tie_seen[i] += 1
                for j in range(m):
                    d[j] = d[j] * scale * w
                _vote(total, m, d, count)
            else:  # no tie rule here: task vector, cut, scale and vote in one loop
                for j in range(m):
                    x = _to_f32(src[j]) - base_f[j]
                    x = (zero if abs(x) < cut else x) * scale * w
                    d[j] = x
                    total[j] = total[j] + _ballot(x, count)
        _average_agreeing(deltas, 0, m, base_f, weights, normalize, lam, out[start : start + m], total, acc, div)
    return out


@_jit
def weighted_sum(models, weights, normalize, total, out):  # pragma: no cover - compiled
    """``out = (models[0] * weights[0] + models[1] * weights[1] + ...) / total`` (no division without ``normalize``).

    ``models`` is a tuple of equal-length float32 arrays or bfloat16 bit
    patterns (uint16), ``weights`` float32. Each product is rounded to float32
    before it is added (no fused multiply-add), the sum runs in model order,
    then the true division: the operations of the tensor path
    (``linear.weighted_sum``) and of mergekit's ``(tensors * weights).sum(0)``.
    ``out`` is float32, or uint16 for a bfloat16 result: each float32 sum is
    then rounded as torch's cast rounds it, in the same pass, so the sums
    never travel through memory.
    """
    n = len(models)
    size = out.shape[0]
    acc = np.empty(BLOCK, np.float32)
    for start in range(0, size, BLOCK):
        m = min(BLOCK, size - start)
        src = models[0][start : start + m]
        w = weights[0]
        for j in range(m):
            acc[j] = _to_f32(src[j]) * w
        for i in range(1, n):
            src = models[i][start : start + m]
            w = weights[i]
            for j in range(m):
                acc[j] = acc[j] + _to_f32(src[j]) * w
        if normalize:
            for j in range(m):
                acc[j] = acc[j] / total
        o = out[start : start + m]
        for j in range(m):
            o[j] = _narrow(acc[j], o)
    return out


@_jit
def all_finite(bits, exponent):  # pragma: no cover - compiled
    """Whether no element of ``bits`` has all of ``exponent``'s bits set (i.e. is Inf or NaN).

    ``bits`` holds float32 (uint32, ``exponent`` 0x7F800000) or bfloat16
    (uint16, 0x7F80) bit patterns. The engine's NaN/Inf probe of every input:
    an OR over each block vectorizes, where a float sum (the torch probe) costs
    about three times as much per element.
    """
    size = bits.shape[0]
    for start in range(0, size, BLOCK):
        block = bits[start : start + BLOCK]
        found = False
        for j in range(block.shape[0]):
            found |= (block[j] & exponent) == exponent
        if found:
            return False
    return True


@_jit
def magnitudes(models, base, which, out):  # pragma: no cover - compiled
    """``out[r] = |models[which[r]] - base|`` in float32: the sampled task-vector magnitudes of a top-k selection.

    ``models`` (a tuple of equal-length arrays) and ``base``: float32, or
    bfloat16 bit patterns (uint16).
    """
    size = base.shape[0]
    for r in range(which.shape[0]):
        src = models[which[r]]
        row = out[r]
        for j in range(size):
            row[j] = abs(_to_f32(src[j]) - _to_f32(base[j]))


#: bits per digit of :func:`kth_smallest`: four 2048-bin histograms stay in L1 cache
DIGIT_BITS = 11


@_jit
def kth_smallest(values, k, scratch):  # pragma: no cover - compiled
    """The ``k``-th smallest (0-based) of ``values``: non-negative float32 without NaN.

    Such floats order like their bit patterns, so this is a radix select on
    the bits above the minimum: a histogram of the top ``DIGIT_BITS`` of
    ``bits - min`` picks the bucket holding rank ``k``, only that bucket's
    elements go on (compressed into ``scratch``, which needs ``len(values) +
    COLLECT_SLACK`` elements), and so on down to one value. The first pass
    sees every element, later ones a small share: about 1.5 ns per element,
    where ``np.partition`` takes 6-9 ns.
    """
    bits = values.view(np.uint32)
    low = bits[0]
    high = bits[0]
    for j in range(bits.shape[0]):
        b = bits[j]
        low = min(low, b)
        high = max(high, b)
    source = values
    count = values.shape[0]
    digits = 1 << DIGIT_BITS
    hist = np.empty(4 * digits, np.int64)  # four interleaved histograms: no stall on repeated bins
    while True:
        span = high - low
        if span == 0:
            return np.array([low], np.uint32).view(np.float32)[0]
        width = 0
        while (span >> np.uint32(width)) != 0:
            width += 1
        shift = np.uint32(max(0, width - DIGIT_BITS))
        hist[:] = 0
        source_bits = source[:count].view(np.uint32)
        for j in range(count):
            hist[(j & 3) * digits + ((source_bits[j] - low) >> shift)] += 1
        digit = 0
        while True:
            in_bin = hist[digit] + hist[digits + digit] + hist[2 * digits + digit] + hist[3 * digits + digit]
            if k < in_bin:
                break
            k -= in_bin
            digit += 1
        new_low = low + (np.uint32(digit) << shift)
        if shift == 0:
            return np.array([new_low], np.uint32).view(np.float32)[0]
        new_span = np.uint32(1) << shift
        found = _collect_range(source, count, new_low, new_span, scratch, 0)
        low = new_low
        high = min(high, new_low + (new_span - np.uint32(1)))
        source = scratch
        count = found


#: set once :func:`warm_up` has loaded the compiled code (see ``kernels.loaded``).
READY = False


_GAMMA = np.uint64(SPLITMIX_GAMMA)
_MIX1 = np.uint64(SPLITMIX_MIX1)
_MIX2 = np.uint64(SPLITMIX_MIX2)
_UNIFORM_SCALE = np.float32(UNIFORM_SCALE)


@_jit
def _splitmix_unit(seed, n):  # pragma: no cover - compiled
    """SplitMix64 output ``n`` from ``seed`` as a float32 in [0, 1): ``determinism.splitmix_uniform``'s bits.

    Every operand is uint64, so each product wraps modulo 2^64.
    """
    z = seed + (n + np.uint64(1)) * _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    return np.float32(z >> np.uint64(40)) * _UNIFORM_SCALE


@_jit
def splitmix_keep(seed, first, bound, out):  # pragma: no cover - compiled
    """``out[j]`` = 1.0 where SplitMix64's number ``first + j`` is below the bound, else 0.0.

    ``bound`` holds one float32 for every element, or one per element: a
    Bernoulli keep mask (DARE, DELLA) in one pass, the bits of
    ``determinism.splitmix_uniform(seed, first, len(out)) < bound``.
    """
    start = np.uint64(first)
    shared = bound.shape[0] == 1
    for j in range(out.shape[0]):
        u = _splitmix_unit(seed, start + np.uint64(j))
        b = bound[0] if shared else bound[j]
        out[j] = np.float32(1.0) if u < b else np.float32(0.0)
    return out


@_jit
def masked_l1(model, base, mask, sums):  # pragma: no cover - compiled
    """``sums[0]`` = sum |model - base|, ``sums[1]`` = the same where ``mask != 0``, in float64.

    Element j goes to lane ``j % L1_LANES``, each lane adds in element order
    from 0.0, and the lanes are added 0 to 7 at the end: a fixed order (so
    the same bits everywhere, as ``kernels.masked_l1_reference``) that still
    vectorizes. The difference is taken in float32, as on the tensor path.
    """
    before = np.zeros(L1_LANES, np.float64)
    after = np.zeros(L1_LANES, np.float64)
    size = model.shape[0]
    whole = size - size % L1_LANES
    for start in range(0, whole, L1_LANES):
        for k in range(L1_LANES):
            j = start + k
            a = np.float64(abs(_to_f32(model[j]) - _to_f32(base[j])))
            before[k] += a
            after[k] += a if mask[j] != 0 else 0.0
    for k in range(size - whole):
        j = whole + k
        a = np.float64(abs(_to_f32(model[j]) - _to_f32(base[j])))
        before[k] += a
        after[k] += a if mask[j] != 0 else 0.0
    total_before = before[0]
    total_after = after[0]
    for k in range(1, L1_LANES):
        total_before += before[k]
        total_after += after[k]
    sums[0] = total_before
    sums[1] = total_after
    return sums


@_jit
def masked_delta(model, base, mask, masked, scale, scaled, weight, weighted, out):  # pragma: no cover - compiled
    """``out = (model - base) * mask * scale * weight`` in float32, each factor only where flagged.

    The operations of the tensor path (``sub_into``, a masking sparsifier's
    ``sparsify``, the rescale and the weight, each rounded), in one pass over
    the stored float32 or bfloat16 bytes.
    """
    for j in range(out.shape[0]):
        v = _to_f32(model[j]) - _to_f32(base[j])
        if masked:
            v = v * mask[j]
        if scaled:
            v = v * scale
        if weighted:
            v = v * weight
        out[j] = v
    return out


#: bits per digit of ``row_ranks``' radix sort (three passes cover a float32; 8 bits ran 5% slower)
RANK_DIGIT_BITS = 11


@_jit
def row_ranks(bits, out):  # pragma: no cover - compiled
    """``out[r, j]`` = the rank of ``bits[r, j]`` in its row (0 = smallest) / (row length - 1), float32.

    ``bits`` holds non-negative float32 values as uint32 (their bit patterns
    sort as the values do). Equal values rank by position: a stable LSD radix
    sort of (key, position) pairs, the order of ``della.rank_norm``'s
    (bits, position) keys at a third of its cost. The digit counts of all
    passes come from one read of the row, and a pass whose digit is the same
    for the whole row is skipped.
    """
    rows, length = bits.shape
    scale = np.float32(length - 1)
    passes = (32 + RANK_DIGIT_BITS - 1) // RANK_DIGIT_BITS
    buckets = 1 << RANK_DIGIT_BITS
    mask = np.uint32(buckets - 1)
    keys = np.empty(length, np.uint32)
    spare_keys = np.empty(length, np.uint32)
    order = np.empty(length, np.int64)
    spare = np.empty(length, np.int64)
    count = np.empty((passes, buckets), np.int64)
    normalized = np.empty(length, np.float32)  # rank / (length - 1), one division per rank
    for position in range(length):
        normalized[position] = np.float32(position) / scale
    for r in range(rows):
        row = bits[r]
        count[:, :] = 0
        for j in range(length):
            key = row[j]
            keys[j] = key
            order[j] = j
            for p in range(passes):
                count[p, (key >> np.uint32(p * RANK_DIGIT_BITS)) & mask] += 1
        for p in range(passes):
            shift = np.uint32(p * RANK_DIGIT_BITS)
            if count[p, (keys[0] >> shift) & mask] == length:
                continue  # every key has this digit: the order stands
            total = 0
            for d in range(buckets):
                c = count[p, d]
                count[p, d] = total
                total += c
            for j in range(length):
                key = keys[j]
                digit = (key >> shift) & mask
                slot = count[p, digit]
                spare_keys[slot] = key
                spare[slot] = order[j]
                count[p, digit] = slot + 1
            keys, spare_keys = spare_keys, keys
            order, spare = spare, order
        for position in range(length):
            out[r, order[position]] = normalized[position]
    return out


def warm_up() -> None:
    """Load the compiled code (numba's first call costs ~0.7 s: its imports and target set-up)."""
    global READY
    values = np.zeros(8, np.float32)
    weighted_sum((values,), np.ones(1, np.float32), True, np.float32(1.0), np.empty(8, np.float32))
    all_finite(values.view(np.uint32), np.uint32(0x7F800000))
    kth_smallest(values, 0, np.empty(8 + COLLECT_SLACK, np.float32))
    bracket_tally(
        (values,),
        values,
        np.zeros(1, np.int64),
        np.zeros(1, np.uint32),
        np.ones(1, np.uint32),
        np.empty((1, 8 + COLLECT_SLACK), np.float32),
        np.empty((1, 4), np.int64),
    )
    splitmix_keep(np.uint64(1), 0, values[:1], np.empty(8, np.float32))
    splitmix_keep(np.uint64(1), 0, values, np.empty(8, np.float32))
    masked_l1(values, values, values, np.zeros(2, np.float64))
    masked_l1(values.view(np.uint16)[:8], values.view(np.uint16)[:8], values, np.zeros(2, np.float64))
    row_ranks(values.view(np.uint32).reshape(2, 4), np.empty((2, 4), np.float32))
    for stored in (values, values.view(np.uint16)[:8]):
        masked_delta(stored, stored, values, True, np.float32(1), True, np.float32(1), True, np.empty(8, np.float32))
    READY = True
