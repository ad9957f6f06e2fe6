"""Ids are hashes of canonical JSON; signatures bind signer and content."""

from __future__ import annotations

import json

import pytest

from convergent.errors import SignatureError
from convergent.sets import identity
from convergent.sets.canonical import canonical_json, content_id
from convergent.sets.model import AddTag, Contribution, Genesis, SetState

SET = "ab" * 32
MAN = "cd" * 32


def test_canonical_json_is_sorted_and_compact() -> None:
    assert canonical_json({"b": 1, "a": [1, 2.5, "x"]}) == b'{"a":[1,2.5,"x"],"b":1}'
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_contribution_id_covers_weight_params_meta_signer_not_signature() -> None:
    c = Contribution(set=SET, manifest=MAN, weight=1.0, params={"density": 0.5}, meta={"who": "a"})
    assert c.id == content_id(c.body())
    assert c.model_copy(update={"weight": 2.0}).id != c.id
    assert c.model_copy(update={"params": {}}).id != c.id
    assert c.model_copy(update={"meta": {}}).id != c.id
    key = identity.Ed25519PrivateKey.generate()
    signed = identity.sign(c, key)
    assert signed.id != c.id  # the signer is part of the id
    identity.verify(signed)
    assert signed.model_copy(update={"signature": None}).id == signed.id
    # Ed25519 is deterministic: signing again gives the same record.
    assert identity.sign(c, key) == signed


def test_forged_signatures_are_refused() -> None:
    c = Contribution(set=SET, manifest=MAN)
    k1, k2 = identity.Ed25519PrivateKey.generate(), identity.Ed25519PrivateKey.generate()
    signed = identity.sign(c, k1)
    with pytest.raises(SignatureError):
        identity.verify(signed.model_copy(update={"signer": identity.public_hex(k2)}))
    with pytest.raises(SignatureError):
        identity.verify(signed.model_copy(update={"weight": 3.0}))
    with pytest.raises(SignatureError):
        identity.verify(c.model_copy(update={"signature": signed.signature}))
    g = Genesis(name="s", strategy="linear", base=MAN, require_signed=True, allowed_keys=(identity.public_hex(k2),))
    with pytest.raises(SignatureError, match="does not allow"):
        identity.check_policy(signed, g)
    with pytest.raises(SignatureError, match="unsigned"):
        identity.check_policy(c, g)


def test_keyfiles_roundtrip(tmp_path) -> None:
    pub = identity.keygen(tmp_path / "k")
    assert identity.parse_public_key(str(tmp_path / "k.pub")) == pub
    assert identity.parse_public_key(pub.upper()) == pub
    assert identity.public_hex(identity.load_private_key(tmp_path / "k")) == pub
    assert (tmp_path / "k").stat().st_mode & 0o077 == 0
    with pytest.raises(SignatureError):
        identity.keygen(tmp_path / "k")
    with pytest.raises(SignatureError):
        identity.parse_public_key("zz")


def test_state_is_canonical_whatever_the_input_order() -> None:
    g = Genesis(name="s", strategy="linear", base=MAN)
    c1 = Contribution(set=g.id, manifest=MAN, weight=1.0)
    c2 = Contribution(set=g.id, manifest=MAN, weight=2.0)
    t1, t2 = AddTag(contribution=c1.id, tag="1" * 32), AddTag(contribution=c2.id, tag="2" * 32)
    a = SetState(set_id=g.id, genesis=g, contributions=(c1, c2), adds=(t1, t2, t1))
    b = SetState(set_id=g.id, genesis=g, contributions=(c2, c1, c2), adds=(t2, t1))
    assert a.to_json() == b.to_json()
    assert SetState.from_json(a.to_json()) == a
    assert json.loads(a.to_json())["adds"][0]["tag"] in ("1" * 32, "2" * 32)
    assert a.live() == sorted([c1.id, c2.id])


def test_genesis_validation() -> None:
    with pytest.raises(ValueError):
        Genesis(name="bad name!", strategy="linear", base=MAN)
    with pytest.raises(ValueError):
        Genesis(name="s", strategy="linear", base=MAN, require_signed=True)
    with pytest.raises(ValueError):
        Genesis(name="s", strategy="linear", base=MAN, dtype="int8")
    g = Genesis(name="s", strategy="linear", base=MAN, allowed_keys=("b" * 64, "a" * 64, "a" * 64))
    assert g.allowed_keys == ("a" * 64, "b" * 64)
