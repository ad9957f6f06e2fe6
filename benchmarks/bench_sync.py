"""Benchmark node sync: bytes on the wire, gossip rounds to converge, loopback throughput.

    python benchmarks/bench_sync.py [--mb 256] [--nodes 5,10,20] [--trials 5] [--workdir benchmarks/work/sync]

1. **Bytes per sync.** Node A holds a set with several contributions; a real
   node B (``convergent serve``) holds some of them. A syncs with B (push, then
   the reverse pull). We count every byte on the wire (request and response
   lines, headers and bodies, both directions) and compare with the bytes of
   the blobs the receiver truly lacked (blob files, sizes taken from its store
   before the sync). Target: at most 1.05x plus a few kB of metadata.
   Scenarios: the peer lacks one contribution; lacks all; lacks one
   contribution that shares most tensors with what it has (dedup).
2. **Rounds to converge.** N real nodes, each with one contribution nobody
   else has. Each gossip round, every node runs one round of
   ``convergent.node.gossip.gossip`` (one random peer, push and pull), all
   nodes in parallel; we count rounds until every node holds the same state.
   Several seeded trials per N.
3. **Loopback throughput.** A contribution of ``--mb`` MB is pulled over HTTP
   from a node on 127.0.0.1 (download, hash on the fly, verify, fsync,
   rename) and, separately, pushed; compared with a plain copy of the same
   blob files (``shutil.copyfile`` + fsync) on the same disk.

Prints a table and writes ``benchmarks/results/sync.json``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
import torch
from safetensors.torch import save_file

from common import machine_info, mb, print_table, write_json
from convergent.node.gossip import gossip
from convergent.node.sync import sync_set
from convergent.store import Store

HERE = Path(__file__).resolve().parent
TOKEN = "bench-token-0123456789abcdef0123"
SERVE = [sys.executable, "-c", "from convergent.cli.app import main; main()", "serve"]


# -- nodes --------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nodes:
    """Real ``convergent serve`` processes; all killed on exit."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.token_file = workdir / "token"
        self.token_file.write_text(TOKEN)
        self.procs: list[subprocess.Popen] = []

    def start(self, store: Path) -> str:
        port = free_port()
        log = open(self.workdir / f"node-{port}.log", "wb")  # noqa: SIM115
        env = {**os.environ, "CONVERGENT_TOKEN": TOKEN}
        cmd = [*SERVE, "--store", str(store), "--port", str(port), "--token-file", str(self.token_file)]
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True))
        return f"http://127.0.0.1:{port}"

    @staticmethod
    def wait(urls: list[str], timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2) as c:
            for url in urls:
                while True:
                    try:
                        if c.get(url + "/v1/health").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"node {url} did not start")
                    time.sleep(0.1)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()


# -- data ---------------------------------------------------------------------
def checkpoint(
    path: Path, total_mb: float, seed: int, tensors: int = 8, same_as: dict | None = None, change: int | None = None
) -> dict[str, torch.Tensor]:
    """A float32 checkpoint of about ``total_mb`` MB in ``tensors`` square-ish tensors.

    With ``same_as``, only the first ``change`` tensors differ from it (a partial fine-tune).
    """
    rows = max(1, int(total_mb * 1e6 / 4 / tensors / 1024))
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(tensors):
        name = f"layer.{i}.weight"
        if same_as is not None and change is not None and i >= change:
            out[name] = same_as[name]
        else:
            out[name] = torch.randn((rows, 1024), generator=gen)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path))
    return out


def blob_bytes(store: Store, digests: set[str]) -> int:
    return sum(store.blobs.size(d) for d in digests)


def lacking(giver: Store, taker: Store, set_name: str) -> set[str]:
    """Blobs of the giver's set (base + contributions) the taker does not hold."""
    state = giver.get_set(set_name).state()
    mids = {state.genesis.base} | {c.manifest for c in state.contributions}
    blobs = set().union(*(giver.get_manifest(m).blobs() for m in mids))
    return {d for d in blobs if not taker.blobs.has(d)}


# -- 1. bytes per sync ----------------------------------------------------------
def _traffic_row(label: str, direction: str, need, need_bytes: int, traffic: dict, blob_key: str) -> dict:
    """One scenario's wire bytes against the bytes the receiver lacked (``blob_key``: blob bytes that crossed)."""
    sent, received = traffic["sent"], traffic["received"]
    return {
        "scenario": label,
        "direction": direction,
        "lacked_blobs": len(need),
        "lacked_bytes": need_bytes,
        "wire_sent": sent,
        "wire_received": received,
        "wire_total": sent + received,
        "ratio_total": round((sent + received) / max(need_bytes, 1), 4),
        "metadata_bytes": sent + received - traffic[blob_key],
        "requests": traffic["requests"],
    }


def bench_bytes(work: Path, nodes: Nodes, size_mb: float) -> list[dict[str, Any]]:
    results = []
    per = size_mb / 4
    base_path = work / "bytes" / "base.safetensors"
    base = checkpoint(base_path, per, 0)
    fts = [checkpoint(work / "bytes" / f"ft{i}.safetensors", per, 10 + i) for i in range(3)]
    partial = work / "bytes" / "partial.safetensors"
    checkpoint(partial, per, 99, same_as=fts[0], change=1)  # 1 of 8 tensors differs from ft0
    del base, fts
    scenarios = [
        ("peer lacks 1 of 3 contributions", [0, 1, 2], [0, 1]),
        ("peer lacks all 3 contributions", [0, 1, 2], []),
        ("peer lacks 1 partial fine-tune (7/8 tensors shared)", ["p", 0], [0]),
    ]
    for k, (label, a_has, b_has) in enumerate(scenarios):
        a_dir, b_dir = work / "bytes" / f"a{k}", work / "bytes" / f"b{k}"
        for d in (a_dir, b_dir):
            shutil.rmtree(d, ignore_errors=True)
        a, b = Store.open(a_dir), Store.open(b_dir)
        for store, has in ((a, a_has), (b, b_has)):
            mset = store.create_set("bytes", strategy="linear", base=base_path)
            for i in has:
                path = partial if i == "p" else work / "bytes" / f"ft{i}.safetensors"
                mset.add(path)
        url = nodes.start(b_dir)
        nodes.wait([url])
        need = lacking(a, b, "bytes")
        need_bytes = blob_bytes(a, need)
        push = sync_set(a, "bytes", url, TOKEN)
        assert push.ok and push.in_sync, push
        results.append(_traffic_row(label, "push", need, need_bytes, push.traffic, "blob_bytes_sent"))
        # Reverse: a fresh store C pulls the same set from B (which now holds everything).
        c_dir = work / "bytes" / f"c{k}"
        shutil.rmtree(c_dir, ignore_errors=True)
        c = Store.open(c_dir)
        c.create_set("bytes", strategy="linear", base=base_path)
        for i in b_has:
            c.get_set("bytes").add(work / "bytes" / f"ft{i}.safetensors")
        need = lacking(b, c, "bytes")
        need_bytes = blob_bytes(b, need)
        pull = sync_set(c, "bytes", url, None)
        assert pull.ok, pull
        results.append(_traffic_row(label, "pull", need, need_bytes, pull.traffic, "blob_bytes_received"))
        for s in (a, b, c):
            s.close()
        nodes.stop()
    return results


# -- 2. rounds to converge -------------------------------------------------------
def bench_rounds(work: Path, nodes: Nodes, counts: list[int], trials: int) -> list[dict[str, Any]]:
    out = []
    base_path = work / "rounds" / "base.safetensors"
    checkpoint(base_path, 0.2, 0, tensors=2)
    for n in counts:
        root = work / "rounds" / f"n{n}"
        shutil.rmtree(root, ignore_errors=True)
        stores = []
        for i in range(n):
            s = Store.open(root / f"s{i}")
            s.create_set("rounds", strategy="linear", base=base_path)
            stores.append(s)
        urls = [nodes.start(root / f"s{i}") for i in range(n)]
        nodes.wait(urls)
        set_id = stores[0].get_set("rounds").id
        trial_rounds = []
        for t in range(trials):
            # Fresh knowledge: every node adds one contribution nobody else has.
            for i, s in enumerate(stores):
                ck = root / f"t{t}-n{i}.safetensors"
                checkpoint(ck, 0.2, 1000 * (t + 1) + i, tensors=2)
                s.get_set("rounds").add(ck)
            rng = random.Random(t)
            rounds = 0
            with ThreadPoolExecutor(max_workers=min(n, 8)) as pool:
                while True:
                    seeds = [rng.randrange(1 << 30) for _ in range(n)]

                    list(pool.map(_gossip_round, [(stores[i], set_id, urls, i, seeds[i]) for i in range(n)]))
                    rounds += 1
                    digests = {s.get_set(set_id).state().to_json() for s in stores}
                    if len(digests) == 1 or rounds >= 100:
                        break
            trial_rounds.append(rounds)
        out.append(
            {
                "nodes": n,
                "trials": trials,
                "rounds": trial_rounds,
                "mean": round(sum(trial_rounds) / len(trial_rounds), 2),
                "max": max(trial_rounds),
            }
        )
        for s in stores:
            s.close()
        nodes.stop()
    return out


def _gossip_round(job: tuple[Store, str, list[str], int, int]) -> None:
    """One gossip round of node ``i``: one random peer, pull and push."""
    store, set_id, urls, i, seed = job
    peers = [u for j, u in enumerate(urls) if j != i]
    gossip(store, [set_id], peers, rounds=1, interval=0.01, seed=seed, token=TOKEN, keep_reports=False)


# -- 3. loopback throughput --------------------------------------------------------
def _fsync_tree(path: Path) -> None:
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def bench_throughput(work: Path, nodes: Nodes, size_mb: float) -> dict[str, Any]:
    root = work / "throughput"
    shutil.rmtree(root, ignore_errors=True)
    base_path = root / "base.safetensors"
    checkpoint(base_path, size_mb, 0)
    ft = root / "ft.safetensors"
    checkpoint(ft, size_mb, 1)
    src = Store.open(root / "src")
    mset = src.create_set("tp", strategy="linear", base=base_path)
    cid = mset.add(ft)
    digests = src.get_manifest(mset.contribution(cid).manifest).blobs()
    nbytes = blob_bytes(src, digests)
    for name in ("dst_pull", "dst_push"):
        with Store.open(root / name) as s:
            s.create_set("tp", strategy="linear", base=base_path)
    url = nodes.start(root / "src")
    dst_url = nodes.start(root / "dst_push")
    nodes.wait([url, dst_url])

    # Plain copy of the same blob files (warm page cache, like the syncs below).
    copy_dir = root / "copy"
    copy_dir.mkdir()
    for d in digests:
        src.blobs.path(d).read_bytes()
    t = time.perf_counter()
    for d in sorted(digests):
        shutil.copyfile(src.blobs.path(d), copy_dir / d)
    _fsync_tree(copy_dir)
    copy_s = time.perf_counter() - t

    dst = Store.open(root / "dst_pull")
    t = time.perf_counter()
    pull = sync_set(dst, "tp", url, None)
    pull_s = time.perf_counter() - t
    assert pull.ok and pull.pulled_blob_bytes == nbytes, pull

    t = time.perf_counter()
    push = sync_set(src, "tp", dst_url, TOKEN)
    push_s = time.perf_counter() - t
    assert push.ok and push.in_sync, push
    nodes.stop()
    src.close()
    dst.close()
    return {
        "bytes": nbytes,
        "copy_s": round(copy_s, 3),
        "copy_MBps": round(nbytes / 1e6 / copy_s, 1),
        "pull_s": round(pull_s, 3),
        "pull_MBps": round(nbytes / 1e6 / pull_s, 1),
        "push_s": round(push_s, 3),
        "push_MBps": round(nbytes / 1e6 / push_s, 1),
        "pull_vs_copy": round(pull_s / copy_s, 2),
        "push_vs_copy": round(push_s / copy_s, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=256, help="MB per checkpoint for bytes and throughput")
    ap.add_argument("--nodes", default="5,10,20", help="gossip cluster sizes")
    ap.add_argument("--trials", type=int, default=5, help="seeded trials per cluster size")
    ap.add_argument("--workdir", type=Path, default=HERE / "work" / "sync")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: bytes,rounds,throughput")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    nodes = Nodes(work)
    results: dict[str, Any] = {"machine": machine_info(work), "mb": args.mb}
    try:
        if "bytes" not in skip:
            results["bytes"] = bench_bytes(work, nodes, args.mb)
            print_table(
                "bytes on the wire per sync vs bytes of blobs the peer lacked",
                ["scenario", "dir", "lacked MB", "wire MB", "ratio", "metadata kB", "requests"],
                [
                    [
                        r["scenario"],
                        r["direction"],
                        mb(r["lacked_bytes"]),
                        mb(r["wire_total"]),
                        f"{r['ratio_total']:.4f}",
                        round(r["metadata_bytes"] / 1e3, 1),
                        r["requests"],
                    ]
                    for r in results["bytes"]
                ],
            )
        if "rounds" not in skip:
            counts = [int(x) for x in args.nodes.split(",") if x]
            results["rounds"] = bench_rounds(work, nodes, counts, args.trials)
            print_table(
                "gossip rounds to converge (every node starts with one unique contribution)",
                ["nodes", "trials", "mean rounds", "max rounds", "per trial"],
                [
                    [r["nodes"], r["trials"], r["mean"], r["max"], " ".join(map(str, r["rounds"]))]
                    for r in results["rounds"]
                ],
            )
        if "throughput" not in skip:
            tp = results["throughput"] = bench_throughput(work, nodes, args.mb)
            print_table(
                f"loopback sync of a {mb(tp['bytes'])} MB contribution vs a plain file copy",
                ["what", "seconds", "MB/s", "vs copy"],
                [
                    ["file copy + fsync", tp["copy_s"], tp["copy_MBps"], "1.00"],
                    ["sync pull (HTTP, verify, fsync)", tp["pull_s"], tp["pull_MBps"], tp["pull_vs_copy"]],
                    ["sync push (HTTP, verify, fsync)", tp["push_s"], tp["push_MBps"], tp["push_vs_copy"]],
                ],
            )
    finally:
        nodes.stop()
    results["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    path = write_json("sync.json", results)
    print(f"wrote {path}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
