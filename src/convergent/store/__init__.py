"""The embedded store: content-addressed blobs plus one SQLite database.

Layout of a store directory (``--store DIR``, else ``$CONVERGENT_HOME``, else
``./.convergent``)::

    store.db            SQLite (WAL): manifests, contributions, sets, tags, tombstones, log
    blobs/ab/cdef...    one file per distinct tensor (see convergent.store.blobs)
    tmp/                temporary files on the store's filesystem (partial writes,
                        partial downloads: nodes may keep resumable files here)

Python API::

    store = Store.open("/path/to/store")        # or Store.open() for the default
    mset = store.create_set("demo", strategy="ties", base="/models/base", params={"density": 0.5})
    cid = mset.add("/models/ft1", weight=1.0)
    mset.remove(cid)
    print(mset.root)
    mset.resolve("/out/merged")

Every metadata change is one SQLite transaction; blobs are written and made
durable before the transaction that references them commits, so a crash at
any moment leaves a consistent store (at worst, unreferenced blobs that
``fsck`` reports and ``gc`` could delete).
"""

from __future__ import annotations

from convergent.store.blobs import BlobStore
from convergent.store.store import FsckReport, SetInfo, Store, default_store_path

__all__ = ["BlobStore", "FsckReport", "SetInfo", "Store", "default_store_path"]
