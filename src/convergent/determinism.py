"""Seeds and random draws that do not depend on threads, chunking or arrival order.

Rules (see DESIGN.md): there is no global RNG. Every stochastic step draws from
a generator seeded by ``hash(seed key, tensor name, purpose, block)``. Random
numbers are produced per fixed *block* of rows (``block_rows``), a size that
depends only on the tensor's shape, so a tensor processed whole or in chunks
(chunks are always whole blocks) sees exactly the same numbers.
"""

from __future__ import annotations

import hashlib
import math

import torch

#: elements per block; the unit of random draws and of fixed-order reductions.
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


def uniform_rows(key: bytes, purpose: str, shape: tuple[int, ...], row_start: int, row_stop: int) -> torch.Tensor:
    """Uniform [0, 1) float32 numbers for rows [row_start, row_stop) of ``shape``.

    ``row_start`` must lie on a block boundary; the values for any row are the
    same whichever chunk asks for them.
    """
    rows_per_block = block_rows(shape)
    if row_start % rows_per_block:
        raise ValueError(f"row_start {row_start} is not a multiple of the block size {rows_per_block}")
    per_row = row_numel(shape)
    total_rows = num_rows(shape)
    parts = []
    for first in range(row_start, row_stop, rows_per_block):
        block_index = first // rows_per_block
        # Always draw the full block so a short final chunk sees the same numbers.
        block_len = min(rows_per_block, total_rows - first) * per_row
        values = torch.rand(block_len, generator=generator(key, purpose, block_index), dtype=torch.float32)
        take = (min(first + rows_per_block, row_stop) - first) * per_row
        parts.append(values[:take])
    flat = torch.cat(parts) if len(parts) != 1 else parts[0]
    chunk_shape = (row_stop - row_start, *shape[1:]) if len(shape) >= 1 else ()
    return flat.reshape(chunk_shape)
