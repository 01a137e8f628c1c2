"""TUS 1.0.0 routes under /v1/upload/ (upload scope; OPTIONS is public discovery).

    OPTIONS /v1/upload/        server capabilities (Tus-Version, Tus-Extension, Tus-Max-Size, ...)
    POST    /v1/upload/        creation (+ creation-with-upload, creation-defer-length, concatenation)
                               -> 201 Location
    HEAD    /v1/upload/<id>    offset, length, metadata, expiry (Cache-Control: no-store)
    PATCH   /v1/upload/<id>    append bytes at Upload-Offset (checksum optional)
    DELETE  /v1/upload/<id>    termination

A POST to /v1/upload/<id> with X-HTTP-Method-Override acts as the overriding method. Bodies are
streamed to disk piece by piece, never read whole: chunks may be far above the realtime body
limit (client_max_size). Errors are OpenAI-shaped JSON with the status TUS prescribes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.http.appkeys import API_KEY, REDIS, REDIS_KEYS, SETTINGS, UPLOADS
from gateway.http.auth import public, requires_scope
from gateway.http.fleet import requires_shared_uploads
from gateway.keys import ApiKey, Scope
from gateway.openai_batches.files import file_id
from gateway.openai_batches.records import file_in_use
from gateway.redis_client import REDIS_ERRORS
from gateway.uploads import BodyInterrupted, UploadError, UploadStore
from gateway.uploads.errors import (
    FinalUploadImmutable,
    InvalidUploadRequest,
    MethodNotAllowed,
    StoreUnavailable,
    UploadInUse,
    UploadTooLarge,
)
from gateway.uploads.protocol import (
    check_offset_content_type,
    check_version,
    effective_method,
    http_date,
    non_negative,
    options_headers,
    parse_checksum,
    parse_creation,
    version_headers,
)
from gateway.uploads.store import UploadInfo

log = structlog.get_logger(component="uploads")

BASE_PATH = "/v1/upload/"
READ_PIECE = 256 * 1024
"""Bytes read from the request stream at a time: small enough to bound memory per request."""

_Handler = Callable[[web.Request, str], Awaitable[web.StreamResponse]]


def upload_url(upload_id: str) -> str:
    """The (relative) URL of an upload, as given in Location."""
    return f"{BASE_PATH}{upload_id}"


# --- handlers
@public
async def options(request: web.Request) -> web.Response:
    """OPTIONS: what this server supports. Public: it says nothing about any upload or key."""
    return web.Response(status=204, headers=options_headers(request.app[SETTINGS].upload_max_size))


@requires_scope(Scope.UPLOAD)
async def collection(request: web.Request) -> web.StreamResponse:
    """POST /v1/upload/: create an upload (possibly with its first bytes)."""
    return await _tus(request, _collection)


@requires_scope(Scope.UPLOAD)
async def resource(request: web.Request) -> web.StreamResponse:
    """HEAD/PATCH/DELETE /v1/upload/<id> (or POST with X-HTTP-Method-Override)."""
    return await _tus(request, _resource)


async def _tus(request: web.Request, handler: _Handler) -> web.StreamResponse:
    try:
        method = effective_method(request.method, request.headers)
        if method == "OPTIONS":
            return await options(request)
        check_version(request.headers)
        response = await handler(request, method)
    except UploadError as exc:
        # The middleware answers it; TUS asks for its version headers on errors too.
        exc.headers.update(version_headers())
        if request.method == "HEAD":
            exc.headers["Cache-Control"] = "no-store"
        raise
    response.headers.update(version_headers())
    return response


async def _collection(request: web.Request, method: str) -> web.StreamResponse:
    if method != "POST":
        raise MethodNotAllowed(f"{method} is not allowed on {BASE_PATH}; create uploads with POST.",
                               headers={"Allow": "POST, OPTIONS"})
    store, key, settings = request.app[UPLOADS], _key(request), request.app[SETTINGS]
    creation = parse_creation(request.headers, base_path=BASE_PATH,
                              max_metadata_chars=settings.upload_metadata_max_bytes,
                              max_parts=settings.upload_concat_max_parts)
    with_body = request.body_exists and request.content_length != 0
    checksum = None
    if creation.concat == "final":
        if with_body:
            raise FinalUploadImmutable("A final upload (Upload-Concat: final;...) is made from its partial uploads "
                                       "and takes no body; nothing was created.")
        info = await store.concatenate(key.id, creation.parts, creation.metadata)
        return web.Response(status=201, headers={"Location": upload_url(info.id), "Upload-Offset": str(info.offset)})
    if with_body:
        check_offset_content_type(request.headers.get("Content-Type", ""))
        checksum = parse_checksum(request.headers)
        # Refused before anything is created, so a too-large first chunk leaves nothing behind.
        if (creation.length is not None and request.content_length is not None
                and request.content_length > creation.length):
            raise UploadTooLarge(f"The body has {request.content_length} bytes, more than the Upload-Length "
                                 f"of {creation.length}.")
    info = await store.create(key.id, creation.length, creation.metadata, partial=creation.concat == "partial")
    headers = {"Location": upload_url(info.id)}
    if with_body:
        try:
            info = await store.append(info.id, offset=0, chunks=_body(request),
                                      content_length=request.content_length, checksum=checksum)
        except UploadError as exc:
            # The upload exists even though its first chunk was refused: say where it is.
            exc.headers.update(headers, **{"Upload-Offset": "0"})
            raise
        except BodyInterrupted:
            info = store.get(info.id) or info
        headers["Upload-Offset"] = str(info.offset)
    headers.update(_expiry_headers(info))
    return web.Response(status=201, headers=headers)


async def _resource(request: web.Request, method: str) -> web.StreamResponse:
    store, key = request.app[UPLOADS], _key(request)
    upload_id = request.match_info["upload_id"]
    if method == "HEAD":
        return _head(store, store.lookup(upload_id, key.id))
    if method == "PATCH":
        return await _patch(request, store, store.lookup(upload_id, key.id))
    if method == "DELETE":
        info = store.lookup(upload_id, key.id)
        try:
            in_use = await file_in_use(request.app[REDIS], request.app[REDIS_KEYS], file_id(info.id), key.id)
        except REDIS_ERRORS:
            raise StoreUnavailable("Cannot check whether a batch reads this upload: the batch store (Redis) is "
                                   "unreachable right now; retry shortly.", headers={"Retry-After": "5"}) from None
        if in_use:
            raise UploadInUse(f"Upload '{info.id}' is the input file of a batch that has not finished; cancel the "
                              "batch or wait for it to end before terminating the upload.")
        await store.delete(info.id)
        return web.Response(status=204)
    raise MethodNotAllowed(f"{method} is not allowed on an upload URL; use HEAD, PATCH or DELETE.",
                           headers={"Allow": "HEAD, PATCH, DELETE, OPTIONS"})


def _head(store: UploadStore, info: UploadInfo) -> web.Response:
    store.repair(info)
    headers = {"Upload-Offset": str(info.offset), "Cache-Control": "no-store"}
    if info.length is not None:
        headers["Upload-Length"] = str(info.length)
    else:
        headers["Upload-Defer-Length"] = "1"
    if info.metadata.header:
        headers["Upload-Metadata"] = info.metadata.header
    if info.concat == "partial":
        headers["Upload-Concat"] = "partial"
    elif info.concat == "final":
        headers["Upload-Concat"] = "final;" + " ".join(upload_url(part) for part in info.parts)
    headers.update(_expiry_headers(info))
    return web.Response(status=200, headers=headers)


async def _patch(request: web.Request, store: UploadStore, info: UploadInfo) -> web.Response:
    check_offset_content_type(request.headers.get("Content-Type", ""))
    offset = non_negative(request.headers, "Upload-Offset")
    if offset is None:
        raise InvalidUploadRequest("A PATCH needs the Upload-Offset header (ask HEAD for the current offset).",
                                   code="missing_upload_offset")
    length = non_negative(request.headers, "Upload-Length")
    checksum = parse_checksum(request.headers)
    try:
        info = await store.append(info.id, offset=offset, chunks=_body(request),
                                  content_length=request.content_length, length=length, checksum=checksum)
    except BodyInterrupted as exc:
        # The client has most likely gone; if it can still read, it learns to ask HEAD.
        log.info("upload_body_interrupted", upload_id=info.id, detail=str(exc))
        raise InvalidUploadRequest("The request body ended before Content-Length bytes arrived; ask HEAD "
                                   "for the offset and resume.", code="incomplete_body") from None
    return web.Response(status=204, headers={"Upload-Offset": str(info.offset), **_expiry_headers(info)})


# --- helpers
def _key(request: web.Request) -> ApiKey:
    key: ApiKey = request[API_KEY]
    return key


async def _body(request: web.Request) -> AsyncIterator[bytes]:
    """The request body piece by piece; a connection lost or stalled (CLIENT_BODY_TIMEOUT) mid-body becomes
    BodyInterrupted, so the store keeps exactly the bytes received."""
    idle = request.app[SETTINGS].client_body_timeout
    try:
        while True:
            async with asyncio.timeout(idle):
                piece = await request.content.read(READ_PIECE)
            if not piece:
                return
            yield piece
    except TimeoutError:
        raise BodyInterrupted(f"no body bytes for {idle:g} s (CLIENT_BODY_TIMEOUT)") from None
    except (ConnectionError, aiohttp.ClientPayloadError, HttpProcessingError) as exc:
        raise BodyInterrupted(str(exc) or type(exc).__name__) from exc


def _expiry_headers(info: UploadInfo) -> dict[str, str]:
    if info.expires_at is None:  # finished (a partial upload keeps its expiry until it is concatenated)
        return {}
    return {"Upload-Expires": http_date(info.expires_at)}


def setup(app: web.Application) -> None:
    """Add the TUS routes."""
    router = app.router
    for path in (BASE_PATH, BASE_PATH.rstrip("/")):
        router.add_route("OPTIONS", path, options)
        router.add_route("POST", path, requires_shared_uploads(collection))
    item = BASE_PATH + "{upload_id}"
    router.add_route("OPTIONS", item, options)
    for method in ("HEAD", "PATCH", "DELETE", "POST"):
        router.add_route(method, item, requires_shared_uploads(resource))
