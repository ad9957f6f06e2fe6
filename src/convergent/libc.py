"""The C library through ctypes, loaded once, for the few calls Python does not expose.

Used for Linux ``fallocate`` (``os.posix_fallocate`` writes zeros where the
filesystem cannot reserve space) and glibc's ``mallopt``.
"""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def libc() -> ctypes.CDLL | None:
    """glibc (with ``errno`` captured for ``ctypes.get_errno``), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None
