"""OpenAI Files API (batch scope): upload, list, read, download and delete files.

    POST   /v1/files               multipart `file` + `purpose=batch`; streamed to the upload store
    GET    /v1/files               the key's files (?purpose=&limit=&after=&order=)
    GET    /v1/files/<id>          one file object
    GET    /v1/files/<id>/content  the bytes, streamed
    DELETE /v1/files/<id>          remove it (409 while a batch still reads it)

A file is a finished upload of the upload store (`file-<upload id>`), so a TUS upload made by a key
that also holds the batch scope shows up here without a copy. Another key's file is a 404.
"""

from __future__ import annotations

import asyncio
import unicodedata
from collections.abc import AsyncIterator
from urllib.parse import quote

import aiohttp
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.errors import ApiError, bad_request
from gateway.http.appkeys import API_KEY, REDIS, REDIS_KEYS, SETTINGS, UPLOADS
from gateway.http.auth import requires_scope
from gateway.http.errors import json_response, parse_limit
from gateway.http.fleet import requires_shared_uploads
from gateway.keys import Scope
from gateway.openai_batches.files import (
    DEFAULT_FILENAME,
    PURPOSE_INPUT,
    file_id,
    file_object,
    make_metadata,
    purpose_of,
    upload_id_of,
)
from gateway.openai_batches.records import file_in_use
from gateway.uploads import BodyInterrupted, UploadError, UploadInfo
from gateway.uploads.errors import UploadNotFinished
from gateway.uploads.metadata import parse_metadata

READ_PIECE = 256 * 1024
SMALL_FIELD_MAX = 1024
LIST_LIMIT_DEFAULT = 10_000
LIST_LIMIT_MAX = 10_000
PURPOSES = (PURPOSE_INPUT, "batch_output")


_ATTR_CHARS = "!#$&+-.^_`|~"
"""RFC 5987 attr-chars besides letters and digits: what filename* may carry unescaped."""


def content_disposition(filename: str) -> str:
    """An RFC 6266 `attachment` header value for a stored file name, safe whatever the name holds.

    The name is the client's own (a multipart part or TUS metadata), so it may hold quotes, backslashes
    or non-ASCII text. `filename*` carries it exactly (RFC 5987, UTF-8, percent-encoded); `filename`
    is an ASCII stand-in for clients that ignore `filename*`, with anything that could end the quoted
    string or is not printable ASCII replaced, so the header stays one parameter pair and pure ASCII.
    """
    # Accents fold away (é -> e); whatever else is not plain printable ASCII becomes "_".
    folded = (c for c in unicodedata.normalize("NFKD", filename) if not unicodedata.combining(c))
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\%' else "_" for c in folded).strip() or "download"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe=_ATTR_CHARS)}"


def _not_found(raw_id: str) -> ApiError:
    # Another key's file answers exactly like a missing one.
    return ApiError(404, f"No file with id '{raw_id}'.", code="file_not_found", param="file_id")


def owned_file(request: web.Request, raw_id: str) -> UploadInfo:
    """The caller's finished file with this id; 404 for unknown or another key's, 409 while unfinished."""
    upload_id = upload_id_of(raw_id)
    info = request.app[UPLOADS].get(upload_id) if upload_id else None
    if info is None or info.key_id != request[API_KEY].id or info.concat == "partial":
        raise _not_found(raw_id)  # a partial upload is a piece of a file to be, never a file
    if not info.finished:
        raise UploadNotFinished(f"File '{raw_id}' is a TUS upload with {info.offset} of "
                                f"{info.length if info.length is not None else 'an unknown number of'} "
                                "bytes; finish the upload before using it as a file.")
    return info


async def _part_chunks(part: BodyPartReader, deadline: asyncio.Timeout, idle: float) -> AsyncIterator[bytes]:
    try:
        while piece := await part.read_chunk(READ_PIECE):
            # An idle deadline, not a total one: a big file may take long as long as bytes keep coming.
            deadline.reschedule(asyncio.get_running_loop().time() + idle)
            yield piece
    except (ConnectionError, aiohttp.ClientPayloadError, HttpProcessingError) as exc:
        raise BodyInterrupted(str(exc) or type(exc).__name__) from exc


async def _small_field(part: BodyPartReader, name: str) -> str:
    data = bytearray()
    while piece := await part.read_chunk(SMALL_FIELD_MAX):
        data += piece
        if len(data) > SMALL_FIELD_MAX:
            raise bad_request(f"The form field '{name}' is too long.", param=name)
    return data.decode(errors="replace").strip()


def _file_metadata(part: BodyPartReader) -> dict[str, str]:
    filename = (part.filename or DEFAULT_FILENAME).replace("\\", "/").rsplit("/", 1)[-1] or DEFAULT_FILENAME
    values = {"filename": filename, "purpose": PURPOSE_INPUT}
    content_type = part.headers.get("Content-Type", "").split(";")[0].strip()
    if content_type:
        values["filetype"] = content_type
    try:
        parse_metadata(make_metadata(values).header)  # the TUS rules for filename and filetype
    except UploadError:
        values.pop("filetype", None)
        try:
            parse_metadata(make_metadata(values).header)
        except UploadError as exc:
            raise bad_request(f"The file's name cannot be used: {exc.message}", param="file") from None
    return values


@requires_scope(Scope.BATCH)
async def create_file(request: web.Request) -> web.Response:
    """POST /v1/files: store the multipart `file` part (streamed, never read whole) with purpose `batch`."""
    if not request.content_type.startswith("multipart/"):
        raise bad_request("Send the file as multipart/form-data with the fields 'file' and 'purpose' "
                          "(purpose=batch).", param="file")
    store = request.app[UPLOADS]
    key_id = request[API_KEY].id
    purpose: str | None = None
    info: UploadInfo | None = None
    idle = request.app[SETTINGS].client_body_timeout
    try:
        async with asyncio.timeout(idle) as deadline:
            try:
                reader = await request.multipart()
                while (part := await reader.next()) is not None:
                    if not isinstance(part, BodyPartReader):
                        raise bad_request("Nested multipart bodies are not supported.", param="file")
                    if part.name == "purpose":
                        purpose = await _small_field(part, "purpose")
                        if purpose != PURPOSE_INPUT:
                            raise bad_request(f"purpose {purpose!r} is not supported; files are uploaded with purpose "
                                              "'batch'.", param="purpose")
                    elif part.name == "file":
                        if info is not None:
                            raise bad_request("Send exactly one 'file' field.", param="file")
                        metadata = make_metadata(_file_metadata(part))
                        info = await store.put(key_id, _part_chunks(part, deadline, idle), metadata)
                    else:
                        await part.release()  # unknown fields (e.g. expires_after) are accepted and ignored
            except BodyInterrupted:
                raise bad_request("The request body ended before the multipart form was complete.") from None
            except (ValueError, AssertionError, HttpProcessingError) as exc:
                if info is not None:
                    await store.delete(info.id)
                raise bad_request(f"The multipart body cannot be read: {exc}.") from None
            except BaseException:
                if info is not None:
                    await store.delete(info.id)
                raise
    except TimeoutError:
        # store.put already removed the partial file (its write was cancelled).
        raise ApiError(408, f"The multipart body stalled for {idle:g} s (CLIENT_BODY_TIMEOUT).",
                       code="body_timeout", headers={"Connection": "close"}) from None
    if info is None or purpose is None:
        if info is not None:
            await store.delete(info.id)
        missing = "file" if info is None else "purpose"
        raise bad_request(f"The form field '{missing}' is required (file=<your JSONL>, purpose=batch).",
                          param=missing)
    return json_response(file_object(info))


@requires_scope(Scope.BATCH)
async def list_files(request: web.Request) -> web.Response:
    """GET /v1/files: the caller's finished files, newest first (order=asc for oldest first)."""
    query = request.query
    purpose = query.get("purpose") or None
    if purpose is not None and purpose not in PURPOSES:
        raise bad_request(f"'purpose' must be one of {', '.join(PURPOSES)}.", param="purpose")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad_request("'order' must be asc or desc.", param="order")
    limit = parse_limit(query, default=LIST_LIMIT_DEFAULT, maximum=LIST_LIMIT_MAX)
    files = [i for i in request.app[UPLOADS].list_for_key(request[API_KEY].id)
             if i.is_file and (purpose is None or purpose_of(i) == purpose)]
    files.sort(key=lambda i: (i.created_at, i.id), reverse=order == "desc")
    after = query.get("after")
    if after:
        ids = [file_id(i.id) for i in files]
        if after not in ids:
            raise bad_request(f"'after' must be the id of one of your files; {after!r} is not.", param="after")
        files = files[ids.index(after) + 1:]
    page = [file_object(i) for i in files[:limit]]
    return json_response({"object": "list", "data": page, "has_more": len(files) > limit,
                          "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None})


@requires_scope(Scope.BATCH)
async def get_file(request: web.Request) -> web.Response:
    """GET /v1/files/{file_id}: the file object."""
    return json_response(file_object(owned_file(request, request.match_info["file_id"])))


@requires_scope(Scope.BATCH)
async def file_content(request: web.Request) -> web.StreamResponse:
    """GET /v1/files/{file_id}/content: the bytes, streamed from disk piece by piece."""
    info = owned_file(request, request.match_info["file_id"])
    store = request.app[UPLOADS]
    chunks = store.iter_finished(info.id)
    response = web.StreamResponse(headers={
        "Content-Type": info.metadata.filetype or "application/octet-stream",
        "Content-Disposition": content_disposition(str(file_object(info)["filename"]))})
    response.content_length = info.size
    try:
        try:
            # The first read opens the file: once open, a concurrent delete cannot cut the download short.
            first = await anext(chunks, b"")
        except (UploadError, FileNotFoundError):
            raise _not_found(request.match_info["file_id"]) from None
        await response.prepare(request)
        if first:
            await response.write(first)
        async for piece in chunks:
            await response.write(piece)
    finally:
        await chunks.aclose()
    await response.write_eof()
    return response


@requires_scope(Scope.BATCH)
async def delete_file(request: web.Request) -> web.Response:
    """DELETE /v1/files/{file_id}: remove the file; 409 while an unfinished batch reads it."""
    raw_id = request.match_info["file_id"]
    upload_id = upload_id_of(raw_id)
    info = request.app[UPLOADS].get(upload_id) if upload_id else None
    if info is None or info.key_id != request[API_KEY].id or info.concat == "partial":
        raise _not_found(raw_id)
    if await file_in_use(request.app[REDIS], request.app[REDIS_KEYS], file_id(info.id), request[API_KEY].id):
        raise ApiError(409, f"File '{raw_id}' is the input of a batch that has not finished; cancel the batch or "
                       "wait for it to end first.", code="file_in_use", param="file_id")
    await request.app[UPLOADS].delete(info.id)
    return json_response({"id": file_id(info.id), "object": "file", "deleted": True})


def setup(app: web.Application) -> None:
    """Add the Files API routes (the upload store comes from the uploads route family)."""
    app.router.add_post("/v1/files", requires_shared_uploads(create_file))
    app.router.add_get("/v1/files", requires_shared_uploads(list_files))
    app.router.add_get("/v1/files/{file_id}", requires_shared_uploads(get_file))
    app.router.add_delete("/v1/files/{file_id}", requires_shared_uploads(delete_file))
    app.router.add_get("/v1/files/{file_id}/content", requires_shared_uploads(file_content))
