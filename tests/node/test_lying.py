"""Lying peers, as real nodes over tampered stores: wrong blob bytes, an altered manifest, an
unsigned or forged contribution in a signed set. Each is refused in both directions (pulling
from the liar, the liar pushing), nothing it sent is joined, and honest nodes are unaffected."""

from __future__ import annotations

import hashlib

import pytest

from convergent.node.client import PeerClient
from convergent.node.sync import sync_set
from convergent.sets.identity import keygen, load_private_key, sign
from convergent.sets.model import Contribution
from convergent.store import Store
from convergent.store.store import open_source
from tests.node.conftest import TOKEN, make_checkpoint

pytestmark = pytest.mark.slow


def _snapshot(store: Store, set_name: str) -> tuple[str, bytes, list[str]]:
    mset = store.get_set(set_name)
    return mset.root, mset.state().to_json(), sorted(store.blobs)


def _inject(store: Store, set_name: str, checkpoint, contribution_for) -> str:
    """Put a contribution into ``store`` behind the store's back (no policy checks): a liar's store."""
    mset = store.get_set(set_name)
    source, _ = open_source(checkpoint)
    manifest = store.ingest_blobs(source)
    contrib = contribution_for(mset.id, manifest.id)
    with store.db.write() as c:
        store._insert_manifest(c, manifest)
        c.execute(
            "INSERT INTO contributions(id, set_id, manifest_id, body) VALUES (?, ?, ?, ?)",
            (contrib.id, mset.id, manifest.id, contrib.canonical()),
        )
        c.execute(
            "INSERT INTO tags(set_id, contribution_id, tag, seq) VALUES (?, ?, ?, 0)",
            (mset.id, contrib.id, hashlib.sha256(contrib.id.encode()).hexdigest()[:32]),
        )
    return contrib.id


def test_lying_peers_are_refused_and_honest_nodes_unaffected(cluster, tmp_path):
    base = make_checkpoint(tmp_path / "base.safetensors", 0)
    allowed = keygen(tmp_path / "allowed.key")
    keygen(tmp_path / "other.key")
    stores = {}
    for name in ("honest", "honest2", "liar"):
        store = Store.open(tmp_path / name)
        if name != "honest2":  # honest2 starts empty and learns both sets from a push
            store.create_set("plain", strategy="linear", base=base)
            store.create_set("signed", strategy="linear", base=base, require_signed=True, allowed_keys=[allowed])
        stores[name] = store
    honest, honest2, liar = stores["honest"], stores["honest2"], stores["liar"]
    honest.get_set("plain").add(make_checkpoint(tmp_path / "h.safetensors", 5))
    honest.get_set("signed").add(make_checkpoint(tmp_path / "hs.safetensors", 6), key=tmp_path / "allowed.key")
    cid = liar.get_set("plain").add(make_checkpoint(tmp_path / "l.safetensors", 7))
    manifest_id = liar.get_set("plain").contribution(cid).manifest
    victim_blob = sorted(liar.get_manifest(manifest_id).blobs())[-1]

    h_node = cluster.node(tmp_path / "honest")
    h2_node = cluster.node(tmp_path / "honest2")
    l_node = cluster.node(tmp_path / "liar")
    cluster.wait_all()
    before = _snapshot(honest, "plain")

    def assert_untouched():
        assert _snapshot(honest, "plain")[:2] == before[:2]
        assert not list(honest.tmp_dir.glob("*.part"))
        assert not honest.has_manifest(manifest_id)

    # 1. Wrong bytes: the liar's blob file is corrupted in place (same length).
    path = liar.blobs.path(victim_blob)
    good = path.read_bytes()
    path.write_bytes(good[:-8] + bytes(8 - i for i in range(8)))
    pulled = sync_set(honest, "plain", l_node.url, TOKEN)
    assert pulled.refused and "does not match" in pulled.refused, pulled
    assert not honest.blobs.has(victim_blob)
    assert_untouched()
    pushed = sync_set(liar, "plain", h_node.url, TOKEN)  # the liar uploads its bad bytes
    assert not pushed.ok and "422" in (pushed.error or ""), pushed
    assert not honest.blobs.has(victim_blob)
    assert_untouched()
    path.write_bytes(good)

    # 2. Altered manifest: same id, different body (a tensor now points at another blob).
    body = liar.get_manifest_bytes(manifest_id)
    forged = body.replace(victim_blob.encode(), ("0" * 64).encode())
    assert forged != body
    with liar.db.write() as c:
        c.execute("UPDATE manifests SET body=? WHERE id=?", (forged, manifest_id))
    pulled = sync_set(honest, "plain", l_node.url, TOKEN)
    assert pulled.refused and "does not match" in pulled.refused, pulled
    assert_untouched()
    pushed = sync_set(liar, "plain", h_node.url, TOKEN)
    assert not pushed.ok, pushed
    with PeerClient(h_node.url, TOKEN) as client:  # uploading the altered manifest itself: 422
        r = client.request("PUT", f"/manifests/{manifest_id}", content=forged, ok=(422,))
        assert "hash" in r.json()["error"]
    assert_untouched()
    with liar.db.write() as c:
        c.execute("UPDATE manifests SET body=? WHERE id=?", (body, manifest_id))

    # 3. Unsigned, then forged-signature, then wrong-key contributions in a signed set.
    signed_before = _snapshot(honest, "signed")
    other_key = load_private_key(tmp_path / "other.key")
    cases = {
        "unsigned": lambda sid, mid: Contribution(set=sid, manifest=mid),
        "forged": lambda sid, mid: Contribution(set=sid, manifest=mid, signer=allowed, signature="ab" * 64),
        "wrong key": lambda sid, mid: sign(Contribution(set=sid, manifest=mid), other_key),
    }
    for i, (what, make) in enumerate(cases.items()):
        bad = _inject(liar, "signed", make_checkpoint(tmp_path / f"bad{i}.safetensors", 20 + i), make)
        pulled = sync_set(honest, "signed", l_node.url, TOKEN)
        assert pulled.refused and "sign" in pulled.refused, (what, pulled)
        pushed = sync_set(liar, "signed", h_node.url, TOKEN)
        assert not pushed.ok, (what, pushed)
        with PeerClient(h_node.url, TOKEN) as client:  # posting the state directly: 422 as well
            r = client.request(
                "POST",
                f"/sets/{liar.get_set('signed').id}/state",
                content=liar.get_set("signed").state().to_json(),
                ok=(422,),
            )
            assert "sign" in r.json()["error"]
        assert _snapshot(honest, "signed")[:2] == signed_before[:2]
        assert bad not in honest.get_set("signed").live()
        with liar.db.write() as c:  # the liar drops it again before trying the next lie
            c.execute("DELETE FROM tags WHERE contribution_id=?", (bad,))
            c.execute("DELETE FROM contributions WHERE id=?", (bad,))
    assert "refused" in h_node.log.read_text()  # refusals are logged by the node

    # Honest nodes are unaffected: they sync with each other (honest2 learns both sets from the
    # pushes), a fresh store pulls a set it never had by name, and the liar syncs once it behaves.
    assert honest2.list_sets() == []
    for name in ("plain", "signed"):
        r = sync_set(honest, name, h2_node.url, TOKEN)
        assert r.ok and r.in_sync and r.joined_remote, r
        assert honest2.get_set(name).root == honest.get_set(name).root
    with Store.open(tmp_path / "fresh") as fresh:
        r = sync_set(fresh, "signed", h2_node.url, None)
        assert r.ok and r.in_sync, r
        assert fresh.get_set("signed").root == honest.get_set("signed").root
        assert fresh.fsck().ok
    ok = sync_set(honest, "plain", l_node.url, TOKEN)
    assert ok.ok and ok.in_sync and cid in honest.get_set("plain").live(), ok
    assert honest.get_set("plain").root == liar.get_set("plain").root
    for store in (honest, honest2):
        report = store.fsck()
        assert report.ok, report.errors
    for store in stores.values():
        store.close()
