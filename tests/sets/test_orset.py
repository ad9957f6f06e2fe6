"""The pure OR-Set and the Merkle root: lattice laws and add-wins semantics."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from convergent.sets.merkle import merkle_root, tree_root
from convergent.sets.orset import ORSet, join, live

IDS = [f"{i:064x}" for i in range(1, 6)]
TAGS = [f"{i:032x}" for i in range(1, 9)]
pair = st.tuples(st.sampled_from(IDS), st.sampled_from(TAGS))
states = st.builds(
    lambda a, r: ORSet(frozenset(a), frozenset(r)), st.sets(pair, max_size=12), st.sets(pair, max_size=8)
)
SET_ID = "ab" * 32


@settings(max_examples=150, deadline=None)
@given(states, states, states)
def test_join_is_a_semilattice(a: ORSet, b: ORSet, c: ORSet) -> None:
    assert join(a, b) == join(b, a)
    assert join(join(a, b), c) == join(a, join(b, c))
    assert join(a, a) == a
    assert join(a, join(a, b)) == join(a, b)


@settings(max_examples=200, deadline=None)
@given(states, st.sampled_from(IDS))
def test_remove_then_join_never_resurrects_observed_adds(a: ORSet, cid: str) -> None:
    removed = a.remove(cid)
    assert cid not in removed.live()
    # Joining with anything that only knows the same add-tags keeps it removed.
    assert cid not in join(removed, a).live()


def test_concurrent_add_wins_over_remove() -> None:
    cid = IDS[0]
    a = ORSet().add(cid, TAGS[0])
    b = a  # replica b received a's add
    a = a.remove(cid)  # a removes what it has seen
    b = b.add(cid, TAGS[1])  # b re-adds concurrently (new tag)
    assert join(a, b).live() == [cid]
    assert join(b, a).live() == [cid]


def test_live_is_sorted_and_deduplicated() -> None:
    s = ORSet().add(IDS[2], TAGS[0]).add(IDS[0], TAGS[1]).add(IDS[2], TAGS[2])
    assert s.live() == [IDS[0], IDS[2]]
    assert live(s.adds, s.removes) == s.live()


@given(st.lists(st.sampled_from(IDS), unique=True))
def test_root_depends_only_on_the_live_set(ids: list[str]) -> None:
    assert merkle_root(SET_ID, ids) == merkle_root(SET_ID, list(reversed(ids)))
    if ids:
        assert merkle_root(SET_ID, ids) != merkle_root(SET_ID, ids[1:])


def test_root_binds_the_set_and_differs_from_empty() -> None:
    assert merkle_root(SET_ID, []) != merkle_root("cd" * 32, [])
    assert merkle_root(SET_ID, IDS[:1]) != merkle_root(SET_ID, [])
    assert tree_root([]) == bytes(32)
    # odd node counts are carried up, not duplicated: [a, b, c] != [a, b, c, c]
    assert tree_root(IDS[:3]) != tree_root([*IDS[:3], IDS[2]])
