"""Ten real nodes gossiping while random partitions come and go, then healed: they converge
within a bounded number of gossip rounds (the test prints how many)."""

from __future__ import annotations

import random
import time

import httpx
import pytest

from convergent.store import Store
from tests.node.conftest import HTTP, TOKEN, free_port, make_checkpoint, wait_until

pytestmark = pytest.mark.slow

N = 10
INTERVAL = "250ms"
MAX_ROUNDS_AFTER_HEAL = 30

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _partition(url: str, refuse: list[str], seconds: float | None) -> int:
    r = HTTP.post(url + "/v1/admin/partition", json={"refuse": refuse, "seconds": seconds}, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()["rounds"]


def _root(url: str, set_id: str) -> tuple[str, int] | None:
    try:
        r = HTTP.get(f"{url}/v1/sets/{set_id}/root")
    except httpx.TransportError:
        return None
    return (r.json()["state_digest"], r.json()["live"]) if r.status_code == 200 else None


def test_gossip_with_random_partitions_converges_after_heal(cluster, tmp_path, record_property, capsys):
    base = make_checkpoint(tmp_path / "base.safetensors", 0)
    stores = []
    for i in range(N):
        store = Store.open(tmp_path / f"s{i}")
        store.create_set("gossip", strategy="linear", base=base)
        stores.append(store)
    set_id = stores[0].get_set("gossip").id

    def add(i: int, seed: int) -> str:
        return stores[i].get_set("gossip").add(make_checkpoint(tmp_path / f"ft{seed}.safetensors", seed))

    live_expected = {add(0, 100), add(3, 103), add(6, 106)}
    doomed = add(1, 101)

    ports = [free_port() for _ in range(N)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    nodes = []
    for i in range(N):
        env = {"CONVERGENT_GOSSIP_INTERVAL": INTERVAL, "CONVERGENT_GOSSIP_SEED": str(i)}
        peers = [u for j, u in enumerate(urls) if j != i]
        nodes.append(cluster.node(tmp_path / f"s{i}", port=ports[i], gossip=peers, env=env))
    cluster.wait_all()

    # Random partitions come and go while contributions are added and removed on both sides.
    rng = random.Random(4)
    half_a, half_b = urls[: N // 2], urls[N // 2 :]
    for u in half_a:
        _partition(u, half_b, None)
    for u in half_b:
        _partition(u, half_a, None)
    assert nodes[0].health()["partitioned"] == sorted(half_b)
    live_expected.add(add(2, 102))  # side A
    live_expected.add(add(8, 108))  # side B
    stores[1].get_set("gossip").remove(doomed)  # removed on side A only, before B saw it everywhere
    time.sleep(1.0)
    for u in urls:
        _partition(u, [], None)
    for step in range(8):
        victim = rng.randrange(N)
        cut = rng.sample([u for j, u in enumerate(urls) if j != victim], rng.randint(2, N // 2))
        seconds = rng.uniform(0.5, 1.5)
        _partition(urls[victim], cut, seconds)
        for u in cut:
            _partition(u, [urls[victim]], seconds)
        if step == 3:
            live_expected.add(add(victim, 200 + step))  # added while that node is cut off
        time.sleep(0.3)

    # Last, a hard split with new knowledge on both sides, so the heal has something to spread.
    for u in half_a:
        _partition(u, half_b, None)
    for u in half_b:
        _partition(u, half_a, None)
    live_expected.add(add(4, 104))  # side A
    live_expected.add(add(9, 109))  # side B
    removed = sorted(set(stores[7].get_set("gossip").live()) & live_expected)[0]
    stores[7].get_set("gossip").remove(removed)  # side B removes something everyone had
    live_expected.discard(removed)
    time.sleep(1.5)

    # Heal everything, then count the gossip rounds until every node holds the same state.
    healed = time.time()
    at_heal = [_partition(u, [], None) for u in urls]

    def converged() -> bool:
        seen = {_root(u, set_id) for u in urls}
        return len(seen) == 1 and next(iter(seen)) is not None and next(iter(seen))[1] == len(live_expected)

    wait_until(converged, timeout=90, step=0.1, what="all nodes to converge")
    # Each node records the gossip round of its last change; count from the round it was healed in.
    rounds = 0
    for n, r0 in zip(nodes, at_heal, strict=True):
        g = n.health()["gossip"]
        if g["changed_at"] is not None and g["changed_at"] >= healed:
            rounds = max(rounds, g["changed_at_round"] - r0 + 1)
    seconds = max((n.health()["gossip"]["changed_at"] or healed) for n in nodes) - healed
    record_property("gossip_rounds_to_converge", rounds)
    with capsys.disabled():
        print(f"\n[gossip] {N} nodes converged {rounds} rounds ({max(seconds, 0):.2f}s) after the partitions healed")
    assert rounds <= MAX_ROUNDS_AFTER_HEAL

    assert set(stores[5].get_set("gossip").live()) == live_expected
    assert doomed not in stores[9].get_set("gossip").live()
    failures = sum(n.health()["gossip"]["refusals"] for n in nodes)
    assert failures == 0  # partitions are not lies
    cluster.shutdown()
    for store in stores[:3]:
        report = store.fsck()
        assert report.ok, report.errors
    for store in stores:
        store.close()
