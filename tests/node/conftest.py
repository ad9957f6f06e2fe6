"""Real node processes on 127.0.0.1 for the node tests.

Every node is a ``convergent serve`` subprocess on a port picked by binding
port 0; every wait is bounded in attempts and time; every process started is
killed when its test ends (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

TOKEN = "test-write-token-0123456789abcdef"
READ_TOKEN = "test-read-token-0123456789abcdef"
SERVE = [sys.executable, "-c", "from convergent.cli.app import main; main()"]
#: One HTTP client for every test-side request (keeps connections; no per-request setup cost).
HTTP = httpx.Client(timeout=10.0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SHAPES = {"embed.weight": (32, 16), "layer.0.weight": (16, 16), "layer.0.bias": (16,), "norm.weight": (16,)}


def make_checkpoint(path: Path, seed: int, shapes: dict[str, tuple[int, ...]] | None = None) -> Path:
    """A small .safetensors checkpoint with seeded random float32 tensors."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(shape, generator=gen) for name, shape in (shapes or SHAPES).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


class Node:
    """One ``convergent serve`` process over ``store``."""

    def __init__(self, store: Path, port: int, log: Path, args: list[str], env: dict[str, str]):
        self.store = store
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.args = args
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self) -> Node:
        cmd = [*SERVE, "serve", "--store", str(self.store), "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=self.env, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 60.0) -> Node:
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.05) + 1):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node {self.url} exited: {self.log.read_text()[-2000:]}")
            try:
                if HTTP.get(self.url + "/v1/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        raise RuntimeError(f"node {self.url} not ready after {timeout}s: {self.log.read_text()[-2000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def get(self, path: str, **kw) -> httpx.Response:
        return HTTP.get(self.url + path, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return HTTP.post(self.url + path, **kw)

    def health(self) -> dict:
        return self.get("/v1/health").json()


class Cluster:
    """Starts nodes and guarantees they are all gone at the end of the test."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.nodes: list[Node] = []
        self.token_file = tmp / "token"
        self.token_file.write_text(TOKEN + "\n")
        self.read_token_file = tmp / "read-token"
        self.read_token_file.write_text(READ_TOKEN + "\n")

    def node(
        self,
        store: Path,
        *,
        token: bool = True,
        read_token: bool = False,
        gossip: list[str] | None = None,
        env: dict[str, str] | None = None,
        port: int | None = None,
        start: bool = True,
    ) -> Node:
        port = port or free_port()
        args: list[str] = []
        if token:
            args += ["--token-file", str(self.token_file)]
        if read_token:
            args += ["--read-token-file", str(self.read_token_file)]
        if gossip:
            args += ["--gossip-peers", ",".join(gossip)]
        full_env = {**os.environ, "CONVERGENT_NODE_TEST_ADMIN": "1", "CONVERGENT_TOKEN": TOKEN, **(env or {})}
        full_env.pop("CONVERGENT_HOME", None)
        n = Node(store, port, self.tmp / f"node-{port}.log", args, full_env)
        self.nodes.append(n)
        if start:
            n.start()
        return n

    def wait_all(self, timeout: float = 90.0) -> None:
        for n in self.nodes:
            if n.proc is not None and n.proc.poll() is None:
                n.wait_ready(timeout)

    def assert_no_crash(self) -> None:
        """No node logged a traceback (an unhandled error would have been a 500)."""
        for n in self.nodes:
            text = n.log.read_text(errors="replace") if n.log.exists() else ""
            assert "Traceback" not in text, f"node {n.url} crashed:\n{text[-3000:]}"

    def shutdown(self) -> None:
        for n in self.nodes:
            if n.proc is not None and n.proc.poll() is None:
                os.kill(n.proc.pid, signal.SIGTERM)
        for n in self.nodes:
            if n.proc is None:
                continue
            try:
                n.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(n.proc.pid, signal.SIGKILL)
                n.proc.wait(timeout=10)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.shutdown()
    c.assert_no_crash()


def wait_until(predicate, timeout: float, step: float = 0.1, what: str = "condition"):
    """Poll ``predicate`` (bounded in time and count) until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / step) + 2):
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def root_of(node: Node, set_id: str) -> str | None:
    try:
        r = node.get(f"/v1/sets/{set_id}/root")
    except httpx.TransportError:
        return None
    return r.json()["root"] if r.status_code == 200 else None
