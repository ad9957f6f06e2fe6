"""The Merkle root of a merge set: a hash of its live contributions in canonical order.

Leaves are the live contribution ids sorted ascending; the tree is a plain
binary Merkle tree with domain-separated leaf and node hashes (an odd node is
carried up unchanged). The root binds the set id too, so it names exactly one
(set, live contributions) pair and seeds every random draw of a resolve.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

_LEAF = b"\x00"
_NODE = b"\x01"


def tree_root(leaves: Iterable[str]) -> bytes:
    """Root of the binary Merkle tree over hex ids (sorted by the caller); 32 zero bytes if empty."""
    level = [hashlib.sha256(_LEAF + bytes.fromhex(x)).digest() for x in leaves]
    if not level:
        return bytes(32)
    while len(level) > 1:
        nxt = [hashlib.sha256(_NODE + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def merkle_root(set_id: str, live_ids: Iterable[str]) -> str:
    """The set's root (hex): sha256('convergent/root' | set id | tree root of sorted live ids)."""
    ids = sorted(live_ids)
    return hashlib.sha256(b"convergent/root\x00" + bytes.fromhex(set_id) + tree_root(ids)).hexdigest()
