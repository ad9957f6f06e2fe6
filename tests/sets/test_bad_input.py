"""Bad input is refused with a clear error, and the store is left exactly as it was."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from convergent.errors import IntegrityError, MergeInputError, RecipeError, SignatureError, StoreError
from convergent.sets import identity
from convergent.sets.bundle import export_bundle, import_bundle
from convergent.sets.model import AddTag, Contribution, SetState
from convergent.store import Store
from tests.sets.util import SHAPES, DictSource, base_source, finetune, store_snapshot

FTS = [finetune(k) for k in range(2)]


@pytest.fixture
def pair(tmp_path: Path):
    """Store a with a set of two contributions and its full bundle; store b holding an older state of it."""
    a = Store.open(tmp_path / "a")
    b = Store.open(tmp_path / "b")
    ma = a.create_set("s", "linear", base_source())
    ma.add(FTS[0])
    export_bundle(ma, tmp_path / "old.tar")
    import_bundle(b, tmp_path / "old.tar")
    ma.add(FTS[1], weight=2.0)
    export_bundle(ma, tmp_path / "full.tar")
    yield a, b, tmp_path
    a.close()
    b.close()


def rewrite(src: Path, dst: Path, edit: Callable[[str, bytes], bytes | None]) -> Path:
    """Copy a bundle, passing each member through ``edit`` (None drops it)."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            data = edit(m.name, tin.extractfile(m).read())  # type: ignore[union-attr]
            if data is None:
                continue
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    return dst


def edit_state(fn: Callable[[dict], None]) -> Callable[[str, bytes], bytes]:
    def edit(name: str, data: bytes) -> bytes:
        if name != "bundle.json":
            return data
        doc = json.loads(data)
        fn(doc["state"])
        return json.dumps(doc).encode()

    return edit


def assert_refused(store: Store, bundle: Path, exc: type[Exception], match: str | None = None) -> None:
    before = store_snapshot(store.path)
    with pytest.raises(exc, match=match):
        import_bundle(store, bundle)
    assert store_snapshot(store.path) == before
    assert not [p for p in store.tmp_dir.iterdir() if p.name.startswith("w-")]
    assert store.fsck().ok


def test_corrupt_blob_in_bundle(pair) -> None:
    _a, b, tmp = pair
    bad = tmp / "bad.tar"
    bad.write_bytes((tmp / "full.tar").read_bytes())
    with tarfile.open(bad) as t:
        member = [m for m in t.getmembers() if m.name.startswith("blobs/")][-1]
    raw = bytearray(bad.read_bytes())
    raw[member.offset_data + member.size - 1] ^= 0x01
    bad.write_bytes(bytes(raw))
    assert_refused(b, bad, IntegrityError, "does not match its hash")


def test_truncated_garbage_and_foreign_bundles(pair) -> None:
    _a, b, tmp = pair
    data = (tmp / "full.tar").read_bytes()
    (tmp / "cut.tar").write_bytes(data[: len(data) // 2])
    assert_refused(b, tmp / "cut.tar", IntegrityError)
    (tmp / "junk.tar").write_bytes(b"not a tar at all" * 100)
    assert_refused(b, tmp / "junk.tar", IntegrityError)
    evil = rewrite(tmp / "full.tar", tmp / "evil.tar", lambda n, d: d)  # a copy, plus a traversal member below
    with tarfile.open(evil, "a") as t:
        info = tarfile.TarInfo("../../evil")
        info.size = 1
        t.addfile(info, io.BytesIO(b"x"))
    assert_refused(b, evil, IntegrityError, "unexpected bundle member")
    assert not (tmp / "evil").exists()
    dropped = rewrite(tmp / "full.tar", tmp / "dropped.tar", lambda n, d: None if n.startswith("blobs/") else d)
    assert_refused(b, dropped, IntegrityError, "does not contain")


def test_altered_manifest(pair) -> None:
    _a, b, tmp = pair

    def edit(name: str, data: bytes) -> bytes:
        return data.replace(b'"float32"', b'"float16"') if name.startswith("manifests/") else data

    assert_refused(b, rewrite(tmp / "full.tar", tmp / "m.tar", edit), IntegrityError, "manifest")


def test_forged_contribution_and_genesis(pair) -> None:
    _a, b, tmp = pair

    def weight(state: dict) -> None:
        for c in state["contributions"]:
            c["weight"] = 100.0

    assert_refused(b, rewrite(tmp / "full.tar", tmp / "w.tar", edit_state(weight)), IntegrityError, "does not carry")

    def strategy(state: dict) -> None:
        state["genesis"]["strategy"] = "ties"

    assert_refused(
        b, rewrite(tmp / "full.tar", tmp / "g.tar", edit_state(strategy)), IntegrityError, "genesis does not hash"
    )


def test_signed_sets_refuse_unsigned_and_foreign_signatures(tmp_path: Path) -> None:
    good = identity.Ed25519PrivateKey.generate()
    other = identity.Ed25519PrivateKey.generate()
    with Store.open(tmp_path / "a") as a, Store.open(tmp_path / "b") as b:
        ma = a.create_set(
            "signed", "linear", base_source(), require_signed=True, allowed_keys=[identity.public_hex(good)]
        )
        with pytest.raises(SignatureError, match="requires"):
            ma.add(FTS[0])
        with pytest.raises(SignatureError):
            ma.add(FTS[0], key=other)
        cid = ma.add(FTS[0], key=good)
        assert ma.contribution(cid).signer == identity.public_hex(good)
        export_bundle(ma, tmp_path / "ok.tar")

        def strip(state: dict) -> None:
            state["contributions"][0]["signature"] = None

        assert_refused(b, rewrite(tmp_path / "ok.tar", tmp_path / "u.tar", edit_state(strip)), SignatureError)

        def resign(state: dict) -> None:
            c = Contribution.model_validate(state["contributions"][0])
            state["contributions"][0]["signature"] = identity.sign(c, other).signature

        assert_refused(b, rewrite(tmp_path / "ok.tar", tmp_path / "r.tar", edit_state(resign)), SignatureError)
        import_bundle(b, tmp_path / "ok.tar")
        mb = b.get_set("signed")
        # join of a state carrying an unsigned contribution (its data present): refused, nothing kept
        unsigned = Contribution(set=ma.id, manifest=ma.contribution(cid).manifest, weight=3.0)
        forged = SetState(
            set_id=ma.id,
            genesis=ma.genesis,
            contributions=(unsigned,),
            adds=(AddTag(contribution=unsigned.id, tag="f" * 32),),
        )
        before = store_snapshot(b.path)
        with pytest.raises(SignatureError, match="unsigned"):
            mb.join(forged)
        assert store_snapshot(b.path) == before


def test_join_needs_the_data(pair) -> None:
    a, b, _tmp = pair
    mb = b.get_set("s")
    state = a.get_set("s").state()
    before = store_snapshot(b.path)
    with pytest.raises(StoreError, match="not in the store"):
        mb.join(state)
    assert store_snapshot(b.path) == before
    manifests, _ = mb.missing(state)
    assert len(manifests) == 1
    with pytest.raises(IntegrityError):
        b.put_manifest_bytes(a.get_manifest_bytes(manifests[0]) + b" ")
    with pytest.raises(IntegrityError):
        b.put_manifest_bytes(a.get_manifest_bytes(manifests[0]), expected_id="0" * 64)
    with pytest.raises(StoreError):
        mb.join(state.model_copy(update={"set_id": "0" * 64}))


def test_checkpoint_that_does_not_fit_the_base(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s") as store:
        mset = store.create_set("s", "linear", base_source())
        before = store_snapshot(store.path)
        tensors = dict(finetune(0).tensors)
        tensors.pop("model.norm.weight")
        tensors["model.extra.weight"] = torch.zeros(2)
        tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(4, 8)
        with pytest.raises(MergeInputError) as info:
            mset.add(DictSource(tensors, label="odd"))
        msg = str(info.value)
        for name in ("model.norm.weight", "model.extra.weight", "model.layers.0.mlp.up_proj.weight", "[4, 8]"):
            assert name in msg
        assert store_snapshot(store.path) == before
        with pytest.raises(RecipeError, match="unknown model parameter"):
            mset.add(finetune(0), params={"densty": 0.5})
        with pytest.raises(RecipeError, match="did you mean"):
            store.create_set("t", "linear", base_source(), params={"normalise": True})
        with pytest.raises(RecipeError, match="unknown merge method"):
            store.create_set("t", "lienar", base_source())


def test_unknown_names_and_empty_sets(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s") as store:
        with pytest.raises(StoreError, match="no merge set 'nope'"):
            store.get_set("nope")
        mset = store.create_set("s", "linear", base_source())
        with pytest.raises(StoreError, match=r"did you mean 's'|sets here"):
            store.get_set("ss")
        with pytest.raises(StoreError, match="no live contributions"):
            mset.resolve(tmp_path / "out")
        assert not (tmp_path / "out").exists()
        with pytest.raises(StoreError, match="no contribution"):
            mset.remove("abcdef")
        cid = mset.add(finetune(0))
        mset.remove(cid[:10])
        with pytest.raises(StoreError, match="already removed"):
            mset.remove(cid)
        with pytest.raises(StoreError, match="no live contributions"):
            mset.resolve(tmp_path / "out")
        with pytest.raises(StoreError, match="different set named"):
            store.create_set("s", "ties", base_source())
        assert store.get_set(mset.id[:8]).id == mset.id
        with pytest.raises(StoreError, match="not in the history"):
            export_bundle(mset, tmp_path / "x.tar", since="0" * 64)


def test_fsck_finds_corruption(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s") as store:
        mset = store.create_set("s", "linear", base_source())
        mset.add(finetune(0))
        assert store.fsck().ok
        manifest = store.get_manifest(mset.contribution(mset.live()[0]).manifest)
        digest = manifest.tensors[sorted(SHAPES)[1]].blob
        path = store.blobs.path(digest)
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0xFF
        path.write_bytes(bytes(raw))
        report = store.fsck()
        assert not report.ok
        assert any(digest in e for e in report.errors)
        path.unlink()
        assert any("missing" in e for e in store.fsck().errors)
