"""Liveness, readiness, Prometheus metrics and per-key usage JSON (/monitor/runtime is in monitor.py)."""

from __future__ import annotations

import asyncio
import re

from aiohttp import web

from gateway import metrics
from gateway.errors import bad_request
from gateway.http.appkeys import ACCOUNTANT, REDIS, SETTINGS, SUPERVISOR, USAGE
from gateway.http.auth import public, requires_scope
from gateway.http.errors import json_response
from gateway.keys import Scope
from gateway.redis_client import REDIS_OR_OS_ERRORS

_DAY = re.compile(r"^\d{8}$")


@public
async def health(request: web.Request) -> web.Response:
    """GET /health: the process is alive (no auth, no dependencies)."""
    return json_response({"status": "ok"})


async def redis_up(request: web.Request) -> bool:
    """True when Redis answers a PING within a second."""
    try:
        return bool(await asyncio.wait_for(request.app[REDIS].ping(), 1.0))
    except REDIS_OR_OS_ERRORS + (TimeoutError,):
        return False


@public
async def ready(request: web.Request) -> web.Response:
    """GET /ready: 200 when the realtime runtime is ready and Redis answers, else 503 saying which."""
    snap = request.app[SUPERVISOR].snapshot
    settings = request.app[SETTINGS]
    runtime_ok = snap.ready and snap.model == settings.realtime_model
    redis_ok = await redis_up(request)
    body = {"status": "ready" if runtime_ok and redis_ok else "not_ready",
            "runtime": {"state": snap.state.value, "model": snap.model, "ready": runtime_ok},
            "redis": "up" if redis_ok else "down"}
    headers = None if runtime_ok and redis_ok else {"Retry-After": str(snap.retry_after())}
    return json_response(body, status=200 if runtime_ok and redis_ok else 503, headers=headers)


@requires_scope(Scope.MONITOR)
async def prometheus(request: web.Request) -> web.Response:
    """GET /metrics: the Prometheus text format, or OpenMetrics when the Accept header prefers it."""
    metrics.USAGE_BUFFERED.set(request.app[ACCOUNTANT].buffered)
    metrics.ASYNCIO_TASKS.set(len(asyncio.all_tasks()))
    body, content_type = metrics.render(request.headers.get("Accept"))
    return web.Response(body=body, headers={"Content-Type": content_type, "Vary": "Accept"})


@requires_scope(Scope.MONITOR)
async def key_usage(request: web.Request) -> web.Response:
    """GET /monitor/key_usage?limit=50&bucket=YYYYMMDD: per-key usage, busiest first."""
    raw_limit = request.query.get("limit", "50")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 1000:
        raise bad_request("'limit' must be a whole number from 1 to 1000.", param="limit")
    bucket = request.query.get("bucket") or None
    if bucket is not None and not _DAY.match(bucket):
        raise bad_request("'bucket' must be a UTC day as YYYYMMDD, e.g. 20261127.", param="bucket")
    rows = await request.app[USAGE].top(limit=int(raw_limit), bucket=bucket)
    return json_response({"object": "list", "bucket": bucket, "data": rows,
                          "buffered_events": request.app[ACCOUNTANT].buffered})


def setup(app: web.Application) -> None:
    """Add the system and core monitor routes."""
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", prometheus)
    app.router.add_get("/monitor/key_usage", key_usage)
