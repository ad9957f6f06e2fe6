"""Reusable read buffers, one set per worker thread.

Reading from the page cache is a memory copy into our buffer; into fresh
memory it also page-faults every 4 kB, which made reads 3-5x slower than the
copy itself. A worker keeps its buffers from chunk to chunk and tensor to
tensor; a tensor's values are views of them only while that tensor is being
merged. (Huge-page-backed buffers copied 50% faster in isolation but gave no
gain in whole merges, so plain memory is used.)
"""

from __future__ import annotations

import threading

import torch

#: Buffers larger than this are freed when their tensor is done; smaller ones
#: stay with their worker for the next tensor.
RETAIN_BYTES = 32 << 20


class _WorkerSlots(threading.local):
    def __init__(self) -> None:
        self.slots: dict[int, torch.Tensor] = {}


class ReadBuffers:
    """Each worker's reusable read buffers, one per input slot."""

    def __init__(self) -> None:
        self._local = _WorkerSlots()

    def get(self, slot: int, nbytes: int) -> torch.Tensor:
        slots = self._local.slots
        buf = slots.get(slot)
        if buf is None or buf.numel() < nbytes:
            slots.pop(slot, None)  # free the old one before the new one is allocated
            buf = slots[slot] = torch.empty(max(1, nbytes), dtype=torch.uint8)
        return buf

    def trim(self) -> None:
        """Free this worker's large buffers (bounded RSS between tensors)."""
        slots = self._local.slots
        for slot in [k for k, b in slots.items() if b.numel() > RETAIN_BYTES]:
            del slots[slot]
