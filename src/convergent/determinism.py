"""Seeds and random draws that do not depend on threads, chunking or arrival order.

Rules (see DESIGN.md): there is no global RNG. Every stochastic step draws from
a stream seeded by ``hash(seed key, tensor name, purpose)``. Element-wise draws
(``uniform_rows``, and DARE's and DELLA's keep masks, ``TensorTask.keep_mask``)
are counter-based: element n of a tensor gets SplitMix64's n-th output
(Steele, Lea & Flood 2014, "Fast splittable pseudorandom number generators"),
a function of (stream, n) alone, so a tensor processed whole or in chunks of
any size sees exactly the same numbers, on any machine (integer arithmetic
only). In the fused kernel it is also 6× faster than ``torch.rand``'s
Mersenne Twister (DARE draws one number per element and model, twice).
Whole-tensor procedures use a seeded ``torch.Generator`` (``generator``).
Fixed-order reductions work in blocks of ``block_rows``.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

#: elements per block: the unit of fixed-order reductions (and of whole-block work).
BLOCK_ELEMENTS = 1 << 20


def row_numel(shape: tuple[int, ...]) -> int:
    """Elements in one row (dim 0 slice) of a tensor of ``shape``."""
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def num_rows(shape: tuple[int, ...]) -> int:
    """Rows along dim 0; a 0-d tensor counts as one row."""
    return shape[0] if len(shape) >= 1 else 1


def block_rows(shape: tuple[int, ...]) -> int:
    """Rows per block for a tensor of ``shape`` (at least one row)."""
    return max(1, BLOCK_ELEMENTS // max(1, row_numel(shape)))


def seed_key(seed: int | str | bytes, tensor_name: str) -> bytes:
    """The 32-byte key for all draws on one tensor of one merge.

    ``seed`` is the user's ``--seed`` for one-shot merges or the Merkle root of
    a merge set; the tensor name makes draws independent between tensors.
    """
    if isinstance(seed, int):
        seed = str(seed)
    if isinstance(seed, str):
        seed = seed.encode()
    return hashlib.sha256(b"convergent/seed\x00" + seed + b"\x00" + tensor_name.encode()).digest()


def generator(key: bytes, purpose: str, block: int = 0) -> torch.Generator:
    """A CPU generator seeded by (key, purpose, block); purpose names the draw."""
    digest = hashlib.sha256(key + b"\x00" + purpose.encode() + b"\x00" + str(block).encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


#: SplitMix64's constants: the state advances by GAMMA (2^64 / golden ratio), and each
#: output is the state through two xor-shift-multiply rounds (Stafford's "Mix13").
SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
SPLITMIX_MIX1 = 0xBF58476D1CE4E5B9
SPLITMIX_MIX2 = 0x94D049BB133111EB
#: a float32 in [0, 1) is the top 24 bits of an output times 2^-24 (exact, like torch.rand's)
UNIFORM_SCALE = 2.0**-24


def stream_seed(key: bytes, purpose: str) -> int:
    """The 64-bit SplitMix64 seed of the draw named ``purpose`` on the tensor keyed ``key``."""
    digest = hashlib.sha256(key + b"\x00" + purpose.encode() + b"\x00uniform").digest()
    return int.from_bytes(digest[:8], "little")


def splitmix_uniform(seed: int, first: int, count: int) -> np.ndarray:
    """Outputs ``first .. first + count - 1`` of SplitMix64 from ``seed``, as float32 in [0, 1).

    Output n is ``mix(seed + (n + 1) * GAMMA)``. This numpy version is the
    definition; ``fused_kernels.splitmix_keep`` draws the same bits in its pass.
    """
    z = np.arange(first + 1, first + count + 1, dtype=np.uint64)
    z *= np.uint64(SPLITMIX_GAMMA)  # unsigned array arithmetic wraps modulo 2^64
    z += np.uint64(seed)
    z ^= z >> np.uint64(30)
    z *= np.uint64(SPLITMIX_MIX1)
    z ^= z >> np.uint64(27)
    z *= np.uint64(SPLITMIX_MIX2)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(40)).astype(np.float32) * np.float32(UNIFORM_SCALE)


def element_range(shape: tuple[int, ...], row_start: int, row_stop: int) -> tuple[int, int]:
    """(first flat element, element count) of rows [row_start, row_stop): their place in a draw's stream."""
    per_row = row_numel(shape)
    return row_start * per_row, (row_stop - row_start) * per_row


def uniform_rows(key: bytes, purpose: str, shape: tuple[int, ...], row_start: int, row_stop: int) -> torch.Tensor:
    """Uniform [0, 1) float32 numbers for rows [row_start, row_stop) of ``shape``.

    Element (r, ...) is output ``r * row_numel + offset`` of the stream
    ``stream_seed(key, purpose)``: the same whichever chunk asks for it.
    """
    values = splitmix_uniform(stream_seed(key, purpose), *element_range(shape, row_start, row_stop))
    chunk_shape = (row_stop - row_start, *shape[1:]) if len(shape) >= 1 else ()
    return torch.from_numpy(values).reshape(chunk_shape)
