"""The data of a merge set, as immutable pydantic models with canonical JSON.

* :class:`Manifest`: the tensors (name -> dtype, shape, blob digest) and
  non-tensor files of one checkpoint; id = hash of its canonical JSON.
* :class:`Genesis`: a set's immutable definition (strategy, parameters, base
  manifest, dtype, signature policy); set id = hash of its canonical JSON.
* :class:`Contribution`: a manifest added to one set with weight, per-model
  parameters and metadata, optionally signed; id = hash of its canonical JSON
  without the signature (the signer's public key is part of the id, and
  Ed25519 signatures are deterministic, so a valid record is fixed by its id).
* :class:`AddTag`: one add event of a contribution (an OR-Set tag). A
  tombstone is the add-tag it kills.
* :class:`SetState`: everything a replica knows about a set, the unit that
  replicas exchange and join. Lists are kept in canonical order.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from convergent.sets.canonical import HEX64, canonical_json, content_id, sha256_hex

#: Tensor dtypes a blob may hold (torch names without the ``torch.`` prefix).
DTYPES = (
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "float8_e4m3fn",
    "float8_e5m2",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
)  # keep in sync with convergent.store.blobs.ITEMSIZE
#: Output dtypes a genesis may ask for.
OUT_DTYPES = ("float32", "float16", "bfloat16")

_HEX = HEX64.pattern
_TAG = r"^[0-9a-f]{32}$"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def canonical(self) -> bytes:
        """Canonical JSON bytes (sorted keys, no whitespace)."""
        return canonical_json(self.model_dump(mode="json"))

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Any:
        """A copy; cached ids are dropped so a changed copy hashes afresh."""
        copied = super().model_copy(update=update, deep=deep)
        copied.__dict__.pop("id", None)
        return copied


def _check_json(value: Any, what: str) -> Any:
    try:
        canonical_json(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be plain JSON values (no NaN/Infinity): {exc}") from None
    return value


class TensorEntry(_Frozen):
    dtype: str
    shape: tuple[int, ...]
    blob: str = Field(pattern=_HEX)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in DTYPES:
            raise ValueError(f"unsupported dtype '{v}'")
        return v

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(d < 0 for d in v):
            raise ValueError("negative dimension")
        return v


class Manifest(_Frozen):
    """Tensors and files of one checkpoint, by content."""

    format: Literal["convergent-manifest/1"] = "convergent-manifest/1"
    tensors: dict[str, TensorEntry]
    #: Non-tensor files (config.json, tokenizer files) -> blob digest of a uint8 blob.
    files: dict[str, str] = Field(default_factory=dict)

    @field_validator("files")
    @classmethod
    def _files(cls, v: dict[str, str]) -> dict[str, str]:
        for name, digest in v.items():
            if not HEX64.match(digest):
                raise ValueError(f"file {name}: blob digest is not a sha256")
            if "/" in name or "\\" in name or name in ("", ".", "..") or name.startswith("."):
                raise ValueError(f"file name '{name}' is not a plain file name")
        return v

    @cached_property
    def id(self) -> str:
        return sha256_hex(self.canonical())

    def blobs(self) -> set[str]:
        """Every blob digest this manifest references."""
        return {t.blob for t in self.tensors.values()} | set(self.files.values())

    @property
    def nbytes(self) -> int:
        """Tensor payload bytes (without files)."""
        from convergent.store.blobs import dtype_itemsize

        total = 0
        for t in self.tensors.values():
            n = 1
            for d in t.shape:
                n *= d
            total += n * dtype_itemsize(t.dtype)
        return total


class Genesis(_Frozen):
    """The immutable definition of a merge set; its hash is the set id."""

    format: Literal["convergent-set/1"] = "convergent-set/1"
    name: str = Field(pattern=_NAME)
    strategy: str
    params: dict[str, Any] = Field(default_factory=dict)
    #: Manifest id of the base checkpoint (names, shapes, config files).
    base: str = Field(pattern=_HEX)
    #: Output dtype; None keeps each tensor's base dtype.
    dtype: str | None = None
    require_signed: bool = False
    #: Hex Ed25519 public keys allowed to sign contributions (sorted).
    allowed_keys: tuple[str, ...] = ()

    @field_validator("params")
    @classmethod
    def _params(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _check_json(v, "parameters")

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is not None and v not in OUT_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(OUT_DTYPES)}")
        return v

    @field_validator("allowed_keys")
    @classmethod
    def _keys(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for key in v:
            if not HEX64.match(key):
                raise ValueError(f"allowed key '{key}' is not 64 hex characters (a raw Ed25519 public key)")
        return tuple(sorted(set(v)))

    @model_validator(mode="after")
    def _signed(self) -> Genesis:
        if self.require_signed and not self.allowed_keys:
            raise ValueError("require_signed needs at least one allowed key")
        return self

    @cached_property
    def id(self) -> str:
        return sha256_hex(self.canonical())


class Contribution(_Frozen):
    """A manifest added to one set, with weight, parameters and metadata."""

    set: str = Field(pattern=_HEX)
    manifest: str = Field(pattern=_HEX)
    weight: float = 1.0
    params: dict[str, Any] = Field(default_factory=dict)
    meta: dict[str, Any] = Field(default_factory=dict)
    #: Hex Ed25519 public key of the signer (part of the id), or None.
    signer: str | None = Field(default=None, pattern=_HEX)
    #: Hex Ed25519 signature over the id (not part of the id).
    signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{128}$")

    @field_validator("params", "meta")
    @classmethod
    def _json(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _check_json(v, "parameters and metadata")

    @field_validator("weight")
    @classmethod
    def _weight(cls, v: float) -> float:
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError("weight must be finite")
        return v

    @classmethod
    def from_stored(cls, data: bytes | str) -> Contribution:
        """A record read back from this store's database (validated when it was stored): no re-validation."""
        import json

        return cls.model_construct(**json.loads(data if isinstance(data, str) else bytes(data).decode()))

    def body(self) -> dict[str, Any]:
        """The hashed part: everything but the signature."""
        return self.model_dump(mode="json", exclude={"signature"})

    @cached_property
    def id(self) -> str:
        return content_id(self.body())


class AddTag(_Frozen):
    """One add of a contribution; removes tombstone the tags they observed."""

    contribution: str = Field(pattern=_HEX)
    tag: str = Field(pattern=_TAG)

    def key(self) -> tuple[str, str]:
        return (self.contribution, self.tag)


class SetState(_Frozen):
    """Everything one replica knows about a set: the unit of exchange and join.

    ``contributions`` holds the record of every contribution an add-tag names
    (sorted by id); ``adds`` and ``removes`` are the OR-Set's add-tags and
    tombstones (sorted). Join = union of all three.
    """

    set_id: str = Field(pattern=_HEX)
    genesis: Genesis
    contributions: tuple[Contribution, ...] = ()
    adds: tuple[AddTag, ...] = ()
    removes: tuple[AddTag, ...] = ()

    @model_validator(mode="after")
    def _canonical_order(self) -> SetState:
        # Sort and dedupe so equal knowledge gives equal bytes.
        contribs = {c.id: c for c in self.contributions}
        object.__setattr__(self, "contributions", tuple(contribs[k] for k in sorted(contribs)))
        object.__setattr__(self, "adds", tuple(sorted(set(self.adds), key=AddTag.key)))
        object.__setattr__(self, "removes", tuple(sorted(set(self.removes), key=AddTag.key)))
        return self

    def live(self) -> list[str]:
        """Live contribution ids in canonical order."""
        from convergent.sets.orset import live

        return live(self.adds, self.removes)

    @property
    def root(self) -> str:
        from convergent.sets.merkle import merkle_root

        return merkle_root(self.set_id, self.live())

    def to_json(self) -> bytes:
        return self.canonical()

    @classmethod
    def from_json(cls, data: bytes | str) -> SetState:
        return cls.model_validate_json(data)
