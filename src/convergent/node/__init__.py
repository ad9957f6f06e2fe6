"""Nodes: an HTTP service over a store, anti-entropy sync, gossip (DESIGN.md, Node).

* :mod:`convergent.node.server`: ``create_app(store, write_token, read_token)``;
* :mod:`convergent.node.client`: ``PeerClient`` (bounded retries, resumable blob transfer);
* :mod:`convergent.node.sync`: ``sync_set`` (one round with one peer), ``compare_roots``;
* :mod:`convergent.node.gossip`: ``gossip`` (random peers, seeded), ``run_node`` (uvicorn in-process).
"""
