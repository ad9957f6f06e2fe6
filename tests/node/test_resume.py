"""SIGKILL a node while it receives a large blob; restart it: it resumes with Range (does not
start over), converges, never shows a partial blob, and fsck is clean."""

from __future__ import annotations

import signal
import time

import pytest

from convergent.store import Store
from tests.node.conftest import make_checkpoint, root_of, wait_until

pytestmark = pytest.mark.slow

BIG = {"big.weight": (2048, 4096)}  # float32: 32 MiB
RATE = 24_000_000  # bytes/s the source serves blobs at (test-only throttle)


def test_sigkill_while_receiving_resumes_and_converges(cluster, tmp_path):
    base = make_checkpoint(tmp_path / "base.safetensors", 0, BIG)
    src = Store.open(tmp_path / "src")
    mset = src.create_set("big", strategy="linear", base=base)
    cid = mset.add(make_checkpoint(tmp_path / "ft.safetensors", 1, BIG))
    digest = next(iter(src.get_manifest(mset.contribution(cid).manifest).blobs()))
    size = src.blobs.size(digest)
    dst = Store.open(tmp_path / "dst")
    dst.create_set("big", strategy="linear", base=base)  # same genesis: same set id, base already here
    dst.close()

    source = cluster.node(tmp_path / "src", env={"CONVERGENT_NODE_TEST_THROTTLE": str(RATE)})
    source.wait_ready()
    env = {"CONVERGENT_GOSSIP_INTERVAL": "200ms"}
    receiver = cluster.node(tmp_path / "dst", gossip=[source.url], env=env)
    part = tmp_path / "dst" / "tmp" / f"dl-{digest}.part"
    blob_path = tmp_path / "dst" / "blobs" / digest[:2] / digest[2:]

    def partway() -> bool:
        return part.exists() and size * 0.15 < part.stat().st_size < size * 0.7

    wait_until(partway, timeout=90, step=0.01, what="the receiver to be partway through the blob")
    receiver.kill(signal.SIGKILL)
    kept = part.stat().st_size
    assert 0 < kept < size
    assert not blob_path.exists()  # a partial blob is never visible in the store
    assert root_of(source, mset.id) != _root_offline(tmp_path / "dst", mset.id)

    receiver.start()
    started = time.monotonic()
    wait_until(lambda: root_of(receiver, mset.id) == mset.root, timeout=90, what="the restarted receiver to converge")
    resumed_in = time.monotonic() - started
    got = receiver.health()["gossip"]["blob_bytes_received"]
    # It fetched only the rest of the blob (plus nothing else), not the whole blob again.
    assert got == size - kept, (got, size, kept)
    assert resumed_in < 60
    cluster.shutdown()

    dst = Store.open(tmp_path / "dst")
    assert dst.blobs.has(digest) and dst.blobs.verify(digest) is None
    assert not list(dst.tmp_dir.glob("*.part"))
    report = dst.fsck()
    assert report.ok, report.errors
    assert dst.get_set("big").root == mset.root
    dst.close()
    src.close()


def _root_offline(store_dir, set_id: str) -> str:
    with Store.open(store_dir) as s:
        return s.get_set(set_id).root
