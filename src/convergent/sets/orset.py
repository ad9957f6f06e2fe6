"""The Observed-Remove Set, as pure functions on add-tags and tombstones.

A replica's knowledge is a pair (adds, removes) of sets of (contribution id,
tag). A contribution is live when one of its add-tags is not tombstoned.

* add: a fresh, globally unique tag for the contribution;
* remove: tombstone every tag of the contribution this replica has observed,
  so a concurrent re-add elsewhere (a tag not observed here) survives;
* join: union of adds and union of removes, hence commutative, associative
  and idempotent by construction (the laws are property-tested).

The SQLite store implements exactly these semantics with INSERT OR IGNORE;
this module is the reference they are tested against.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

Tag = tuple[str, str]  # (contribution id, tag)


class _TagLike(Protocol):
    contribution: str
    tag: str


def _key(item: Tag | _TagLike) -> Tag:
    return item if isinstance(item, tuple) else (item.contribution, item.tag)


def new_tag() -> str:
    """A fresh add-tag: 128 random bits, hex."""
    return secrets.token_hex(16)


def live(adds: Iterable[Tag | _TagLike], removes: Iterable[Tag | _TagLike]) -> list[str]:
    """Live contribution ids, sorted (canonical order)."""
    dead = {_key(r) for r in removes}
    return sorted({k[0] for k in map(_key, adds) if k not in dead})


@dataclass(frozen=True)
class ORSet:
    """An immutable OR-Set state; every operation returns a new state."""

    adds: frozenset[Tag] = field(default_factory=frozenset)
    removes: frozenset[Tag] = field(default_factory=frozenset)

    def add(self, contribution: str, tag: str | None = None) -> ORSet:
        return ORSet(self.adds | {(contribution, tag or new_tag())}, self.removes)

    def remove(self, contribution: str) -> ORSet:
        """Tombstone the observed tags of ``contribution`` (no-op if none)."""
        observed = {t for t in self.adds if t[0] == contribution}
        return ORSet(self.adds, self.removes | observed)

    def join(self, other: ORSet) -> ORSet:
        return join(self, other)

    def live(self) -> list[str]:
        return live(self.adds, self.removes)

    def __contains__(self, contribution: object) -> bool:
        return contribution in self.live()


def join(a: ORSet, b: ORSet) -> ORSet:
    """The least upper bound of two states: union of adds, union of removes."""
    return ORSet(a.adds | b.adds, a.removes | b.removes)
