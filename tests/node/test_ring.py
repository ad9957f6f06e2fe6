"""Three real nodes, contributions added on different nodes, one sync pass around the ring:
equal roots, equal states, byte-identical resolves everywhere."""

from __future__ import annotations

import json
import subprocess

import pytest

from convergent.node.sync import compare_roots, sync_set
from convergent.store import Store
from tests.node.conftest import SERVE, TOKEN, make_checkpoint, root_of

pytestmark = pytest.mark.slow


def test_three_nodes_ring_sync_converges_and_resolves_identically(cluster, tmp_path):
    base = make_checkpoint(tmp_path / "base.safetensors", 0)
    stores, sets = [], []
    for i in range(3):
        store = Store.open(tmp_path / f"store{i}")
        mset = store.create_set("ring", strategy="linear", base=base)
        stores.append(store)
        sets.append(mset)
    assert len({m.id for m in sets}) == 1
    set_id = sets[0].id
    # Different contributions on different nodes; node 2 also adds and removes one (OR-Set tombstone).
    sets[0].add(make_checkpoint(tmp_path / "ft0.safetensors", 10), weight=1.0)
    sets[1].add(make_checkpoint(tmp_path / "ft1.safetensors", 11), weight=2.0)
    sets[1].add(make_checkpoint(tmp_path / "ft2.safetensors", 12), weight=0.5)
    gone = sets[2].add(make_checkpoint(tmp_path / "ft3.safetensors", 13))
    sets[2].add(make_checkpoint(tmp_path / "ft4.safetensors", 14))
    sets[2].remove(gone)
    assert len({m.root for m in sets}) == 3

    nodes = [cluster.node(tmp_path / f"store{i}") for i in range(3)]
    cluster.wait_all()

    # Without a token, sync pulls from an open peer and pushes nothing.
    before = root_of(nodes[1], set_id)
    pull_only = sync_set(stores[0], "ring", nodes[1].url, None)
    assert pull_only.ok and pull_only.pulled_blobs > 0 and pull_only.pushed_blobs == 0, pull_only
    assert pull_only.push_skipped and "token" in pull_only.push_skipped
    assert root_of(nodes[1], set_id) == before

    # One pass around the ring: 0 -> 1, 1 -> 2 (through the CLI, a separate process), 2 -> 0.
    r01 = sync_set(stores[0], "ring", nodes[1].url, TOKEN)
    assert r01.ok and r01.in_sync, r01
    cli = subprocess.run(
        [*SERVE, "sync", "ring", "--peer", nodes[2].url, "--store", str(tmp_path / "store1"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**nodes[0].env},
    )
    assert cli.returncode == 0, cli.stderr
    out = json.loads(cli.stdout)
    assert out["ok"] and out["reports"][0]["in_sync"]
    r20 = sync_set(stores[2], "ring", nodes[0].url, TOKEN)
    assert r20.ok and r20.in_sync, r20

    roots = {root_of(n, set_id) for n in nodes}
    assert len(roots) == 1 and None not in roots
    digests = {n.get(f"/v1/sets/{set_id}/root").json()["state_digest"] for n in nodes}
    assert len(digests) == 1
    assert {m.root for m in sets} == roots
    assert len(sets[0].live()) == 4 and gone not in sets[0].live()
    for i in range(3):
        cmp = compare_roots(stores[i], "ring", nodes[(i + 1) % 3].url)
        assert cmp["agree"] and cmp["states_equal"]

    # The gossip and status commands agree (separate processes, run side by side).
    env = {**nodes[0].env}
    gossip = subprocess.Popen(
        [
            *SERVE,
            "gossip",
            "ring",
            "--peers",
            f"{nodes[1].url},{nodes[2].url}",
            "--rounds",
            "2",
            "--interval",
            "100ms",
            "--store",
            str(tmp_path / "store0"),
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    status = subprocess.Popen(
        [*SERVE, "status", "ring", "--peer", nodes[0].url, "--store", str(tmp_path / "store2"), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    g_out, g_err = gossip.communicate(timeout=120)
    s_out, s_err = status.communicate(timeout=120)
    assert gossip.returncode == 0, g_err
    summary = json.loads(g_out)
    assert summary["rounds"] == 2 and summary["failures"] == 0 and summary["refusals"] == 0
    assert all(r["in_sync"] for r in summary["reports"])
    assert status.returncode == 0, s_err
    assert json.loads(s_out)["peer"]["agree"] is True

    # A second pass moves no blob at all.
    again = sync_set(stores[0], "ring", nodes[1].url, TOKEN)
    assert again.in_sync and again.pulled_blobs == 0 and again.pushed_blobs == 0
    assert again.traffic["requests"] == 1

    # Byte-identical resolves on every replica (through the engine).
    results = [m.resolve(tmp_path / f"out{i}", use_cache=False) for i, m in enumerate(sets)]
    assert len({r.digest for r in results}) == 1
    shards = [n for n in results[0].files if n.endswith(".safetensors")]
    assert shards
    for name in shards:
        assert len({(r.out_dir / name).read_bytes() for r in results}) == 1
    for store in stores:
        report = store.fsck()
        assert report.ok, report.errors
        assert not list(store.tmp_dir.glob("*.part"))
        store.close()
