"""Batch job API: submit (POST /v1/batch/...), status, list and cancel (/v1/jobs); starts the dispatcher."""

from __future__ import annotations

from aiohttp import web

from gateway.batch.jobs import Endpoint, JobStatus, is_job_id, job_view, parse_submission
from gateway.errors import ApiError
from gateway.http.appkeys import (
    API_KEY,
    BATCH_QUEUE,
    SETTINGS,
)
from gateway.http.auth import requires_scope
from gateway.http.errors import json_response, list_params, parse_json_object
from gateway.keys import Scope
from gateway.policy import ModelPolicy


def _not_found(job_id: str) -> ApiError:
    # Another key's job answers exactly like a missing one: ids reveal nothing.
    return ApiError(404, f"No job with id '{job_id}'.", code="job_not_found", param="id")


def too_many_jobs(cap: int) -> ApiError:
    """429 for a key that already holds BATCH_KEY_MAX_JOBS jobs."""
    return ApiError(429, f"This key already holds {cap} batch jobs (BATCH_KEY_MAX_JOBS): wait for some to finish "
                    "and expire, or cancel some, before submitting more.", type="rate_limit_error",
                    code="too_many_jobs")


async def _submit(request: web.Request, endpoint: Endpoint) -> web.Response:
    settings = request.app[SETTINGS]
    data = parse_json_object(await request.read())
    submission = parse_submission(data, endpoint, max_metadata_items=settings.batch_max_metadata_items,
                                  policy=ModelPolicy.from_settings(settings))
    queue = request.app[BATCH_QUEUE]
    cap = settings.batch_key_max_jobs
    if await queue.held_jobs(request[API_KEY].id, at_least=cap) >= cap:
        raise too_many_jobs(cap)
    job = await request.app[BATCH_QUEUE].enqueue(request[API_KEY].id, submission)
    view = job_view(job, include_result=False)
    return json_response(view, status=202, headers={"Location": view["status_url"]})


@requires_scope(Scope.BATCH)
async def submit_completion(request: web.Request) -> web.Response:
    """POST /v1/batch/completions: queue a completions request."""
    return await _submit(request, Endpoint.COMPLETIONS)


@requires_scope(Scope.BATCH)
async def submit_chat_completion(request: web.Request) -> web.Response:
    """POST /v1/batch/chat/completions: queue a chat completions request."""
    return await _submit(request, Endpoint.CHAT_COMPLETIONS)


@requires_scope(Scope.BATCH)
async def submit_embedding(request: web.Request) -> web.Response:
    """POST /v1/batch/embeddings: queue an embeddings request."""
    return await _submit(request, Endpoint.EMBEDDINGS)


@requires_scope(Scope.BATCH)
async def submit_response(request: web.Request) -> web.Response:
    """POST /v1/batch/responses: queue a Responses API request (not streamed, not `background`)."""
    return await _submit(request, Endpoint.RESPONSES)


@requires_scope(Scope.BATCH)
async def get_job(request: web.Request) -> web.Response:
    """GET /v1/jobs/{id}: status, timings, attempts, error and (when completed) the runtime's answer."""
    job_id = request.match_info["job_id"]
    if not is_job_id(job_id):
        raise _not_found(job_id)
    queue = request.app[BATCH_QUEUE]
    job = await queue.get(job_id, request[API_KEY].id)
    if job is None:
        raise _not_found(job_id)
    return json_response(job_view(job, waiting_reason=await queue.explain(job)))


@requires_scope(Scope.BATCH)
async def list_jobs(request: web.Request) -> web.Response:
    """GET /v1/jobs?status=&model=&limit=&after=: the caller's jobs, newest first, cursor paginated."""
    query = request.query
    status, limit, after = list_params(query, cursor_prefix="job_", statuses=[s.value for s in JobStatus],
                                       cursor_what="the next_cursor of a previous page (a job id)")
    page = await request.app[BATCH_QUEUE].list(request[API_KEY].id, limit=limit, after=after, status=status,
                                               model=query.get("model") or None)
    data = [job_view(job, include_result=False) for job in page.jobs]
    return json_response({"object": "list", "data": data, "has_more": page.next_cursor is not None,
                          "next_cursor": page.next_cursor,
                          "first_id": data[0]["id"] if data else None,
                          "last_id": data[-1]["id"] if data else None})


@requires_scope(Scope.BATCH)
async def cancel_job(request: web.Request) -> web.Response:
    """DELETE /v1/jobs/{id}: cancel a queued or running job (409 once it has finished)."""
    job_id = request.match_info["job_id"]
    if not is_job_id(job_id):
        raise _not_found(job_id)
    outcome, job = await request.app[BATCH_QUEUE].cancel(job_id, request[API_KEY].id)
    if outcome == "missing" or job is None:
        raise _not_found(job_id)
    if outcome != "cancelled":
        raise ApiError(409, f"Job '{job_id}' is already {outcome.removeprefix('already:')}; only queued or "
                       "running jobs can be cancelled.",
                       code="job_finished")
    return json_response(job_view(job))


def setup(app: web.Application) -> None:
    """Add the batch job routes."""
    app.router.add_post("/v1/batch/completions", submit_completion)
    app.router.add_post("/v1/batch/chat/completions", submit_chat_completion)
    app.router.add_post("/v1/batch/embeddings", submit_embedding)
    app.router.add_post("/v1/batch/responses", submit_response)
    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_get("/v1/jobs/{job_id}", get_job)
    app.router.add_delete("/v1/jobs/{job_id}", cancel_job)
