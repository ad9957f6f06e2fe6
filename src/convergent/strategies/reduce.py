"""Whole-tensor statistics computed from blocks, exactly or in a fixed order.

Strategies call these from ``prepare`` so that a tensor streamed in chunks and
a tensor held whole give the same thresholds and norms, to the bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

_HIGH = 1 << 16
#: Up to this many values, selection gathers them and uses torch.kthvalue (exact, fast);
#: beyond it, a two-pass radix select keeps memory at one chunk.
IN_MEMORY_SELECT = 1 << 24


def _keys(values: torch.Tensor) -> torch.Tensor:
    """Order-preserving int64 keys for float32 values (total order, -0 < +0)."""
    bits = values.contiguous().to(torch.float32).view(torch.int32).to(torch.int64)
    # Negative floats: flip all bits; positive: set the sign bit. Maps to [0, 2^32).
    return torch.where(bits < 0, (~bits) & 0xFFFFFFFF, bits | 0x80000000)


def _from_key(key: int) -> float:
    bits = (key & 0x7FFFFFFF) if key >= 0x80000000 else (~key) & 0xFFFFFFFF
    as_int = torch.tensor([bits], dtype=torch.int64).to(torch.int32)
    return float(as_int.view(torch.float32)[0])


def kth_largest(chunks: Callable[[], Iterable[torch.Tensor]], k: int) -> float:
    """The k-th largest value (k >= 1) over all chunks, exactly.

    ``chunks`` is called twice (a two-pass radix select on the float32 bit
    patterns), so memory stays at one chunk whatever the tensor size. Equals
    ``torch.topk(flat, k).values[-1]`` on the concatenation.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    gathered: list[torch.Tensor] = []
    size = 0
    for chunk in chunks():
        size += chunk.numel()
        if size > IN_MEMORY_SELECT:
            gathered = []
            break
        gathered.append(chunk.reshape(-1).to(torch.float32))
    if gathered or size == 0:
        if k > size:
            raise ValueError(f"k={k} exceeds the number of values ({size})")
        flat = torch.cat(gathered) if len(gathered) > 1 else gathered[0]
        return float(torch.kthvalue(flat, size - k + 1).values)
    return _radix_kth_largest(chunks, k)


def _radix_kth_largest(chunks: Callable[[], Iterable[torch.Tensor]], k: int) -> float:
    high_counts = torch.zeros(_HIGH, dtype=torch.int64)
    total = 0
    for chunk in chunks():
        keys = _keys(chunk.reshape(-1))
        high_counts += torch.bincount(keys >> 16, minlength=_HIGH)
        total += keys.numel()
    if k > total:
        raise ValueError(f"k={k} exceeds the number of values ({total})")
    # Walk from the largest high half down until k values are covered.
    from_top = torch.flip(high_counts, dims=[0]).cumsum(0)
    pos = int(torch.searchsorted(from_top, torch.tensor([k]), right=False)[0])
    high = _HIGH - 1 - pos
    above = int(from_top[pos - 1]) if pos > 0 else 0
    low_counts = torch.zeros(_HIGH, dtype=torch.int64)
    for chunk in chunks():
        keys = _keys(chunk.reshape(-1))
        sel = keys[(keys >> 16) == high]
        if sel.numel():
            low_counts += torch.bincount(sel & 0xFFFF, minlength=_HIGH)
    low_from_top = torch.flip(low_counts, dims=[0]).cumsum(0)
    low_pos = int(torch.searchsorted(low_from_top, torch.tensor([k - above]), right=False)[0])
    low = _HIGH - 1 - low_pos
    return _from_key((high << 16) | low)


def kth_smallest(chunks: Callable[[], Iterable[torch.Tensor]], k: int) -> float:
    """The k-th smallest value (k >= 1) over all chunks, exactly."""
    return -kth_largest(lambda: (-c for c in chunks()), k)


#: Width of the lanes summed sequentially before the lanes are added up.
LANE = 1024


def sum_last(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension in an order that does not depend on the thread count.

    A plain ``x.sum()`` over a long dimension is split across threads, so its
    last bit changes with ``torch.get_num_threads()``. Summing fixed 1024-wide
    lanes (each by one thread) and then the lanes keeps the order fixed.
    """
    if x.dim() == 0:
        return x
    n = x.shape[-1]
    if n > LANE:
        whole = n - n % LANE
        lanes = x[..., :whole].reshape(*x.shape[:-1], -1, LANE).sum(-1)
        if whole < n:
            lanes = torch.cat([lanes, x[..., whole:].sum(-1, keepdim=True)], dim=-1)
        x = lanes
    return x.sum(-1)


def blocked_sum(values: Iterator[torch.Tensor] | Iterable[torch.Tensor]) -> float:
    """Sum of all elements, each block reduced in float64 in a fixed order, blocks added in order."""
    total = 0.0
    for block in values:
        total += float(sum_last(block.to(torch.float64).reshape(-1)))
    return total


def blocked_sums(values: Iterable[torch.Tensor]) -> torch.Tensor:
    """Like :func:`blocked_sum` for a stack of per-block vectors (sum over blocks)."""
    total: torch.Tensor | None = None
    for block in values:
        part = block.to(torch.float64)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("no blocks")
    return total


def top_fraction_threshold(chunks: Callable[[], Iterable[torch.Tensor]], numel: int, fraction: float) -> float:
    """Smallest value kept when keeping the top ``fraction`` of ``numel`` values.

    Keeps ``k = round(fraction * numel)`` values (at least one when fraction > 0);
    returns +inf when nothing is kept. Values >= threshold are kept (ties at the
    threshold are all kept, which is deterministic where argsort is not).
    """
    k = round(fraction * numel)
    if fraction > 0 and k == 0:
        k = 1
    if k <= 0:
        return float("inf")
    if k >= numel:
        return float("-inf")
    return kth_largest(chunks, k)
