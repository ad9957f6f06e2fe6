"""A process that works on a store until it is SIGKILLed (driven by ``test_crash``).

It is a zygote: it imports everything once, then for each ``go SEED`` line on
stdin forks a child that opens the store and loops over random operations
(add, remove, import, resolve), journalling ``begin``/``commit`` lines
(fsynced) around each one. The zygote prints the child's pid, waits for it
to die and prints ``dead``. Forking keeps each kill cheap (no torch import).
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import torch

import convergent.engine
import convergent.strategies  # noqa: F401
from convergent.sets.bundle import import_bundle
from convergent.store import Store
from tests.sets.util import finetune

BIG = {f"model.layers.{i}.w": ((256, 256), torch.float32) for i in range(4)}
SET_NAME = "crash"


def journal(path: Path, entry: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def child(store_path: Path, journal_path: Path, bundles: list[str], outs: Path, seed: int) -> None:
    rng = random.Random(seed)
    store = Store.open(store_path)
    mset = store.get_set(SET_NAME)
    i = 0
    while True:
        i += 1
        op = rng.choice(["add", "add", "remove", "import", "resolve"])
        if op == "add":
            k = seed * 1000 + i
            journal(journal_path, {"begin": "add", "k": k})
            cid = mset.add(finetune(k, BIG), weight=1.0 + (k % 3))
            journal(journal_path, {"commit": "add", "cid": cid})
        elif op == "remove":
            live = mset.live()
            if not live:
                continue
            cid = rng.choice(live)
            journal(journal_path, {"begin": "remove", "cid": cid})
            mset.remove(cid)
            journal(journal_path, {"commit": "remove", "cid": cid})
        elif op == "import":
            bundle = rng.choice(bundles)
            journal(journal_path, {"begin": "import", "bundle": bundle})
            import_bundle(store, bundle)
            journal(journal_path, {"commit": "import", "bundle": bundle})
        else:
            if not mset.live():
                continue
            out = outs / f"o{seed}-{i}"
            journal(journal_path, {"begin": "resolve", "out": str(out)})
            res = mset.resolve(out, threads=2, use_cache=False)
            journal(journal_path, {"commit": "resolve", "out": str(out), "files": res.files, "root": res.root})


def main() -> None:
    store_path, journal_path, bundles_json, outs = sys.argv[1:5]
    bundles = json.loads(bundles_json)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        seed = int(line.split()[1])
        pid = os.fork()
        if pid == 0:
            try:
                child(Path(store_path), Path(journal_path), bundles, Path(outs), seed)
            finally:
                os._exit(3)
        sys.stdout.write(f"pid {pid}\n")
        sys.stdout.flush()
        _, status = os.waitpid(pid, 0)
        sys.stdout.write(f"dead {status}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
