"""Ed25519 identities: key files, signing and verifying contributions.

* A private key file is PEM (PKCS#8, unencrypted, mode 0600); ``FILE.pub``
  next to it holds the raw public key as 64 hex characters.
* A contribution is signed over ``b"convergent/contribution/v1\\0" + id``;
  its signer's public key is part of the id, so a signature cannot be moved
  to another contribution or stripped without changing the id.
* A set whose genesis says ``require_signed`` accepts only contributions
  signed by one of ``allowed_keys``, at add time and at join/import time.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from convergent.errors import SignatureError
from convergent.sets.canonical import HEX64
from convergent.sets.model import Contribution, Genesis

_DOMAIN = b"convergent/contribution/v1\x00"


def public_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw public key as 64 hex characters."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def keygen(path: str | Path, overwrite: bool = False) -> str:
    """Write a new private key to ``path`` (0600) and its public key to ``path.pub``; returns the public hex."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise SignatureError(f"key file {path} already exists", "choose another file name; keys are never overwritten")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = public_hex(key)
    Path(str(path) + ".pub").write_text(pub + "\n")
    return pub


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Read a PEM Ed25519 private key written by :func:`keygen`."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SignatureError(
            f"cannot read key file {path}: {exc.strerror}", "create one with 'convergent keygen FILE'"
        ) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise SignatureError(
            f"{path} is not an unencrypted PEM private key", "create one with 'convergent keygen FILE'"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 key", "create one with 'convergent keygen FILE'")
    return key


def parse_public_key(text: str) -> str:
    """A public key given as 64 hex characters or as a path to a ``.pub`` file -> hex."""
    value = text.strip()
    if not HEX64.match(value.lower()) and Path(value).is_file():
        value = Path(value).read_text().strip()
    value = value.lower()
    if not HEX64.match(value):
        raise SignatureError(
            f"'{text}' is not a public key", "give the 64 hex characters of a .pub file written by 'convergent keygen'"
        )
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(value))
    except ValueError:
        raise SignatureError(f"'{text}' is not a valid Ed25519 public key") from None
    return value


def sign(contribution: Contribution, key: Ed25519PrivateKey) -> Contribution:
    """The contribution with ``signer`` set to ``key``'s public key and a signature over its id."""
    unsigned = contribution.model_copy(update={"signer": public_hex(key), "signature": None})
    sig = key.sign(_DOMAIN + bytes.fromhex(unsigned.id)).hex()
    return unsigned.model_copy(update={"signature": sig})


def verify(contribution: Contribution) -> None:
    """SignatureError unless the contribution is unsigned (no signer, no signature) or validly signed."""
    if contribution.signer is None and contribution.signature is None:
        return
    if contribution.signer is None or contribution.signature is None:
        raise SignatureError(f"contribution {contribution.id[:12]}… has a signer without a signature or vice versa")
    try:
        pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(contribution.signer))
        pub.verify(bytes.fromhex(contribution.signature), _DOMAIN + bytes.fromhex(contribution.id))
    except (InvalidSignature, ValueError):
        raise SignatureError(f"contribution {contribution.id[:12]}… has a signature that does not verify") from None


def check_policy(contribution: Contribution, genesis: Genesis) -> None:
    """Verify any signature, and enforce the set's ``require_signed``/``allowed_keys``."""
    verify(contribution)
    if genesis.require_signed:
        if contribution.signature is None:
            raise SignatureError(
                f"set '{genesis.name}' requires signed contributions; {contribution.id[:12]}… is unsigned",
                "sign with 'convergent add --key FILE' using an allowed key",
            )
        if contribution.signer not in genesis.allowed_keys:
            raise SignatureError(
                f"contribution {contribution.id[:12]}… is signed by {contribution.signer[:16]}…, "
                f"which set '{genesis.name}' does not allow",
                "use one of the set's allowed keys ('convergent status SET' lists them)",
            )
