"""Bearer tokens for nodes: reading them, and checking them in constant time.

A node has an optional *write* token (pushing state, uploading manifests and
blobs) and an optional *read* token (everything else but health). Without a
write token a node accepts no writes at all; without a read token reads are
open. A request presents ``Authorization: Bearer <token>``; the write token
also grants reads.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from convergent.errors import ConvergentError

#: Environment variable holding the token a client presents to peers.
TOKEN_ENV = "CONVERGENT_TOKEN"
#: Tokens shorter than this are refused: they are guessable.
MIN_TOKEN_LEN = 16


class TokenError(ConvergentError):
    """A token file is missing, empty or too short."""


def read_token_file(path: str | Path) -> str:
    """The token in ``path`` (surrounding whitespace stripped)."""
    p = Path(path)
    try:
        token = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenError(f"cannot read token file '{p}': {exc}", "write a random token into it") from None
    check_token(token, str(p))
    return token


def check_token(token: str, where: str = "token") -> str:
    if not token or len(token) < MIN_TOKEN_LEN or any(c.isspace() for c in token) or not token.isprintable():
        raise TokenError(
            f"{where}: a token must be at least {MIN_TOKEN_LEN} printable characters without spaces",
            "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'",
        )
    return token


def client_token(token_file: str | Path | None) -> str | None:
    """The token a client presents: ``--token-file`` first, else ``$CONVERGENT_TOKEN``, else None."""
    if token_file:
        return read_token_file(token_file)
    env = os.environ.get(TOKEN_ENV, "").strip()
    return check_token(env, f"${TOKEN_ENV}") if env else None


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header, or None."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def token_matches(presented: str | None, expected: str | None) -> bool:
    """Constant-time comparison; False when either side is missing."""
    if not presented or not expected:
        return False
    return hmac.compare_digest(presented.encode("utf-8", "replace"), expected.encode("utf-8"))


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}
