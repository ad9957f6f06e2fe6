"""The node's HTTP API against a real server process: reads, Range, tokens, malformed input."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convergent.store import Store
from tests.node.conftest import READ_TOKEN, TOKEN, Cluster, make_checkpoint

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with (size, mtime_ns), except the SQLite WAL side files and node logs."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            if f.endswith(("-wal", "-shm", ".log")):
                continue
            p = Path(dirpath) / f
            st_ = p.stat()
            out[str(p.relative_to(root))] = (st_.st_size, st_.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    # A decoy tree next to the store: nothing may ever touch it.
    (tmp / "outside").mkdir()
    (tmp / "outside" / "secret.txt").write_text("do not touch\n")
    store_dir = tmp / "store"
    store = Store.open(store_dir)
    base = make_checkpoint(tmp / "base.safetensors", 0)
    mset = store.create_set("api", strategy="linear", base=base)
    cid = mset.add(make_checkpoint(tmp / "ft.safetensors", 1))
    cluster = Cluster(tmp)
    node = cluster.node(store_dir)
    ro = cluster.node(store_dir, token=False, read_token=True)
    try:
        cluster.wait_all()
        with httpx.Client(base_url=node.url, headers=AUTH, timeout=10) as client:
            yield {"tmp": tmp, "store": store, "set": mset, "cid": cid, "node": node, "ro": ro, "client": client}
    finally:
        cluster.shutdown()
        store.close()
    cluster.assert_no_crash()


def test_reads_are_content_addressed(env):
    node, mset, store = env["node"], env["set"], env["store"]
    h = node.get("/v1/health").json()
    assert h["ok"] is True
    sets = node.get("/v1/sets").json()
    assert [s["id"] for s in sets] == [mset.id]
    genesis = node.get(f"/v1/sets/{mset.id}/genesis").content
    assert hashlib.sha256(genesis).hexdigest() == mset.id
    root = node.get(f"/v1/sets/{mset.id}/root").json()
    assert root["root"] == mset.root and root["live"] == 1
    state = node.get(f"/v1/sets/{mset.id}/state").content
    assert hashlib.sha256(state).hexdigest() == root["state_digest"]
    for mid in [mset.genesis.base, mset.contribution(env["cid"]).manifest]:
        body = node.get(f"/v1/manifests/{mid}").content
        assert hashlib.sha256(body).hexdigest() == mid
    assert node.get(f"/v1/sets/{'0' * 64}/root").status_code == 404
    assert node.get(f"/v1/manifests/{'0' * 64}").status_code == 404
    assert node.get(f"/v1/blobs/{'0' * 64}").status_code == 404
    missing = httpx.post(
        node.url + "/v1/missing", json={"manifests": [mset.genesis.base, "1" * 64], "blobs": ["2" * 64]}
    ).json()
    assert missing == {"manifests": ["1" * 64], "blobs": ["2" * 64]}
    del store


def test_blob_range_requests(env):
    node, store = env["node"], env["store"]
    digest = sorted(store.get_manifest(env["set"].genesis.base).blobs())[0]
    data = store.blobs.path(digest).read_bytes()
    n = len(data)
    full = node.get(f"/v1/blobs/{digest}")
    assert full.status_code == 200 and full.content == data and full.headers["accept-ranges"] == "bytes"
    part = node.get(f"/v1/blobs/{digest}", headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == data[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{n}"
    tail = node.get(f"/v1/blobs/{digest}", headers={"Range": "bytes=-7"})
    assert tail.status_code == 206 and tail.content == data[-7:]
    rest = node.get(f"/v1/blobs/{digest}", headers={"Range": f"bytes={n - 3}-"})
    assert rest.content == data[-3:]
    clipped = node.get(f"/v1/blobs/{digest}", headers={"Range": f"bytes=5-{n + 100}"})
    assert clipped.status_code == 206 and clipped.content == data[5:]
    bad = node.get(f"/v1/blobs/{digest}", headers={"Range": f"bytes={n}-"})
    assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{n}"
    for junk in ["bytes=abc", "items=0-1", "bytes=1-2,4-5", "bytes=-"]:
        r = node.get(f"/v1/blobs/{digest}", headers={"Range": junk})
        assert r.status_code == 200 and r.content == data  # unusable ranges are ignored
    head = httpx.head(node.url + f"/v1/blobs/{digest}")
    assert head.status_code == 200 and int(head.headers["content-length"]) == n


def test_no_token_no_write(env):
    node, ro, mset, store = env["node"], env["ro"], env["set"], env["store"]
    state = node.get(f"/v1/sets/{mset.id}/state").content
    body = node.get(f"/v1/manifests/{mset.genesis.base}").content
    before = _tree(env["tmp"])
    for headers, code in [
        ({}, 401),
        ({"Authorization": "Bearer wrong-token-wrong-token"}, 403),
        ({"Authorization": "Basic abc"}, 401),
    ]:
        assert httpx.post(node.url + f"/v1/sets/{mset.id}/state", content=state, headers=headers).status_code == code
        assert (
            httpx.put(node.url + f"/v1/manifests/{mset.genesis.base}", content=body, headers=headers).status_code
            == code
        )
        r = httpx.put(node.url + f"/v1/blobs/{'a' * 64}", params={"size": 3}, content=b"abc", headers=headers)
        assert r.status_code == code
        assert httpx.get(node.url + f"/v1/uploads/{'a' * 64}", headers=headers).status_code == code
        assert httpx.post(node.url + "/v1/admin/partition", json={"refuse": []}, headers=headers).status_code == code
    # A node started without a write token accepts no writes at all, even with a token.
    r = httpx.post(ro.url + f"/v1/sets/{mset.id}/state", content=state, headers=AUTH)
    assert r.status_code == 403
    assert _tree(env["tmp"]) == before
    del store


def test_read_token(env):
    ro, mset = env["ro"], env["set"]
    assert ro.get("/v1/health").status_code == 200
    assert ro.get("/v1/sets").status_code == 401
    assert ro.get(f"/v1/sets/{mset.id}/state").status_code == 401
    assert ro.get("/v1/sets", headers={"Authorization": "Bearer nope-nope-nope-nope"}).status_code == 401
    ok = ro.get("/v1/sets", headers={"Authorization": f"Bearer {READ_TOKEN}"})
    assert ok.status_code == 200 and ok.json()[0]["id"] == mset.id


BAD_PATHS = [
    "/v1/blobs/..%2F..%2Foutside%2Fsecret.txt",
    "/v1/blobs/%2e%2e%2f%2e%2e%2foutside%2fsecret.txt",
    "/v1/blobs/" + "../" * 10 + "etc/passwd",
    "/v1/blobs/" + "A" * 64,
    "/v1/blobs/" + "g" * 64,
    "/v1/blobs/" + "a" * 63,
    "/v1/blobs/" + "a" * 65,
    "/v1/blobs/" + "a" * 62 + "%00a",
    "/v1/blobs/" + "a" * 10000,
    "/v1/manifests/..%2Fstore.db",
    "/v1/manifests/%00",
    "/v1/sets/..%2F..%2F/state",
    "/v1/sets/" + "Z" * 64 + "/root",
    "/v1/sets/%ff%fe/genesis",
    "/v1/uploads/..%2F..%2Foutside%2Fsecret.txt",
    "/v1/nothing/here",
    "/v1/",
    "//etc/passwd",
]


def test_malformed_paths_never_500_and_touch_nothing(env):
    node = env["node"]
    before = _tree(env["tmp"])
    with httpx.Client(base_url=node.url, headers=AUTH, timeout=10) as c:
        for path in BAD_PATHS:
            for method in ("GET", "PUT", "POST", "HEAD", "DELETE"):
                r = c.request(method, path, content=b"abc", params={"size": 3})
                assert 400 <= r.status_code < 500, (method, path, r.status_code, r.text)
    assert _tree(env["tmp"]) == before
    assert (env["tmp"] / "outside" / "secret.txt").read_text() == "do not touch\n"


def test_malformed_bodies_never_500_and_keep_nothing(env):
    node, mset, store = env["node"], env["set"], env["store"]
    state = json.loads(node.get(f"/v1/sets/{mset.id}/state").content)
    before = _tree(env["tmp"])
    url = f"/v1/sets/{mset.id}/state"
    other = "ab" * 32
    wrong_weight = json.loads(json.dumps(state))
    wrong_weight["contributions"][0]["weight"] = 5.0  # forged record: its id no longer matches the add-tag
    wrong_set = dict(state, set_id=other)
    bad_genesis = json.loads(json.dumps(state))
    bad_genesis["genesis"]["strategy"] = "ties"  # genesis no longer hashes to the set id
    bodies = [
        b"",
        b"null",
        b"[]",
        b"{}",
        b"not json",
        b"\xff\xfe\x00",
        b"[" * 50000,
        b'{"set_id": 1}',
        json.dumps(wrong_set).encode(),
        json.dumps(wrong_weight).encode(),
        json.dumps(bad_genesis).encode(),
        json.dumps(dict(state, adds=[{"contribution": "c" * 64, "tag": "0" * 32}])).encode(),
        json.dumps(dict(state, extra=1)).encode(),
        b'{"set_id": NaN}',
    ]
    with httpx.Client(base_url=node.url, headers=AUTH, timeout=10) as c:
        for body in bodies:
            r = c.post(url, content=body)
            assert 400 <= r.status_code < 500, (body[:80], r.status_code, r.text)
        assert c.post(f"/v1/sets/{other}/state", content=json.dumps(state).encode()).status_code in (400, 422)
        # Manifests: wrong hash, not canonical, not a manifest.
        good = c.get(f"/v1/manifests/{mset.genesis.base}").content
        assert c.put(f"/v1/manifests/{'0' * 64}", content=good).status_code == 422
        pretty = json.dumps(json.loads(good), indent=1).encode()
        assert c.put(f"/v1/manifests/{hashlib.sha256(pretty).hexdigest()}", content=pretty).status_code == 422
        junk = b'{"hello": "world"}'
        assert c.put(f"/v1/manifests/{hashlib.sha256(junk).hexdigest()}", content=junk).status_code == 422
        # /missing: wrong shapes and ids.
        for body in [b"[]", b'{"manifests": 3}', b'{"blobs": ["../x"]}', b"{", b'{"manifests": [null]}']:
            assert 400 <= c.post("/v1/missing", content=body).status_code < 500
        # Blob uploads: bad parameters, too many bytes, wrong bytes.
        d = "e" * 64
        for params in [
            {},
            {"size": -1},
            {"size": "x"},
            {"size": 3, "offset": 5},
            {"size": 3, "offset": -1},
            {"size": 10**30},
        ]:
            assert 400 <= c.put(f"/v1/blobs/{d}", params=params, content=b"abc").status_code < 500
        assert c.put(f"/v1/blobs/{d}", params={"size": 2}, content=b"abc").status_code == 400
        r = c.put(f"/v1/blobs/{d}", params={"size": 3}, content=b"abc")
        assert r.status_code == 422  # not the bytes of that digest: refused, nothing kept
        assert c.get(f"/v1/uploads/{d}").json() == {"offset": 0, "complete": False}
        assert c.post("/v1/admin/partition", content=b"[1,2]").status_code == 400
    assert not store.blobs.has(d)
    assert _tree(env["tmp"]) == before
    assert store.get_set(mset.id).root == mset.root


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    segment=st.text(st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=80),
    body=st.binary(max_size=300),
    endpoint=st.sampled_from(["sets/{}/state", "manifests/{}", "blobs/{}", "sets/{}/root", "uploads/{}", "missing"]),
    method=st.sampled_from(["GET", "PUT", "POST"]),
)
def test_fuzzed_requests_never_500(env, segment, body, endpoint, method):
    path = "/v1/" + endpoint.format(quote(segment, safe="") or "x")
    r = env["client"].request(method, path, content=body, params={"size": len(body)})
    assert r.status_code < 500, (method, path, r.status_code, r.text)


def test_resumable_upload_and_download(env, tmp_path):
    from convergent.node.client import PeerClient
    from convergent.store.blobs import blob_header

    node, store, c = env["node"], env["store"], env["client"]
    blob = blob_header("float32", (64,)) + bytes(range(256))
    digest = hashlib.sha256(blob).hexdigest()
    half = len(blob) // 2
    r = c.put(f"/v1/blobs/{digest}", params={"offset": 0, "size": len(blob)}, content=blob[:half])
    assert r.status_code == 202 and r.json()["offset"] == half
    assert c.get(f"/v1/uploads/{digest}").json() == {"offset": half, "complete": False}
    r = c.put(f"/v1/blobs/{digest}", params={"offset": 0, "size": len(blob)}, content=blob)
    assert r.status_code == 409 and r.json()["offset"] == half  # must resume where it stopped
    r = c.put(f"/v1/blobs/{digest}", params={"offset": half, "size": len(blob)}, content=blob[half:])
    assert r.status_code == 201 and r.json()["complete"]
    assert c.get(f"/v1/uploads/{digest}").json()["complete"] is True
    assert not store.blobs.has(digest)  # staged: it enters the store only with a state that needs it
    (store.tmp_dir / "node-staging" / f"b-{digest}.blob").unlink()

    # Download resumes from what a partial file already holds (Range), and hashes the whole.
    existing = sorted(store.get_manifest(env["set"].genesis.base).blobs())[-1]
    data = store.blobs.path(existing).read_bytes()
    part = tmp_path / "dl.part"
    part.write_bytes(data[:100])
    with PeerClient(node.url) as client:
        got = client.download_blob(existing, part, len(data))
        assert got == existing and part.read_bytes() == data
        assert client.traffic.blob_bytes_received == len(data) - 100
        part.write_bytes(data[:50] + b"x" * 50)  # a corrupt partial file: the hash tells
        assert client.download_blob(existing, part, len(data)) != existing
