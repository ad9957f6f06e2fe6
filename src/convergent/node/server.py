"""The node's HTTP API over a store (FastAPI).

Reads (open, or behind the read token)::

    GET  /v1/health                       liveness, version, gossip counters (always open)
    GET  /v1/sets                         [{id, name, strategy, root, live}]
    GET  /v1/sets/{id}/genesis            canonical genesis JSON (its sha256 is the set id)
    GET  /v1/sets/{id}/state              canonical SetState JSON
    GET  /v1/sets/{id}/root               {set_id, root, state_digest, live}
    GET  /v1/manifests/{id}               canonical manifest JSON (its sha256 is the id)
    GET  /v1/blobs/{digest}               the blob file; HEAD and single ``Range: bytes=`` supported
    POST /v1/missing                      {manifests, blobs} -> the subset this node lacks

Writes (write token)::

    PUT  /v1/manifests/{id}               verified against the id, then staged
    GET  /v1/uploads/{digest}             offset of a partial upload (to resume it)
    PUT  /v1/blobs/{digest}?offset=&size= append to a partial upload; staged once it hashes right
    POST /v1/sets/{id}/state              join a state (all its data must be here or staged first)

Uploads wait in a staging area (:mod:`convergent.node.staging`), outside the
store, until a pushed state that needs them passes every check.
    POST /v1/admin/partition              test-only (``$CONVERGENT_NODE_TEST_ADMIN=1``)

Every id in a path must be 64 lowercase hex characters before it is used to
build a path, so nothing outside the store can be named. Malformed input gets
a 4xx with ``{"error": ..., "hint": ...}``; refused content (bad hash, bad or
missing signature) gets 422 and nothing of it is kept.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from convergent import __version__
from convergent.errors import ConvergentError, IntegrityError, SignatureError, StoreError
from convergent.node.auth import bearer, token_matches
from convergent.node.client import NODE_HEADER, normalize_url
from convergent.sets.canonical import HEX64, sha256_hex

log = logging.getLogger("convergent.node")

#: Largest state or manifest body accepted (bytes).
MAX_META_BYTES = 64 << 20
#: Largest blob accepted by upload (bytes); override with $CONVERGENT_NODE_MAX_BLOB.
MAX_BLOB_BYTES = int(os.environ.get("CONVERGENT_NODE_MAX_BLOB", str(64 << 30)))
#: Most ids in one /missing query.
MAX_IDS = 1_000_000
#: Environment switch that enables the test-only admin routes.
ADMIN_ENV = "CONVERGENT_NODE_TEST_ADMIN"
#: With the admin switch: cap on blob serving speed in bytes/s (tests interrupt transfers with it).
THROTTLE_ENV = "CONVERGENT_NODE_TEST_THROTTLE"
CHUNK = 1 << 20
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class Partitions:
    """Peers this node refuses for a while (test-only partitions); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._until: dict[str, float] = {}

    def set(self, peers: list[str], seconds: float | None) -> None:
        until = time.monotonic() + seconds if seconds else float("inf")
        with self._lock:
            self._until = {normalize_url(p): until for p in peers}

    def refuses(self, peer: str | None) -> bool:
        if not peer:
            return False
        try:
            peer = normalize_url(peer)
        except ConvergentError:
            return False
        with self._lock:
            until = self._until.get(peer)
            if until is None:
                return False
            if time.monotonic() >= until:
                del self._until[peer]
                return False
            return True

    def active(self) -> list[str]:
        with self._lock:
            now = time.monotonic()
            return sorted(p for p, t in self._until.items() if t > now)


class NodeState:
    """Process-wide node facts shared by the app and the gossip loop."""

    def __init__(self, url: str | None = None):
        self.url = url
        self.partitions = Partitions()
        self.gossip: dict[str, Any] = {
            "running": False,
            "rounds": 0,
            "syncs": 0,
            "failures": 0,
            "refusals": 0,
            "changed_at_round": 0,
            "changed_at": None,
            "blob_bytes_received": 0,
            "blob_bytes_sent": 0,
            "bytes_received": 0,
            "bytes_sent": 0,
        }
        self.started = time.time()

    def note_change(self) -> None:
        """Record that a join changed this node's knowledge (for measuring convergence)."""
        self.gossip["changed_at_round"] = self.gossip["rounds"]
        self.gossip["changed_at"] = time.time()


class ApiError(Exception):
    def __init__(self, status: int, error: str, hint: str | None = None, **extra: Any):
        self.status = status
        self.error = error
        self.hint = hint
        self.extra = extra


def _hex(value: str, what: str) -> str:
    if not isinstance(value, str) or not HEX64.match(value):
        raise ApiError(400, f"{what} must be 64 lowercase hex characters (a sha256)")
    return value


def _status_for(exc: ConvergentError) -> int:
    if isinstance(exc, IntegrityError | SignatureError):
        return 422
    if isinstance(exc, StoreError):
        return 409
    return 400


def create_app(
    store: Any,
    write_token: str | None,
    read_token: str | None = None,
    *,
    node: NodeState | None = None,
    admin: bool | None = None,
) -> FastAPI:
    """The node's API over ``store``.

    ``write_token`` None: no writes at all. ``read_token`` None: reads are open.
    ``admin`` (default: ``$CONVERGENT_NODE_TEST_ADMIN=1``) enables test-only routes.
    """
    node = node or NodeState()
    if admin is None:
        admin = os.environ.get(ADMIN_ENV) == "1"
    # Test-only: serve blobs at most this many bytes per second (to interrupt transfers on purpose).
    throttle = int(os.environ.get(THROTTLE_ENV, "0") or 0) if admin else 0
    app = FastAPI(title="convergent node", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store
    app.state.node = node
    from convergent.node.staging import Staging

    staging = Staging(store)
    staging.sweep()

    # -- errors ----------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.error, "hint": exc.hint, **exc.extra}, status_code=exc.status)

    @app.exception_handler(ConvergentError)
    async def _conv_error(request: Request, exc: ConvergentError) -> JSONResponse:
        status = _status_for(exc)
        if status == 422:
            log.warning("refused %s %s from %s: %s", request.method, request.url.path, _who(request), exc.message)
        return JSONResponse({"error": exc.message, "hint": exc.hint}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))} for e in exc.errors()]
        return JSONResponse({"error": "malformed request", "hint": None, "details": errors[:20]}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail), "hint": None}, status_code=exc.status_code)

    @app.exception_handler(ValueError)
    async def _value(_: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse({"error": f"malformed input: {exc}"[:500], "hint": None}, status_code=400)

    # -- auth and partitions ---------------------------------------------
    app.add_middleware(_PartitionGate, node=node)

    def _presented(request: Request) -> str | None:
        return bearer(request.headers.get("authorization"))

    def need_read(request: Request) -> None:
        if read_token is None:
            return
        tok = _presented(request)
        if not (token_matches(tok, read_token) or token_matches(tok, write_token)):
            raise ApiError(401, "a read token is required", "send Authorization: Bearer <token>")

    def need_write(request: Request) -> None:
        if write_token is None:
            raise ApiError(403, "this node accepts no writes", "start it with --token-file to allow writes")
        tok = _presented(request)
        if tok is None:
            raise ApiError(401, "a write token is required", "send Authorization: Bearer <token>")
        if not token_matches(tok, write_token):
            raise ApiError(403, "wrong token")

    async def body_bytes(request: Request, limit: int = MAX_META_BYTES) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(400, "malformed Content-Length")
            if int(declared) > limit:
                raise ApiError(413, f"body too large (limit {limit} bytes)")
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"body too large (limit {limit} bytes)")
                chunks.append(chunk)
        except ClientDisconnect:
            raise ApiError(400, "client went away") from None
        return b"".join(chunks)

    def get_set(set_id: str) -> Any:
        _hex(set_id, "set id")
        try:
            return store.get_set(set_id)
        except StoreError:
            raise ApiError(404, f"no set {set_id[:12]}… here") from None

    # -- reads -----------------------------------------------------------
    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        return {
            "ok": True,
            "version": __version__,
            "node": node.url,
            "gossip": dict(node.gossip),
            "partitioned": node.partitions.active(),
            "uptime": round(time.time() - node.started, 3),
        }

    @app.get("/v1/sets")
    def list_sets(request: Request) -> list[dict[str, Any]]:
        need_read(request)
        return [
            {"id": s.id, "name": s.name, "strategy": s.strategy, "root": s.root, "live": s.live}
            for s in store.list_sets()
        ]

    @app.get("/v1/sets/{set_id}/genesis")
    def genesis(set_id: str, request: Request) -> Response:
        need_read(request)
        mset = get_set(set_id)
        return Response(mset.genesis.canonical(), media_type="application/json")

    @app.get("/v1/sets/{set_id}/state")
    def state(set_id: str, request: Request) -> Response:
        need_read(request)
        data = get_set(set_id).state().to_json()
        return Response(data, media_type="application/json", headers={"X-State-Digest": sha256_hex(data)})

    @app.get("/v1/sets/{set_id}/root")
    def root(set_id: str, request: Request) -> dict[str, Any]:
        need_read(request)
        st = get_set(set_id).state()
        return {"set_id": set_id, "root": st.root, "state_digest": sha256_hex(st.to_json()), "live": len(st.live())}

    @app.get("/v1/manifests/{manifest_id}")
    def manifest(manifest_id: str, request: Request) -> Response:
        need_read(request)
        _hex(manifest_id, "manifest id")
        if not store.has_manifest(manifest_id):
            raise ApiError(404, f"no manifest {manifest_id[:12]}… here")
        return Response(store.get_manifest_bytes(manifest_id), media_type="application/json")

    @app.api_route("/v1/blobs/{digest}", methods=["GET", "HEAD"])
    def blob(digest: str, request: Request) -> Response:
        need_read(request)
        path = store.blobs.path(_hex(digest, "blob digest"))
        try:
            f = open(path, "rb")  # noqa: SIM115
        except (FileNotFoundError, NotADirectoryError):
            raise ApiError(404, f"no blob {digest[:12]}… here") from None
        size = os.fstat(f.fileno()).st_size
        start, stop, status = 0, size, 200
        rng = request.headers.get("range")
        if rng:
            m = _RANGE.match(rng.strip())
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    start = int(m.group(1))
                    stop = min(int(m.group(2)) + 1, size) if m.group(2) else size
                else:
                    start = max(size - int(m.group(2)), 0)
                if start >= size or stop <= start:
                    f.close()
                    return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
                status = 206
        headers = {"Accept-Ranges": "bytes", "Content-Length": str(stop - start), "ETag": f'"{digest}"'}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        if request.method == "HEAD":
            f.close()
            return Response(status_code=status, headers=headers, media_type="application/octet-stream")

        rate = throttle

        def chunks() -> Iterator[bytes]:
            with f:
                f.seek(start)
                left = stop - start
                began, sent = time.monotonic(), 0
                while left > 0:
                    data = f.read(min(CHUNK if not rate else max(1, min(CHUNK, rate // 20)), left))
                    if not data:
                        return
                    left -= len(data)
                    sent += len(data)
                    yield data
                    if rate:
                        time.sleep(max(0.0, sent / rate - (time.monotonic() - began)))

        return StreamingResponse(chunks(), status_code=status, headers=headers, media_type="application/octet-stream")

    @app.post("/v1/missing")
    async def missing(request: Request) -> dict[str, Any]:
        need_read(request)
        import json

        try:
            data = json.loads(await body_bytes(request))
        except ValueError:
            raise ApiError(400, 'body must be JSON {"manifests": [...], "blobs": [...]}') from None
        if not isinstance(data, dict):
            raise ApiError(400, "body must be a JSON object")
        manifests, blobs = data.get("manifests", []), data.get("blobs", [])
        if not isinstance(manifests, list) or not isinstance(blobs, list) or len(manifests) + len(blobs) > MAX_IDS:
            raise ApiError(400, "manifests and blobs must be lists of at most a million ids")
        for x in [*manifests, *blobs]:
            _hex(x, "id")

        def work() -> dict[str, Any]:
            return {
                "manifests": sorted({m for m in manifests if not staging.has_manifest(m)}),
                "blobs": sorted({b for b in blobs if not staging.has_blob(b)}),
            }

        return await run_in_threadpool(work)

    # -- writes ----------------------------------------------------------
    @app.put("/v1/manifests/{manifest_id}")
    async def put_manifest(manifest_id: str, request: Request) -> JSONResponse:
        need_write(request)
        _hex(manifest_id, "manifest id")
        data = await body_bytes(request)
        if sha256_hex(data) != manifest_id:
            log.warning("refused manifest %s… from %s: bytes do not match the id", manifest_id[:12], _who(request))
            raise ApiError(422, f"manifest bytes do not hash to {manifest_id[:12]}…; nothing was kept")
        from convergent.store.store import parse_manifest

        try:
            parse_manifest(data, manifest_id)
        except IntegrityError as exc:
            log.warning("refused manifest %s… from %s: %s", manifest_id[:12], _who(request), exc.message)
            raise
        if not store.has_manifest(manifest_id):
            await run_in_threadpool(staging.put_manifest, manifest_id, data)
        return JSONResponse({"manifest": manifest_id, "staged": True}, status_code=201)

    def _upload_part(digest: str) -> Path:
        return staging.upload_path(digest)

    @app.get("/v1/uploads/{digest}")
    def upload_offset(digest: str, request: Request) -> dict[str, Any]:
        need_write(request)
        _hex(digest, "blob digest")
        if staging.has_blob(digest):
            return {"offset": 0, "complete": True}
        part = _upload_part(digest)
        return {"offset": part.stat().st_size if part.exists() else 0, "complete": False}

    @app.put("/v1/blobs/{digest}")
    async def put_blob(digest: str, request: Request, size: int, offset: int = 0) -> JSONResponse:
        need_write(request)
        _hex(digest, "blob digest")
        if size < 0 or offset < 0 or offset > size:
            raise ApiError(400, "need 0 <= offset <= size")
        if size > MAX_BLOB_BYTES:
            raise ApiError(413, f"blob too large (limit {MAX_BLOB_BYTES} bytes)")
        if staging.has_blob(digest):
            return JSONResponse({"blob": digest, "complete": True}, status_code=200)
        part = _upload_part(digest)
        part.parent.mkdir(parents=True, exist_ok=True)
        f = open(part, "a+b")  # noqa: SIM115
        locked = False
        try:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ApiError(409, "another upload of this blob is in progress", offset=None) from None
            try:
                same = os.stat(part).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # another upload finished and moved it away meanwhile
                raise ApiError(409, "another upload of this blob just finished; ask again", offset=None)
            locked = True
            have = f.seek(0, os.SEEK_END)
            if have > size:
                f.truncate(0)
                have = 0
            if offset != have:
                raise ApiError(409, f"upload offset is {have}, not {offset}", "resume from the offset", offset=have)
            hasher = await run_in_threadpool(_hash_prefix, f)
            try:
                async for chunk in request.stream():
                    if have + len(chunk) > size:
                        f.truncate(0)
                        have = 0
                        raise ApiError(400, "more bytes than the declared size; upload discarded")
                    f.write(chunk)
                    hasher.update(chunk)
                    have += len(chunk)
            except ClientDisconnect:
                f.flush()
                return JSONResponse({"blob": digest, "complete": False, "offset": have}, status_code=400)
            f.flush()
            if have < size:
                return JSONResponse({"blob": digest, "complete": False, "offset": have}, status_code=202)
            if hasher.hexdigest() != digest:
                f.truncate(0)
                log.warning("refused blob %s… from %s: bytes do not match the digest", digest[:12], _who(request))
                raise ApiError(422, f"blob bytes do not hash to {digest[:12]}…; nothing was kept")
            staging.stage_blob(part, digest)  # verified; moves into the store with a state that needs it
            return JSONResponse({"blob": digest, "complete": True, "staged": True}, status_code=201)
        finally:
            if locked and part.exists() and os.fstat(f.fileno()).st_size == 0:
                part.unlink(missing_ok=True)  # nothing received: leave no trace
            f.close()

    @app.post("/v1/sets/{set_id}/state")
    async def push_state(set_id: str, request: Request) -> JSONResponse:
        need_write(request)
        _hex(set_id, "set id")
        data = await body_bytes(request)
        from convergent.node.sync import receive_state

        try:
            result = await run_in_threadpool(receive_state, store, set_id, data, _who(request), staging)
        except (SignatureError, IntegrityError) as exc:
            log.warning("refused state for %s… from %s: %s", set_id[:12], _who(request), exc.message)
            raise
        status = 409 if result.get("missing") else 200
        if result.get("changed"):
            node.note_change()
        return JSONResponse(result, status_code=status)

    # -- test-only -------------------------------------------------------
    if admin:

        @app.post("/v1/admin/partition")
        async def partition(request: Request) -> dict[str, Any]:
            need_write(request)
            import json

            try:
                data = json.loads(await body_bytes(request, 1 << 20))
                peers = [str(p) for p in data.get("refuse", [])]
                seconds = data.get("seconds")
                seconds = float(seconds) if seconds is not None else None
            except (ValueError, TypeError, AttributeError):
                raise ApiError(400, 'body must be {"refuse": [url, ...], "seconds": n}') from None
            node.partitions.set(peers, seconds)
            log.info("partition: refusing %s for %s s", peers, seconds)
            return {"refusing": node.partitions.active(), "rounds": node.gossip["rounds"]}

    return app


class _PartitionGate:
    """ASGI middleware: refuse requests from peers this node is partitioned from (test-only)."""

    def __init__(self, app: Any, node: NodeState):
        self.app = app
        self.node = node

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") != "/v1/health":
            header = NODE_HEADER.lower().encode()
            peer = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == header), None)
            if peer and self.node.partitions.refuses(peer):
                response = JSONResponse({"error": "partitioned: this node refuses your requests for now"}, 403)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _hash_prefix(f: Any) -> Any:
    h = hashlib.sha256()
    f.seek(0)
    while chunk := f.read(CHUNK):
        h.update(chunk)
    return h


def _who(request: Request) -> str:
    peer = request.headers.get(NODE_HEADER)
    host = request.client.host if request.client else "?"
    return f"{peer} ({host})" if peer else host
