"""OpenAI Batches API (batch scope): create, list, retrieve and cancel batches; starts the BatchManager.

    POST /v1/batches              {input_file_id, endpoint, completion_window: "24h", metadata, priority}
    GET  /v1/batches              the key's batches, newest first (?after=&limit=)
    GET  /v1/batches/<id>         one batch object
    POST /v1/batches/<id>/cancel  validating/in_progress -> cancelling -> cancelled

Each input line runs as a job of the batch queue (gateway/batch/); the manager
(gateway/openai_batches/manager.py) drives the lifecycle and writes the output and error files.
"""

from __future__ import annotations

import time

import orjson
from aiohttp import web

from gateway import metrics
from gateway.batch.jobs import METADATA_KEY_MAX, METADATA_VALUE_MAX, PRIORITY_MAX, PRIORITY_MIN, Endpoint
from gateway.errors import ApiError, DomainError, bad_request
from gateway.http.appkeys import API_KEY, BATCH_MANAGER, SETTINGS
from gateway.http.auth import requires_scope
from gateway.http.errors import json_response, list_params, parse_json_object
from gateway.http.files import owned_file
from gateway.http.fleet import requires_shared_uploads
from gateway.keys import Scope
from gateway.openai_batches.files import PURPOSE_INPUT, file_id, purpose_of
from gateway.openai_batches.records import BatchRecords, BatchStatus, batch_view, new_batch_id

COMPLETION_WINDOWS = ("24h",)
METADATA_MAX_ITEMS = 16


def _not_found(batch_id: str) -> ApiError:
    return ApiError(404, f"No batch with id '{batch_id}'.", code="batch_not_found", param="batch_id")


def _records(request: web.Request) -> BatchRecords:
    return request.app[BATCH_MANAGER].records


def _metadata(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > METADATA_MAX_ITEMS or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= METADATA_KEY_MAX and len(v) <= METADATA_VALUE_MAX
            for k, v in value.items()):
        raise bad_request(f"'metadata' must be an object of at most {METADATA_MAX_ITEMS} string pairs (keys up to "
                          f"{METADATA_KEY_MAX} characters, values up to {METADATA_VALUE_MAX}).", param="metadata")
    return dict(value)


@requires_scope(Scope.BATCH)
async def create_batch(request: web.Request) -> web.Response:
    """POST /v1/batches: check the request and the input file, store the batch (validating), wake the manager."""
    data = parse_json_object(await request.read())
    input_file_id = data.get("input_file_id")
    if not isinstance(input_file_id, str) or not input_file_id:
        raise bad_request("'input_file_id' is required: the id of a file uploaded with purpose 'batch'.",
                          param="input_file_id")
    endpoint = data.get("endpoint")
    endpoints = [e.value for e in Endpoint]
    if endpoint not in endpoints:
        raise bad_request(f"'endpoint' must be one of {', '.join(sorted(endpoints))}; got "
                          f"{orjson.dumps(endpoint).decode()}.", param="endpoint")
    window = data.get("completion_window")
    if window not in COMPLETION_WINDOWS:
        raise bad_request("'completion_window' must be \"24h\".", param="completion_window")
    metadata = _metadata(data.get("metadata"))
    priority = data.get("priority", 0)
    if priority is None:
        priority = 0
    if isinstance(priority, bool) or not isinstance(priority, int) or not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise bad_request(f"'priority' must be an integer from {PRIORITY_MIN} to {PRIORITY_MAX} (higher runs first).",
                          param="priority")
    try:
        info = owned_file(request, input_file_id)
    except DomainError as exc:
        exc.param = "input_file_id"
        raise
    if purpose_of(info) != PURPOSE_INPUT:
        raise bad_request(f"File '{input_file_id}' has purpose '{purpose_of(info)}'; a batch reads a file uploaded "
                          "with purpose 'batch'.", param="input_file_id")
    settings = request.app[SETTINGS]
    now = time.time()
    batch_id = new_batch_id(now)
    fields = {
        "id": batch_id, "key_id": request[API_KEY].id, "status": BatchStatus.VALIDATING.value,
        "endpoint": str(endpoint), "input_file_id": file_id(info.id), "completion_window": str(window),
        "metadata": orjson.dumps(metadata).decode(), "priority": str(priority), "created_at": repr(now),
        "expires_at": repr(now + settings.openai_batch_window_seconds), "total": "0", "jobs_completed": "0",
        "jobs_failed": "0", "invalid": "0",
    }
    manager = request.app[BATCH_MANAGER]
    await manager.records.create(fields)
    metrics.OPENAI_BATCHES.labels("created").inc()
    manager.wake(batch_id)
    return json_response(batch_view(fields))


@requires_scope(Scope.BATCH)
async def list_batches(request: web.Request) -> web.Response:
    """GET /v1/batches?after=&limit=: the caller's batches, newest first."""
    _, limit, after = list_params(request.query, cursor_prefix="batch_",
                                  cursor_what="a batch id (the last_id of a previous page)")
    page = await _records(request).list(request[API_KEY].id, limit=limit, after=after)
    data = [batch_view(b) for b in page.batches]
    return json_response({"object": "list", "data": data, "has_more": page.has_more,
                          "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})


@requires_scope(Scope.BATCH)
async def get_batch(request: web.Request) -> web.Response:
    """GET /v1/batches/{batch_id}: the batch object with its status and request counts."""
    batch_id = request.match_info["batch_id"]
    batch = await _records(request).get(batch_id, request[API_KEY].id)
    if batch is None:
        raise _not_found(batch_id)
    return json_response(batch_view(batch))


@requires_scope(Scope.BATCH)
async def cancel_batch(request: web.Request) -> web.Response:
    """POST /v1/batches/{batch_id}/cancel: stop a validating or in-progress batch (409 once finalizing or final)."""
    batch_id = request.match_info["batch_id"]
    records = _records(request)
    batch = await records.get(batch_id, request[API_KEY].id)
    if batch is None:
        raise _not_found(batch_id)
    result = await records.transition(batch_id, (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS),
                                      {"status": BatchStatus.CANCELLING.value, "cancelling_at": repr(time.time())})
    if result not in ("ok", BatchStatus.CANCELLING.value, BatchStatus.CANCELLED.value):
        raise ApiError(409, f"Batch '{batch_id}' is {result}; only a validating or in-progress batch can be "
                       "cancelled.", code="batch_not_cancellable")
    request.app[BATCH_MANAGER].wake(batch_id)
    batch = await records.get(batch_id) or batch
    return json_response(batch_view(batch))


def setup(app: web.Application) -> None:
    """Add the Batches API routes."""
    app.router.add_post("/v1/batches", requires_shared_uploads(create_batch))
    app.router.add_get("/v1/batches", requires_shared_uploads(list_batches))
    app.router.add_get("/v1/batches/{batch_id}", requires_shared_uploads(get_batch))
    app.router.add_post("/v1/batches/{batch_id}/cancel", requires_shared_uploads(cancel_batch))
