"""How strategies reach the fused numba kernels (``fused_kernels``) without paying for numba up front.

Importing numba and loading the compiled kernels costs most of a second, so
``fused_kernels`` is imported lazily: the engine calls :func:`load` on a
background thread when a merge starts (``Strategy.warm_up``), and a strategy
whose tensor path gives the same bits may ask :func:`loaded` and keep working
with torch until then, instead of waiting.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from types import ModuleType

import numpy as np
import torch

from convergent import determinism
from convergent.errors import ConvergentError

_MODULE = "convergent.strategies.fused_kernels"


def require() -> ModuleType:
    """``fused_kernels``, imported if need be (the first import costs numba's); a clear error without numba."""
    try:
        from convergent.strategies import fused_kernels
    except ImportError as exc:
        raise ConvergentError(
            f"the fused merge kernels cannot be loaded: {exc}",
            "install numba>=0.68 (a dependency of convergent): pip install 'numba>=0.68'",
        ) from exc
    return fused_kernels


def load() -> None:
    """Import ``fused_kernels`` and load its compiled code (``Strategy.warm_up`` of strategies using it)."""
    require().warm_up()


def loaded() -> ModuleType | None:
    """``fused_kernels`` once :func:`load` has finished (in any thread), else None; never waits."""
    module = sys.modules.get(_MODULE)
    return module if module is not None and getattr(module, "READY", False) else None


def waited() -> ModuleType | None:
    """``fused_kernels``, waiting for them if they are still loading; None where numba cannot be imported.

    For kernels whose numpy fallback gives the same bits but runs far slower.
    """
    fused = loaded()
    if fused is not None:
        return fused
    try:
        load()
    except ConvergentError:
        return None
    return require()


#: pieces of at least this many elements wait for the kernels rather than take a
#: tensor path: on 2 cores, a 1B-parameter linear merge finished 0.3 s sooner
#: waiting (loading ran 0.65 s instead of 1 s beside torch's work)
WAIT_NUMEL = 1 << 20


def for_size(numel: int) -> ModuleType | None:
    """``fused_kernels`` for a piece of ``numel`` elements: :func:`waited` for big pieces, else :func:`loaded`.

    Small pieces (small models, tests) do not pay numba's load for a few
    microseconds of arithmetic; big ones lose more sharing the cores with
    the load than waiting for it.
    """
    return waited() if numel >= WAIT_NUMEL else loaded()


def kernel_ready(first: torch.Tensor, others: Sequence[torch.Tensor]) -> bool:
    """Whether the fused kernels can read these inputs' stored bytes: all float32, or all bfloat16."""
    return first.dtype in (torch.float32, torch.bfloat16) and all(t.dtype == first.dtype for t in others)


#: exponent bits of the stored floating dtypes ``all_finite`` reads (all set: Inf or NaN)
_EXPONENT = {torch.float32: (torch.int32, np.uint32(0x7F800000)), torch.bfloat16: (torch.int16, np.uint16(0x7F80))}


def all_finite(t: torch.Tensor) -> bool | None:
    """Whether ``t`` has no NaN/Inf, by ``fused_kernels.all_finite`` on its stored bits; None if it cannot tell.

    None when the kernels are not loaded yet, or for other dtypes and
    non-contiguous tensors: the caller then uses torch (same answer).
    """
    fused = loaded()
    exponent = _EXPONENT.get(t.dtype)
    if fused is None or exponent is None or not t.is_contiguous():
        return None
    word, mask = exponent
    return bool(fused.all_finite(t.reshape(-1).view(word).numpy().view(mask.dtype), mask))


def keep_mask(seed: int, first: int, count: int, bound: float | np.ndarray) -> np.ndarray:
    """1.0 where ``determinism.splitmix_uniform(seed, first, count)`` is below ``bound``, else 0.0.

    ``bound`` is float32: one value, or one per number. One fused pass
    (0.8 ns per number here), waiting for the kernels if they are still
    loading; numpy's numbers and comparison only where numba cannot be
    imported (the same bits, 25× slower).
    """
    bound = np.ascontiguousarray(bound, dtype=np.float32).reshape(-1)
    if bound.shape[0] not in (1, count):
        raise ValueError(f"{bound.shape[0]} bounds for {count} numbers")
    fused = waited()
    if fused is None:
        return (determinism.splitmix_uniform(seed, first, count) < bound).astype(np.float32)
    return fused.splitmix_keep(np.uint64(seed), first, bound, np.empty(count, np.float32))


#: float64 accumulators of ``fused_kernels.masked_l1`` and its reference: one AVX-512
#: register, each lane a sum in element order
L1_LANES = 8


def masked_l1_reference(delta: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(sum |delta|, sum |delta| where mask != 0) in float64, in ``fused_kernels.masked_l1``'s order.

    For a float32 ``delta`` already formed (inputs the kernel cannot read), or
    without numba: the same bits as the kernel.
    """
    magnitudes = np.abs(delta).astype(np.float64)
    kept = np.where(mask != 0, magnitudes, 0.0)
    return _lane_sum(magnitudes), _lane_sum(kept)


def _lane_sum(values: np.ndarray) -> float:
    lanes = np.zeros(L1_LANES, np.float64)
    whole = len(values) - len(values) % L1_LANES
    if whole:
        lanes = np.cumsum(values[:whole].reshape(-1, L1_LANES), axis=0)[-1]  # each lane in element order
    for k, value in enumerate(values[whole:]):
        lanes[k] += value
    total = lanes[0]
    for k in range(1, L1_LANES):
        total += lanes[k]
    return float(total)


def masked_l1(model: np.ndarray, base: np.ndarray, mask: np.ndarray) -> tuple[float, float] | None:
    """``fused_kernels.masked_l1`` of stored float32/bfloat16 arrays; None without numba (use the reference)."""
    fused = waited()
    if fused is None:
        return None
    sums = fused.masked_l1(model, base, mask, np.zeros(2, np.float64))
    return float(sums[0]), float(sums[1])


def raw_array(t: torch.Tensor) -> np.ndarray:
    """A float32 or bfloat16 tensor as the numpy array the fused kernels take (bfloat16 as uint16 bits)."""
    return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy()
