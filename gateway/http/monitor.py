"""Monitor JSON: one endpoint per dashboard page, for the dashboard's live updates and for scripts.

GET /monitor/overview, /monitor/jobs, /monitor/jobs/{id}, /monitor/evals, /monitor/keys, /monitor/runtime,
/monitor/runtime/crash_logs/{name}; DELETE /monitor/jobs/{id} cancels any key's job. All need the
monitor scope (a bearer key, or the dashboard session cookie plus its CSRF token for the DELETE).
"""

from __future__ import annotations

import math
import re
import stat
import time
from typing import Any

import orjson
import structlog
from aiohttp import web

from gateway.batch.jobs import JobStatus, is_job_id, job_view
from gateway.errors import ApiError, bad_request
from gateway.http.appkeys import (
    ACTIVITY,
    API_KEY,
    BATCH_QUEUE,
    DISPATCHER,
    EVAL_RUNNER,
    SETTINGS,
    SUPERVISOR,
    TRAFFIC,
    USAGE,
)
from gateway.http.auth import requires_scope
from gateway.http.errors import json_response, parse_limit
from gateway.keys import Scope
from gateway.redis_client import REDIS_ERRORS
from gateway.usage_store import FIELDS as USAGE_FIELDS
from gateway.usage_store import utc_days

log = structlog.get_logger(component="monitor")

JOBS_LIMIT_DEFAULT = 50
JOBS_LIMIT_MAX = 200
USAGE_DAYS = 30
USAGE_MAX_KEYS = 200
QUEUE_PRIORITY_SCAN_MAX = 5000
EVENTS_SCAN = 500
CRASH_LOGS_LISTED = 100
CRASH_LOG_MAX_BYTES = 512 * 1024
_CRASH_LOG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,250}\.log$")


# --- helpers
def _priority_order(counts: dict[str, int]) -> dict[str, int]:
    """Priorities highest first, "unknown" last."""
    return dict(sorted(counts.items(), key=lambda kv: (not kv[0].isdigit(), -int(kv[0]) if kv[0].isdigit() else 0)))


# --- runtime
def runtime_view(app: web.Application) -> dict[str, Any]:
    """The supervisor's snapshot as JSON (the fields /monitor/runtime always had)."""
    snap = app[SUPERVISOR].snapshot
    return {"state": snap.state.value, "model": snap.model, "since": snap.since,
            "uptime_seconds": round(time.time() - snap.since, 3), "last_error": snap.last_error,
            "restarts": snap.restarts, "ready_eta": snap.ready_eta, "last_crash_log": snap.last_crash_log,
            "realtime_model": app[SETTINGS].realtime_model}


def runtime_history(app: web.Application) -> list[dict[str, Any]]:
    """State changes of the runtime, newest first."""
    history = app[SUPERVISOR].history
    return [{"at": e.at, "state": e.state.value, "model": e.model, "error": e.error} for e in reversed(history)]


def last_swap(app: web.Application) -> dict[str, Any] | None:
    """When the runtime last began replacing its model, and with which one."""
    for event in runtime_history(app):
        if event["state"] == "swapping":
            return {"at": event["at"], "model": event["model"]}
    return None


def crash_logs(app: web.Application) -> list[dict[str, Any]]:
    """The newest crash logs in the failure directory: name, size, modification time."""
    directory = app[SETTINGS].failure_dir
    found: list[dict[str, Any]] = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return []
    for path in entries:
        if not _CRASH_LOG_NAME.match(path.name):
            continue
        try:
            info = path.lstat()  # a symlink is not a crash log the supervisor wrote: not listed, not read
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode):
            found.append({"name": path.name, "size": info.st_size, "modified": info.st_mtime})
    found.sort(key=lambda e: (-e["modified"], e["name"]))
    return found[:CRASH_LOGS_LISTED]


def read_crash_log(app: web.Application, name: str) -> dict[str, Any]:
    """The text of one crash log (its last CRASH_LOG_MAX_BYTES); 404 for anything outside the directory."""
    missing = ApiError(404, f"No crash log named '{name[:100]}'.", code="crash_log_not_found", param="name")
    if not _CRASH_LOG_NAME.match(name):
        raise missing
    directory = app[SETTINGS].failure_dir
    try:
        root = directory.resolve(strict=True)
        path = (directory / name).resolve(strict=True)
    except (OSError, RuntimeError):
        raise missing from None
    # Resolving follows symlinks, so a link inside the directory cannot point the reader elsewhere.
    if path.parent != root or not path.is_file():
        raise missing
    size = path.stat().st_size
    with path.open("rb") as handle:
        if size > CRASH_LOG_MAX_BYTES:
            handle.seek(size - CRASH_LOG_MAX_BYTES)
        data = handle.read(CRASH_LOG_MAX_BYTES)
    return {"name": name, "size": size, "truncated": size > CRASH_LOG_MAX_BYTES,
            "content": data.decode("utf-8", errors="replace")}


# --- batch queue (the queue owns its Redis schema: everything here goes through JobQueue)
async def queue_depth(app: web.Application) -> dict[str, Any]:
    """Queued jobs by model and by priority (priorities read from at most QUEUE_PRIORITY_SCAN_MAX per model)."""
    depth = await app[BATCH_QUEUE].depth(QUEUE_PRIORITY_SCAN_MAX)
    totals: dict[str, int] = {}
    for tally in depth.by_priority.values():
        for priority, count in tally.items():
            totals[priority] = totals.get(priority, 0) + count
    rows = [{"model": model, "queued": count, "by_priority": _priority_order(depth.by_priority.get(model, {}))}
            for model, count in sorted(depth.by_model.items())]
    return {"total": depth.total, "by_model": rows, "by_priority": _priority_order(totals),
            "complete": "unknown" not in totals}


async def batch_activity(app: web.Application) -> dict[str, Any]:
    """Batch requests in flight: across every gateway (leases) and in this one (the dispatcher)."""
    dispatcher = app.get(DISPATCHER)
    status = dispatcher.status() if dispatcher is not None else None
    return {"running": await app[BATCH_QUEUE].running_count(),
            "in_flight_here": status.in_flight if status else 0,
            "slots": app[SETTINGS].max_concurrent_batch, "dispatcher_enabled": status is not None,
            "group": status.group if status else None}


COSERVE_SERIES_POINTS = 150


def coserve_view(app: web.Application) -> dict[str, Any] | None:
    """Co-serving for the overview: the batch limit now and why, realtime TTFT/ITL p95 against their SLOs,
    and the controller's recent decisions (the last minutes, at most COSERVE_SERIES_POINTS points)."""
    dispatcher = app.get(DISPATCHER)
    if dispatcher is None:
        return None
    settings = app[SETTINGS]
    status = dispatcher.status()
    history = dispatcher.coserve_history()
    to_wall = time.time() - time.monotonic()  # decisions are stamped with the monotonic clock
    step = max(1, math.ceil(len(history) / COSERVE_SERIES_POINTS))
    sampled = history[::step]
    if history and sampled[-1] is not history[-1]:
        sampled.append(history[-1])
    last_change = next((d for d in reversed(history) if d.changed), None)
    activity = app[ACTIVITY]
    ttft, itl = activity.ttft.quantile(0.95), activity.itl.quantile(0.95)
    return {
        "adaptive": settings.coserve_adaptive, "limit": status.limit, "max_limit": status.slots,
        "reason": status.limit_reason,
        "last_change": ({"at": last_change.at + to_wall, "limit": last_change.limit, "reason": last_change.reason}
                        if last_change is not None else None),
        "ttft_p95_ms": ttft * 1000 if ttft is not None else None, "ttft_slo_ms": settings.realtime_ttft_slo_ms,
        "itl_p95_ms": itl * 1000 if itl is not None else None, "itl_slo_ms": settings.realtime_itl_slo_ms,
        "series": [{"at": d.at + to_wall, "limit": d.limit, "reason": d.reason,
                    "ttft_p95_ms": d.ttft * 1000 if d.ttft is not None else None} for d in sampled],
    }


async def recent_errors(app: web.Application, limit: int = 15) -> list[dict[str, Any]]:
    """The newest runtime failures (supervisor history) and failed batch jobs (job event stream)."""
    errors: list[dict[str, Any]] = [
        {"at": e["at"], "source": "runtime", "model": e["model"], "message": e["error"] or "runtime failed"}
        for e in runtime_history(app) if e["state"] == "failed"]
    try:
        events = await app[BATCH_QUEUE].recent_events(EVENTS_SCAN)
    except REDIS_ERRORS:
        events = []  # the overview still shows the runtime's side while Redis is down
    for event in events:
        fields = event.fields
        if fields.get("event") != "failed":
            continue
        errors.append({"at": float(fields.get("at") or 0), "source": "batch", "model": fields.get("model"),
                       "job_id": fields.get("job_id"), "key_id": fields.get("key_id"),
                       "message": fields.get("error") or "job failed"})
    errors.sort(key=lambda e: -e["at"])
    return errors[:limit]


def operator_job_view(job: dict[str, str], *, include_result: bool = False) -> dict[str, Any]:
    """The public job JSON plus what only an operator sees (the owning key id)."""
    view = job_view(job, include_result=include_result)
    view["key_id"] = job.get("key_id")
    return view


async def job_data(app: web.Application, job_id: str) -> dict[str, Any]:
    """One job of any key, with its result and its recent events (404 when missing)."""
    queue = app[BATCH_QUEUE]
    job = await queue.get(job_id) if is_job_id(job_id) else None
    if job is None:
        raise ApiError(404, f"No job with id '{job_id}'.", code="job_not_found", param="id")
    view = operator_job_view(job, include_result=True)
    view["waiting_reason"] = await queue.explain(job)
    view["events"] = [{"id": e.id, **{k: v for k, v in e.fields.items() if v}}
                      for e in await queue.events_of(job_id, 5 * EVENTS_SCAN)]
    return view


async def cancel_any_job(app: web.Application, job_id: str, operator: str) -> dict[str, Any]:
    """Cancel a queued or running job of whichever key owns it (the queue's own cancel, as that key)."""
    queue = app[BATCH_QUEUE]
    job = await queue.get(job_id) if is_job_id(job_id) else None
    if job is None:
        raise ApiError(404, f"No job with id '{job_id}'.", code="job_not_found", param="id")
    outcome, after = await queue.cancel(job_id, job.get("key_id", ""))
    if outcome == "missing" or after is None:
        raise ApiError(404, f"No job with id '{job_id}'.", code="job_not_found", param="id")
    if outcome != "cancelled":
        raise ApiError(409, f"Job '{job_id}' is already {outcome.removeprefix('already:')}; only queued or "
                       "running jobs can be cancelled.", code="job_finished")
    log.info("job_cancelled_by_operator", job_id=job_id, owner=job.get("key_id"), operator=operator)
    return operator_job_view(after)


def parse_job_filters(query: Any) -> dict[str, Any]:
    """Validated filters of a job listing (status, model, key_id, limit, after)."""
    status = query.get("status") or None
    if status is not None and status not in JobStatus.__members__.values():
        raise bad_request(f"'status' must be one of {', '.join(s.value for s in JobStatus)}.", param="status")
    limit = parse_limit(query, default=JOBS_LIMIT_DEFAULT, maximum=JOBS_LIMIT_MAX)
    after = query.get("after") or None
    if after is not None and not after.startswith("job_"):
        raise bad_request("'after' must be the next_cursor of a previous page (a job id).", param="after")
    model = (query.get("model") or "").strip() or None
    key_id = (query.get("key_id") or "").strip() or None
    for name, value in (("model", model), ("key_id", key_id)):
        if value is not None and len(value) > 256:
            raise bad_request(f"'{name}' is longer than 256 characters.", param=name)
    return {"status": status, "model": model, "key_id": key_id, "limit": limit, "after": after}


async def jobs_data(app: web.Application, filters: dict[str, Any]) -> dict[str, Any]:
    """The jobs page: a filtered page of jobs (of every key, or of one) plus the queue counters."""
    queue = app[BATCH_QUEUE]
    page = await queue.list(filters["key_id"], limit=filters["limit"], after=filters["after"],
                            status=filters["status"], model=filters["model"])
    data = [operator_job_view(job) for job in page.jobs]
    depth = await queue.depth(1)
    return {"object": "list", "data": data, "has_more": page.next_cursor is not None,
            "next_cursor": page.next_cursor,
            "filters": {k: v for k, v in filters.items() if k not in ("limit", "after")},
            "counts": {"queued": depth.total, "running": await queue.running_count()}}


# --- evals
def eval_run_view(run: dict[str, Any]) -> dict[str, Any]:
    """One eval run (as the EvalRunner lists it) in the dashboard's shape: progress counts, metric values."""
    raw_progress = run.get("progress")
    progress: dict[str, Any] = raw_progress if isinstance(raw_progress, dict) else {}
    counts = {name: int(progress.get(name) or 0) for name in ("total", "prepared", "sent", "answered", "scored")}
    if not counts["total"]:
        counts["total"] = max(counts["prepared"], counts["sent"], counts["answered"], counts["scored"])
    error = run.get("error")
    if isinstance(error, dict):
        error = error.get("message") or orjson.dumps(error).decode()
    name = run.get("eval") or run.get("dataset")
    if isinstance(name, (list, tuple)):
        name = ", ".join(str(n) for n in name)
    raw_metrics = run.get("metrics")
    shown_metrics = raw_metrics if isinstance(raw_metrics, dict) else {}
    # eval-repo metrics are {name: {"value": ..., ...}}: the page shows the values, /eval/runs/<id> the rest.
    shown = {k: v.get("value") if isinstance(v, dict) and "value" in v else v for k, v in shown_metrics.items()}
    return {"id": run.get("id"), "status": run.get("status"), "eval": name,
            "harness": run.get("harness"), "model": run.get("model"), "key_id": run.get("key_id"),
            "progress": counts, "metrics": shown,
            "error": error, "created_at": run.get("created_at"), "finished_at": run.get("finished_at")}


async def eval_runs(app: web.Application) -> list[dict[str, Any]]:
    """The newest eval runs of every key."""
    return [eval_run_view(run) for run in await app[EVAL_RUNNER].list_runs()]


# --- key usage
async def key_usage_days(app: web.Application, days: int = USAGE_DAYS) -> dict[str, Any]:
    """Per key: today's usage, the sum over `days` days and the daily series (from the daily hashes)."""
    day_list = utc_days(days)
    by_key = await app[USAGE].daily(day_list, max_keys=USAGE_MAX_KEYS)
    rows: list[dict[str, Any]] = []
    for key_id, hashes in by_key.items():
        daily = []
        total = dict.fromkeys(USAGE_FIELDS, 0)
        last_used: float | None = None
        for day, data in zip(day_list, hashes, strict=True):
            counts = {name: int(data.get(name, 0)) for name in USAGE_FIELDS}
            for name in USAGE_FIELDS:
                total[name] += counts[name]
            if "last_used_at" in data:
                last_used = max(last_used or 0.0, float(data["last_used_at"]))
            daily.append({"day": day, "requests": counts["requests"],
                          "tokens": counts["prompt_tokens"] + counts["completion_tokens"]})
        today = {name: int(hashes[-1].get(name, 0)) for name in USAGE_FIELDS}
        today["total_tokens"] = today["prompt_tokens"] + today["completion_tokens"]
        total["total_tokens"] = total["prompt_tokens"] + total["completion_tokens"]
        rows.append({"key_id": key_id, "today": today, "last_days": total, "daily": daily,
                     "last_used_at": last_used})
    rows.sort(key=lambda r: (-r["last_days"]["requests"], r["key_id"]))
    return {"object": "list", "days": day_list, "today": day_list[-1], "data": rows}


# --- overview
async def overview_data(app: web.Application) -> dict[str, Any]:
    """Everything on the overview page; Redis-backed parts are null with `redis: down` when it fails."""
    sampler = app.get(TRAFFIC)
    traffic = sampler.stats() if sampler else {}
    series = sampler.series() if sampler else []
    data: dict[str, Any] = {"runtime": runtime_view(app), "last_swap": last_swap(app),
                            "realtime": {**traffic, "series": series}, "redis": "up",
                            "queue": None, "batch": None, "coserve": coserve_view(app), "recent_errors": []}
    try:
        data["queue"] = await queue_depth(app)
        data["batch"] = await batch_activity(app)
    except REDIS_ERRORS:
        data["redis"] = "down"
    data["recent_errors"] = await recent_errors(app)
    data["time"] = time.time()
    return data


# --- handlers
@requires_scope(Scope.MONITOR)
async def overview(request: web.Request) -> web.Response:
    """GET /monitor/overview: runtime, realtime traffic, queue depth, batch in flight, recent errors."""
    return json_response(await overview_data(request.app))


@requires_scope(Scope.MONITOR)
async def list_jobs(request: web.Request) -> web.Response:
    """GET /monitor/jobs?status=&model=&key_id=&limit=&after=: jobs of every key, newest first."""
    return json_response(await jobs_data(request.app, parse_job_filters(request.query)))


@requires_scope(Scope.MONITOR)
async def get_job(request: web.Request) -> web.Response:
    """GET /monitor/jobs/{job_id}: any key's job with its result and its recent events."""
    return json_response(await job_data(request.app, request.match_info["job_id"]))


@requires_scope(Scope.MONITOR)
async def cancel_job(request: web.Request) -> web.Response:
    """DELETE /monitor/jobs/{job_id}: cancel any key's queued or running job (409 once finished).

    With the session cookie, the auth middleware requires the X-CSRF-Token header first.
    """
    return json_response(await cancel_any_job(request.app, request.match_info["job_id"], request[API_KEY].id))


@requires_scope(Scope.MONITOR)
async def list_evals(request: web.Request) -> web.Response:
    """GET /monitor/evals: eval runs with progress counts and metrics (empty without an eval runner)."""
    return json_response({"object": "list", "data": await eval_runs(request.app)})


@requires_scope(Scope.MONITOR)
async def keys_usage(request: web.Request) -> web.Response:
    """GET /monitor/keys: per key usage today and over the last 30 UTC days, with the daily series."""
    return json_response(await key_usage_days(request.app))


@requires_scope(Scope.MONITOR)
async def runtime_status(request: web.Request) -> web.Response:
    """GET /monitor/runtime: the supervisor's snapshot, its state history and the crash logs on disk."""
    return json_response({**runtime_view(request.app), "history": runtime_history(request.app),
                          "crash_logs": crash_logs(request.app)})


@requires_scope(Scope.MONITOR)
async def crash_log(request: web.Request) -> web.Response:
    """GET /monitor/runtime/crash_logs/{name}: one crash log's text (its last 512 KiB)."""
    return json_response(read_crash_log(request.app, request.match_info["name"]))


def setup(app: web.Application) -> None:
    """Add the monitor JSON routes."""
    app.router.add_get("/monitor/overview", overview)
    app.router.add_get("/monitor/jobs", list_jobs)
    app.router.add_get("/monitor/jobs/{job_id}", get_job)
    app.router.add_delete("/monitor/jobs/{job_id}", cancel_job)
    app.router.add_get("/monitor/evals", list_evals)
    app.router.add_get("/monitor/keys", keys_usage)
    app.router.add_get("/monitor/runtime", runtime_status)
    app.router.add_get("/monitor/runtime/crash_logs/{name}", crash_log)

