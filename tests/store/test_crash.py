"""Crash safety: SIGKILL a process at random moments during add, remove, import and resolve.

After every kill the store must reopen consistent (``fsck`` clean), keep
everything whose commit was journalled, and show no half-written output.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from convergent.sets.bundle import export_bundle
from convergent.sets.model import SetState
from convergent.store import Store
from tests.sets.util import base_source, finetune, tree_digest
from tests.store.crash_worker import BIG, SET_NAME

ROOT = Path(__file__).resolve().parents[2]
KILLS = 16
TARGETS = ("add", "import", "resolve", "remove")


def read_journal(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    out = []
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError):  # a line cut by the kill: not a commit
            out.append(json.loads(line))
    return out


def check(store_path: Path, journal_path: Path, outs: Path) -> dict[str, int]:
    with Store.open(store_path) as store:
        report = store.fsck()
        assert report.ok, report.errors
        assert not [p for p in store.tmp_dir.iterdir() if p.name.startswith("w-")]  # stale temps cleaned
        mset = store.get_set(SET_NAME)
        state = mset.state()
        known = {c.id for c in state.contributions}
        adds = {a.key() for a in state.adds}
        removes = {r.key() for r in state.removes}
        live = set(state.live())
        assert mset.root == state.root
        counts: dict[str, int] = {}
        for e in read_journal(journal_path):
            op = e.get("commit")
            if op is None:
                continue
            counts[op] = counts.get(op, 0) + 1
            if op == "add":
                assert e["cid"] in known
            elif op == "remove":
                assert e["cid"] not in live  # each add in this test is a new contribution: no re-adds
            elif op == "import":
                with tarfile.open(e["bundle"]) as t:
                    doc = json.loads(t.extractfile("bundle.json").read())  # type: ignore[union-attr]
                part = SetState.model_validate(doc["state"])
                assert {a.key() for a in part.adds} <= adds
                assert {r.key() for r in part.removes} <= removes
            elif op == "resolve":
                assert tree_digest(Path(e["out"])) == e["files"]
    # no output folder is ever visible half-written
    for out in outs.iterdir():
        if out.name.startswith("."):
            continue
        prov = json.loads((out / "convergent.json").read_text())
        files = tree_digest(out)
        assert {k: v for k, v in files.items() if k != "convergent.json"} == prov["files"]
    return counts


def test_sigkill_at_random_moments(tmp_path: Path) -> None:
    rng = random.Random(1234)
    store_path, journal_path, outs = tmp_path / "store", tmp_path / "journal.jsonl", tmp_path / "outs"
    outs.mkdir()
    with Store.open(store_path) as store:
        store.create_set(SET_NAME, "linear", base_source(BIG))
    # bundles from another replica of the same set, for the worker to import
    bundles = []
    with Store.open(tmp_path / "peer") as peer:
        pset = peer.create_set(SET_NAME, "linear", base_source(BIG))
        for k in range(3):
            pset.add(finetune(90_000 + k, BIG))
            path = tmp_path / f"peer{k}.tar"
            export_bundle(pset, path)
            bundles.append(str(path))
        pset.remove(pset.live()[0])
        export_bundle(pset, tmp_path / "peer-rm.tar")
        bundles.append(str(tmp_path / "peer-rm.tar"))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.store.crash_worker",
            str(store_path),
            str(journal_path),
            json.dumps(bundles),
            str(outs),
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    totals: dict[str, int] = {}
    interrupted: dict[str, int] = {}
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "ready"
        for kill in range(KILLS):
            seen = len(read_journal(journal_path))
            proc.stdin.write(f"go {kill + 1}\n")
            proc.stdin.flush()
            line = proc.stdout.readline().split()
            assert line[0] == "pid", line
            pid = int(line[1])
            # wait until the child begins the targeted kind of operation, then kill it a random moment later
            target = TARGETS[kill % len(TARGETS)]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                fresh = read_journal(journal_path)[seen:]
                if any(e.get("begin") == target for e in fresh):
                    break
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.02 if target == "remove" else 0.25))
            os.kill(pid, signal.SIGKILL)
            dead = proc.stdout.readline().split()
            assert dead[0] == "dead"
            assert os.WIFSIGNALED(int(dead[1])), "the worker died before it was killed (see its stderr)"
            totals = check(store_path, journal_path, outs)
            last = read_journal(journal_path)[-1:]
            if last and "begin" in last[0]:
                interrupted[last[0]["begin"]] = interrupted.get(last[0]["begin"], 0) + 1
    finally:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(timeout=30)
    print(f"committed {totals}; killed in the middle of {interrupted}")
    # the kills hit a store that did real work
    assert sum(totals.values()) >= 5, totals
    assert totals.get("add", 0) >= 1, totals
