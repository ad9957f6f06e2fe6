"""An HTTP client for one peer node: bounded retries, resumable blob transfer, byte accounting.

Every request is bounded: a per-request timeout, at most ``retries`` extra
attempts on transport errors and 502/503/504 answers, with exponential
backoff, and an overall deadline per call. Blob downloads go into a partial
file (``dl-<digest>.part`` in the store's temp dir), resume with an HTTP
``Range`` request after an interruption (even after the process was killed),
and are capped at the size the manifest says the blob has. The caller moves
a finished partial file into the store with ``BlobStore.put_file``, which
re-hashes it: a partial or unverified blob is never visible in the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from convergent import __version__
from convergent.errors import IntegrityError, SyncError
from convergent.node.auth import auth_headers

#: Header a node puts on its outgoing requests, naming its own URL (used for partitions in tests).
NODE_HEADER = "X-Convergent-Node"
API = "/v1"
CHUNK = 1 << 20
_RETRY_STATUS = {502, 503, 504}
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def normalize_url(url: str) -> str:
    """``host:port`` or ``http://host:port/`` -> ``http://host:port``."""
    url = url.strip()
    if not url:
        raise SyncError("empty peer URL")
    if "://" not in url:
        url = "http://" + url
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise SyncError(f"'{url}' is not an http(s) URL", "write it like http://127.0.0.1:8470")
    return url.rstrip("/")


class PeerError(SyncError):
    """A peer answered with an error status (``status``) or garbage."""

    def __init__(self, message: str, status: int | None = None, body: Any = None, hint: str | None = None):
        super().__init__(message, hint)
        self.status = status
        self.body = body


class Busy(SyncError):
    """Another transfer of the same blob is in progress in this store."""


@dataclass
class Traffic:
    """Bytes on the wire (bodies plus headers, both directions) and blob payload bytes."""

    requests: int = 0
    sent: int = 0
    received: int = 0
    blob_bytes_sent: int = 0
    blob_bytes_received: int = 0
    retries: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "sent": self.sent,
            "received": self.received,
            "blob_bytes_sent": self.blob_bytes_sent,
            "blob_bytes_received": self.blob_bytes_received,
            "retries": self.retries,
        }


def _headers_size(headers: httpx.Headers) -> int:
    return sum(len(k) + len(v) + 4 for k, v in headers.raw)


class PeerClient:
    """Talks to one peer at ``url``; use as a context manager."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.2,
        deadline: float = 600.0,
        node_url: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ):
        self.url = normalize_url(url)
        self.token = token
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self.deadline = deadline
        self.traffic = Traffic()
        headers = {"User-Agent": f"convergent/{__version__}", **auth_headers(token)}
        if node_url:
            headers[NODE_HEADER] = node_url
        self._http = httpx.Client(
            base_url=self.url + API,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            transport=transport,
            follow_redirects=False,
            verify=_ssl_context() if self.url.startswith("https:") else True,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PeerClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------
    def _count_request(self, request: httpx.Request, body_len: int) -> None:
        self.traffic.requests += 1
        line = len(request.method) + len(str(request.url.raw_path)) + 12
        self.traffic.sent += line + _headers_size(request.headers) + body_len

    def _count_response(self, response: httpx.Response) -> None:
        self.traffic.received += 15 + _headers_size(response.headers) + response.num_bytes_downloaded

    def _attempts(self) -> Iterator[int]:
        start = time.monotonic()
        for attempt in range(self.retries + 1):
            if attempt and time.monotonic() - start > self.deadline:
                return
            yield attempt

    def _sleep(self, attempt: int) -> None:
        self.traffic.retries += 1
        time.sleep(min(self.backoff * (2**attempt), 5.0))

    def request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        json: Any = None,
        params: dict[str, Any] | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> httpx.Response:
        """One request with bounded retries; PeerError unless the status is in ``ok``."""
        last: Exception | None = None
        for attempt in self._attempts():
            try:
                request = self._http.build_request(method, path, content=content, json=json, params=params)
                body_len = len(request.content) if request.content else 0
                self._count_request(request, body_len)
                response = self._http.send(request)
                self._count_response(response)
            except httpx.TransportError as exc:
                last = exc
                if attempt < self.retries:
                    self._sleep(attempt)
                continue
            if response.status_code in _RETRY_STATUS and attempt < self.retries:
                last = _error(response, method, path)
                self._sleep(attempt)
                continue
            if response.status_code not in ok:
                raise _error(response, method, path)
            return response
        if isinstance(last, PeerError):
            raise last
        raise SyncError(
            f"peer {self.url} unreachable ({type(last).__name__}: {last})",
            "check that the node is running and the URL is right",
        )

    def get_json(self, path: str, **kw: Any) -> Any:
        r = self.request("GET", path, **kw)
        try:
            return r.json()
        except ValueError:
            raise PeerError(f"peer {self.url} sent malformed JSON for {path}") from None

    # -- reads -----------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self.get_json("/health")

    def sets(self) -> list[dict[str, Any]]:
        data = self.get_json("/sets")
        if not isinstance(data, list):
            raise PeerError(f"peer {self.url} sent a malformed set list")
        return data

    def root(self, set_id: str) -> dict[str, Any] | None:
        """The peer's root and state digest for ``set_id``, or None if it does not hold the set."""
        r = self.request("GET", f"/sets/{set_id}/root", ok=(200, 404))
        if r.status_code == 404:
            return None
        try:
            data = r.json()
            assert isinstance(data, dict) and isinstance(data.get("root"), str)
        except (ValueError, AssertionError):
            raise PeerError(f"peer {self.url} sent a malformed root") from None
        return data

    def genesis_bytes(self, set_id: str) -> bytes:
        return self.request("GET", f"/sets/{set_id}/genesis").content

    def state_bytes(self, set_id: str) -> bytes:
        return self.request("GET", f"/sets/{set_id}/state").content

    def manifest_bytes(self, manifest_id: str) -> bytes:
        return self.request("GET", f"/manifests/{manifest_id}").content

    def missing(self, manifests: list[str], blobs: list[str]) -> tuple[list[str], list[str]]:
        """Which of these manifests and blobs the peer lacks."""
        data = self.request("POST", "/missing", json={"manifests": manifests, "blobs": blobs}).json()
        out = (data.get("manifests"), data.get("blobs")) if isinstance(data, dict) else (None, None)
        if not all(isinstance(x, list) and all(isinstance(i, str) for i in x) for x in out):
            raise PeerError(f"peer {self.url} sent a malformed answer to /missing")
        return out[0], out[1]

    # -- writes ----------------------------------------------------------
    def put_manifest(self, manifest_id: str, data: bytes) -> None:
        self.request("PUT", f"/manifests/{manifest_id}", content=data, ok=(200, 201))

    def push_state(self, set_id: str, state: bytes) -> dict[str, Any]:
        data = self.request("POST", f"/sets/{set_id}/state", content=state).json()
        if not isinstance(data, dict):
            raise PeerError(f"peer {self.url} sent a malformed answer to a state push")
        return data

    def partition(self, refuse: list[str], seconds: float | None = None) -> dict[str, Any]:
        """Test-only: make the peer refuse these peers' requests (needs the admin switch)."""
        return self.request("POST", "/admin/partition", json={"refuse": refuse, "seconds": seconds}).json()

    # -- blob transfer ---------------------------------------------------
    def download_blob(self, digest: str, part: Path, limit: int, progress: Callable[[int], None] | None = None) -> str:
        """Download blob ``digest`` into ``part`` (resuming what it already holds); returns the sha256
        of the complete file, hashed on the fly (the caller compares it with ``digest``).

        Never writes more than ``limit`` bytes. Busy if another process is
        downloading the same blob into ``part``.
        """
        with _locked(part) as f:
            last: Exception | None = None
            for attempt in self._attempts():
                try:
                    hasher = [_hash_prefix(f, limit)]
                    if self._download_once(digest, f, hasher, limit, progress):
                        return hasher[0].hexdigest()
                    last = SyncError(f"download of {digest[:12]}… ended early")
                except httpx.TransportError as exc:
                    last = exc
                except PeerError as exc:
                    if exc.status not in _RETRY_STATUS:
                        raise
                    last = exc
                if attempt < self.retries:
                    self._sleep(attempt)
            raise SyncError(f"could not download blob {digest[:12]}… from {self.url}: {last}")

    def _download_once(
        self, digest: str, f: Any, hasher: list[Any], limit: int, progress: Callable[[int], None] | None
    ) -> bool:
        have = f.seek(0, os.SEEK_END)
        headers = {"Range": f"bytes={have}-"} if have else {}
        request = self._http.build_request("GET", f"/blobs/{digest}", headers=headers)
        self._count_request(request, 0)
        response = self._http.send(request, stream=True)
        try:
            total: int | None
            if response.status_code == 416 and have:
                # We may already hold all of it (killed between the last byte and the rename).
                m = re.match(r"^bytes \*/(\d+)$", response.headers.get("content-range", ""))
                if m and int(m.group(1)) == have:
                    return True
                f.truncate(0)
                return False
            if response.status_code == 206:
                m = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
                if not m or int(m.group(1)) != have or m.group(3) == "*":
                    raise PeerError(f"peer {self.url} sent a bad Content-Range for blob {digest[:12]}…")
                total = int(m.group(3))
            elif response.status_code == 200:
                if have:
                    f.truncate(0)
                    f.seek(0)
                    hasher[0] = hashlib.sha256()
                    have = 0
                total = int(response.headers["content-length"]) if "content-length" in response.headers else None
            else:
                response.read()
                raise _error(response, "GET", f"/blobs/{digest}")
            if total is not None and total > limit:
                f.truncate(0)
                raise IntegrityError(
                    f"peer {self.url} offers {total} bytes for blob {digest[:12]}…, its shape allows {limit}"
                )
            written = have
            for chunk in response.iter_raw(CHUNK):
                written += len(chunk)
                if written > limit:
                    f.truncate(0)
                    raise IntegrityError(f"peer {self.url} sent more bytes than blob {digest[:12]}… can hold")
                f.write(chunk)
                hasher[0].update(chunk)
                self.traffic.blob_bytes_received += len(chunk)
                if progress:
                    progress(len(chunk))
            f.flush()
            return total is None or written == total
        finally:
            response.close()
            self._count_response(response)

    def upload_offset(self, digest: str) -> tuple[int, bool]:
        """(bytes of ``digest`` the peer already holds in a partial upload, whether it has the blob)."""
        data = self.request("GET", f"/uploads/{digest}").json()
        return int(data.get("offset", 0)), bool(data.get("complete", False))

    def upload_blob(self, digest: str, path: Path, progress: Callable[[int], None] | None = None) -> int:
        """Upload the blob file at ``path``, resuming a partial upload; returns payload bytes sent."""
        size = path.stat().st_size
        sent = 0
        last: Exception | None = None
        for attempt in self._attempts():
            try:
                offset, complete = self.upload_offset(digest)
                if complete:
                    return sent
                if offset > size:
                    offset = 0
                n = size - offset
                with open(path, "rb") as src:
                    src.seek(offset)

                    def body(src: Any = src) -> Iterator[bytes]:
                        while chunk := src.read(CHUNK):
                            self.traffic.blob_bytes_sent += len(chunk)
                            if progress:
                                progress(len(chunk))
                            yield chunk

                    request = self._http.build_request(
                        "PUT",
                        f"/blobs/{digest}",
                        params={"offset": offset, "size": size},
                        content=body(),
                        headers={"Content-Length": str(n)},
                    )
                    self._count_request(request, n)
                    response = self._http.send(request)
                    self._count_response(response)
                sent += n
                if response.status_code in (200, 201):
                    return sent
                if response.status_code in (202, 409):  # partial, or the offset moved: ask again
                    last = _error(response, "PUT", f"/blobs/{digest}")
                    continue
                if response.status_code not in _RETRY_STATUS:
                    raise _error(response, "PUT", f"/blobs/{digest}")
                last = _error(response, "PUT", f"/blobs/{digest}")
            except httpx.TransportError as exc:
                last = exc
            if attempt < self.retries:
                self._sleep(attempt)
        raise SyncError(f"could not upload blob {digest[:12]}… to {self.url}: {last}")


@contextlib.contextmanager
def _locked(part: Path) -> Iterator[Any]:
    part.parent.mkdir(parents=True, exist_ok=True)
    f = open(part, "a+b")  # noqa: SIM115
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(f"blob transfer into {part.name} already in progress") from None
        yield f
    finally:
        f.close()


_SSL: Any = None


def _ssl_context() -> Any:
    """One verifying TLS context per process (building one costs ~0.1 s)."""
    global _SSL
    if _SSL is None:
        _SSL = httpx.create_ssl_context()
    return _SSL


def _hash_prefix(f: Any, limit: int) -> Any:
    """A sha256 of what the partial file already holds (emptied first if it is longer than ``limit``)."""
    h = hashlib.sha256()
    size = f.seek(0, os.SEEK_END)
    if size > limit:
        f.truncate(0)
        return h
    f.seek(0)
    while chunk := f.read(CHUNK):
        h.update(chunk)
    return h


def _error(response: httpx.Response, method: str, path: str) -> PeerError:
    try:
        body = response.json()
    except ValueError:
        body = response.text[:200]
    detail = body.get("error") if isinstance(body, dict) else body
    if response.status_code == 401:
        hint = "give the peer's token with --token-file or $CONVERGENT_TOKEN"
    elif response.status_code == 403:
        hint = "the token is not accepted for this operation"
    else:
        hint = None
    return PeerError(f"{method} {path}: HTTP {response.status_code}: {detail}", response.status_code, body, hint)
