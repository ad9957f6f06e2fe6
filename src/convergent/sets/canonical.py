"""Canonical JSON and content ids: the one way bytes are hashed into ids.

Ids are the hex sha256 of canonical JSON: keys sorted, no whitespace, UTF-8,
no NaN/Infinity. Everything that names content (sets, contributions,
manifests, states) goes through :func:`content_id`.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

HEX64 = re.compile(r"^[0-9a-f]{64}$")


def canonical_json(data: Any) -> bytes:
    """Canonical JSON bytes of ``data`` (sorted keys, no whitespace, UTF-8)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_id(data: Any) -> str:
    """Hex sha256 of the canonical JSON of ``data``."""
    return sha256_hex(canonical_json(data))


def is_hex_id(text: str) -> bool:
    """True for a full 64-character lowercase hex sha256."""
    return isinstance(text, str) and bool(HEX64.match(text))
