"""Replicas converge: random add/remove/export/import across 3-5 stores (hypothesis).

Every step is also applied to the pure OR-Set reference model, and after
every step the store's state must equal the model's: the SQLite store
implements exactly the lattice whose laws ``test_orset`` proves.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convergent.sets.bundle import export_bundle, import_bundle
from convergent.sets.mergeset import MergeSet
from convergent.sets.model import SetState
from convergent.sets.orset import ORSet, join
from convergent.store import Store
from tests.sets.util import base_source, finetune

POOL = [finetune(k) for k in range(4)]


def as_orset(state: SetState) -> ORSet:
    return ORSet(frozenset(a.key() for a in state.adds), frozenset(r.key() for r in state.removes))


op = st.one_of(
    st.tuples(st.just("add"), st.integers(0, 4), st.integers(0, len(POOL) - 1), st.sampled_from([1.0, 2.0])),
    st.tuples(st.just("remove"), st.integers(0, 4), st.integers(0, 10)),
    st.tuples(st.just("export"), st.integers(0, 4), st.booleans()),
    st.tuples(st.just("deliver"), st.integers(0, 50), st.integers(0, 4)),
)


@settings(max_examples=18, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(3, 5), ops=st.lists(op, min_size=4, max_size=14), seed=st.integers(0, 2**16))
def test_random_replicas_converge(n: int, ops: list[tuple], seed: int) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        stores = [Store.open(root / f"r{i}") for i in range(n)]
        try:
            sets: list[MergeSet] = [s.create_set("prop", "linear", base_source()) for s in stores]
            assert len({m.id for m in sets}) == 1  # same genesis, same set id, no coordination
            models = [ORSet() for _ in range(n)]
            bundles: list[tuple[Path, ORSet]] = []
            for step in ops:
                kind, r = step[0], step[1] % n
                mset = sets[r]
                if kind == "add":
                    before = as_orset(mset.state())
                    cid = mset.add(POOL[step[2]], weight=step[3])
                    (new,) = as_orset(mset.state()).adds - before.adds
                    assert new[0] == cid
                    models[r] = models[r].add(cid, new[1])
                elif kind == "remove":
                    live = mset.live()
                    if not live:
                        continue
                    cid = live[step[2] % len(live)]
                    mset.remove(cid)
                    models[r] = models[r].remove(cid)
                elif kind == "export":
                    history = [e["root"] for e in mset.log()]
                    since = rng.choice(history) if step[2] else None
                    path = root / f"b{len(bundles)}.tar"
                    export_bundle(mset, path, since=since)
                    part = mset.state_since(since) if since else mset.state()
                    bundles.append((path, as_orset(part)))
                else:
                    if not bundles:
                        continue
                    path, part = bundles[step[1] % len(bundles)]
                    r = step[2] % n
                    import_bundle(stores[r], path)
                    models[r] = join(models[r], part)
                assert as_orset(sets[r].state()) == models[r]
                assert sets[r].root == sets[r].state().root
            # Anti-entropy: everyone's full bundle to everyone, in a random order, some twice.
            finals = []
            for i, m in enumerate(sets):
                path = root / f"final{i}.tar"
                export_bundle(m, path)
                finals.append(path)
            deliveries = [(p, j) for p in finals for j in range(n)]
            deliveries += rng.sample(deliveries, k=min(3, len(deliveries)))
            rng.shuffle(deliveries)
            for path, j in deliveries:
                import_bundle(stores[j], path)
            expected = models[0]
            for m in models[1:]:
                expected = join(expected, m)
            states = [m.state() for m in sets]
            assert len({s.to_json() for s in states}) == 1
            assert len({m.root for m in sets}) == 1
            assert as_orset(states[0]) == expected
            for s in stores:
                assert s.fsck().ok
        finally:
            for s in stores:
                s.close()


def test_join_through_the_node_api(tmp_path: Path) -> None:
    """What a node does: learn the genesis, fetch missing manifests then blobs, join."""
    a = Store.open(tmp_path / "a")
    b = Store.open(tmp_path / "b")
    ma = a.create_set("s", "linear", base_source())
    ids = [ma.add(POOL[0]), ma.add(POOL[1], weight=3)]
    ma.remove(ids[0])
    state = SetState.from_json(ma.state().to_json())
    mb = b.add_set(state.genesis)
    assert b.add_set(state.genesis).id == mb.id  # idempotent
    manifests, blobs = mb.missing(state)
    assert len(manifests) == 3 and blobs == []
    for mid in manifests:
        b.put_manifest_bytes(a.get_manifest_bytes(mid), expected_id=mid)
    manifests, blobs = mb.missing(state)
    assert manifests == [] and blobs
    for d in blobs:
        tmp = b.blobs.new_temp_path("dl")
        tmp.write_bytes(a.blobs.path(d).read_bytes())
        b.blobs.put_file(tmp, d)
    assert mb.missing(state) == ([], [])
    res = mb.join(state, origin="peer a")
    assert res.changed and res.root_after == ma.root
    assert mb.state().to_json() == ma.state().to_json()
    again = mb.join(state)
    assert not again.changed and again.root_after == ma.root
    assert [e["op"] for e in mb.log()] == ["learn", "join"]
    # join is symmetric: a learns nothing new from b
    assert not ma.join(mb.state()).changed
