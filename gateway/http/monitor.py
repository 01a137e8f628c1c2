"""Monitor JSON: one endpoint per dashboard page, for the dashboard's live updates and for scripts.

GET /monitor/overview, /monitor/jobs, /monitor/jobs/{id}, /monitor/evals, /monitor/keys, /monitor/runtime,
/monitor/runtime/crash_logs/{name}; DELETE /monitor/jobs/{id} cancels any key's job. All need the
monitor scope (a bearer key, or the dashboard session cookie plus its CSRF token for the DELETE).
"""

from __future__ import annotations

import asyncio
import inspect
import math
import re
import stat
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import structlog
from aiohttp import web
from redis.exceptions import RedisError

from gateway import metrics
from gateway.batch.jobs import JobStatus, job_view
from gateway.http import appkeys
from gateway.http.appkeys import API_KEY, BATCH_QUEUE, DISPATCHER, REDIS, REDIS_KEYS, SETTINGS, SUPERVISOR
from gateway.http.auth import Scope, requires_scope
from gateway.http.errors import ApiError, bad_request, json_response

log = structlog.get_logger(component="monitor")

REALTIME_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions"})
JOBS_LIMIT_DEFAULT = 50
JOBS_LIMIT_MAX = 200
USAGE_DAYS = 30
USAGE_MAX_KEYS = 200
QUEUE_PRIORITY_SCAN_MAX = 5000
EVENTS_SCAN = 500
CRASH_LOGS_LISTED = 100
CRASH_LOG_MAX_BYTES = 512 * 1024
_CRASH_LOG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,250}\.log$")
_USAGE_FIELDS = ("requests", "successes", "errors", "prompt_tokens", "completion_tokens")
_JOB_FIELDS = ("id", "key_id", "status", "model", "endpoint", "priority", "metadata", "created_at",
               "started_at", "finished_at", "attempt", "max_attempts", "flags", "error", "error_type",
               "error_code", "crash_log", "runtime_status", "usage")


# --- realtime traffic: rates and latency from the in-process Prometheus metrics
@dataclass(frozen=True, slots=True)
class TrafficSample:
    """Cumulative realtime counters at one moment."""

    at: float
    requests: float
    errors: float
    latency_sum: float
    latency_count: float
    buckets: tuple[tuple[float, float], ...]  # (upper bound, cumulative count), ascending


class TrafficSampler:
    """Samples the realtime routes' request counter and latency histogram every second.

    Rates are differences between samples, so nothing is added to the request path: the middleware
    already counts every request in gateway/metrics.py.
    """

    def __init__(self, routes: Iterable[str] = REALTIME_ROUTES, interval: float = 1.0, keep: int = 300) -> None:
        self.routes = frozenset(routes)
        self.interval = interval
        self.samples: deque[TrafficSample] = deque(maxlen=keep)

    def read(self) -> TrafficSample:
        """The counters now."""
        requests = errors = lat_sum = lat_count = 0.0
        buckets: dict[float, float] = {}
        for family in metrics.HTTP_REQUESTS.collect():
            for s in family.samples:
                if s.name.endswith("_total") and s.labels.get("route") in self.routes:
                    requests += s.value
                    if s.labels.get("status", "").startswith("5"):
                        errors += s.value
        for family in metrics.HTTP_LATENCY.collect():
            for s in family.samples:
                if s.labels.get("route") not in self.routes:
                    continue
                if s.name.endswith("_bucket"):
                    bound = float(s.labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + s.value
                elif s.name.endswith("_sum"):
                    lat_sum += s.value
                elif s.name.endswith("_count"):
                    lat_count += s.value
        return TrafficSample(time.time(), requests, errors, lat_sum, lat_count, tuple(sorted(buckets.items())))

    def sample(self) -> TrafficSample:
        """Record the counters now (the loop does this every `interval`)."""
        current = self.read()
        self.samples.append(current)
        return current

    async def run(self) -> None:
        """Sample until cancelled."""
        while True:
            self.sample()
            await asyncio.sleep(self.interval)

    def stats(self, window: float = 10.0) -> dict[str, Any]:
        """Totals since start, and rate, mean and p95 latency over the last `window` seconds."""
        now = self.read()
        base = next((s for s in self.samples if s.at >= now.at - window), None)
        out: dict[str, Any] = {"requests_total": int(now.requests), "errors_total": int(now.errors),
                               "window_seconds": window, "requests_per_second": None,
                               "errors_per_second": None, "latency_mean_ms": None, "latency_p95_ms": None}
        if base is None or now.at - base.at < 0.5:
            return out
        span = now.at - base.at
        out["window_seconds"] = round(span, 2)
        out["requests_per_second"] = round((now.requests - base.requests) / span, 3)
        out["errors_per_second"] = round((now.errors - base.errors) / span, 3)
        count = now.latency_count - base.latency_count
        if count > 0:
            out["latency_mean_ms"] = round((now.latency_sum - base.latency_sum) / count * 1000, 2)
            p95 = _quantile(0.95, base.buckets, now.buckets)
            out["latency_p95_ms"] = round(p95 * 1000, 2) if p95 is not None else None
        return out

    def series(self, seconds: float = 120.0, step: float = 2.0) -> list[dict[str, Any]]:
        """Requests per second and mean latency per `step` over the last `seconds` (for the sparklines)."""
        points: list[dict[str, Any]] = []
        newest = self.samples[-1].at if self.samples else 0.0
        previous: TrafficSample | None = None
        for s in self.samples:
            if s.at < newest - seconds:
                continue
            if previous is not None and s.at - previous.at < step - 0.25:
                continue
            if previous is not None:
                span = s.at - previous.at
                count = s.latency_count - previous.latency_count
                points.append({"at": round(s.at, 3), "rps": round((s.requests - previous.requests) / span, 3),
                               "latency_ms": round((s.latency_sum - previous.latency_sum) / count * 1000, 2)
                               if count > 0 else None})
            previous = s
        return points


def _quantile(q: float, before: tuple[tuple[float, float], ...],
              after: tuple[tuple[float, float], ...]) -> float | None:
    """Prometheus-style histogram_quantile over the difference of two cumulative bucket sets."""
    old = dict(before)
    deltas = [(bound, count - old.get(bound, 0.0)) for bound, count in after]
    if not deltas or deltas[-1][1] <= 0:
        return None
    rank = q * deltas[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in deltas:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # beyond the last finite bucket: its bound is the best estimate
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return None


TRAFFIC = web.AppKey("traffic_sampler", TrafficSampler)


async def _traffic_ctx(app: web.Application) -> AsyncIterator[None]:
    sampler = TrafficSampler()
    app[TRAFFIC] = sampler
    task = asyncio.create_task(sampler.run(), name="monitor:traffic")
    yield
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise


# --- helpers
def redis_down(exc: BaseException) -> ApiError:
    """The 503 for a monitor read that needs Redis while it is unreachable."""
    return ApiError(503, f"Redis is unreachable, so this cannot be read now ({exc.__class__.__name__}).",
                    type="server_error", code="redis_unavailable", headers={"Retry-After": "5"})


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value


def _fields(raw: Any) -> dict[str, str]:
    """A Redis hash or stream entry with text keys and values."""
    return {_text(k) or "": _text(v) or "" for k, v in (raw or {}).items()}


def utc_days(count: int, now: float | None = None) -> list[str]:
    """The last `count` UTC days as YYYYMMDD, oldest first (today last)."""
    today = datetime.fromtimestamp(time.time() if now is None else now, UTC).date()
    return [(today - timedelta(days=n)).strftime("%Y%m%d") for n in range(count - 1, -1, -1)]


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
    history = getattr(app[SUPERVISOR], "history", [])
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


# --- batch queue
async def queue_depth(app: web.Application) -> dict[str, Any]:
    """Queued jobs by model and by priority (priorities read from at most QUEUE_PRIORITY_SCAN_MAX jobs)."""
    redis, keys = app[REDIS], app[REDIS_KEYS]
    models = sorted(_text(m) or "" for m in await redis.smembers(keys.batch_models))
    pipe = redis.pipeline(transaction=False)
    for model in models:
        pipe.zcard(keys.batch_ready(model))
        pipe.zrange(keys.batch_ready(model), 0, QUEUE_PRIORITY_SCAN_MAX - 1)
    raw = await pipe.execute() if models else []
    counts = {m: int(raw[2 * i]) for i, m in enumerate(models)}
    ids = {m: [x.decode() for x in raw[2 * i + 1]] for i, m in enumerate(models)}
    budget = QUEUE_PRIORITY_SCAN_MAX
    pipe = redis.pipeline(transaction=False)
    asked: list[str] = []
    for model in models:
        for job_id in ids[model][:budget]:
            pipe.hget(keys.job(job_id), "priority")
            asked.append(model)
        budget -= min(budget, len(ids[model]))
    priorities = await pipe.execute() if asked else []
    by_model: dict[str, dict[str, int]] = {m: {} for m in models}
    by_priority: dict[str, int] = {}
    for model, value in zip(asked, priorities, strict=True):
        p = _text(value) or "0"
        by_model[model][p] = by_model[model].get(p, 0) + 1
        by_priority[p] = by_priority.get(p, 0) + 1
    rows = [{"model": m, "queued": counts[m],
             "by_priority": dict(sorted(by_model[m].items(), key=lambda kv: -int(kv[0])))}
            for m in models if counts[m]]
    return {"total": sum(counts.values()), "by_model": rows,
            "by_priority": dict(sorted(by_priority.items(), key=lambda kv: -int(kv[0]))),
            "complete": len(asked) >= sum(counts.values())}


async def batch_activity(app: web.Application) -> dict[str, Any]:
    """Batch requests in flight: across every gateway (leases) and in this one (the dispatcher)."""
    dispatcher = app.get(DISPATCHER)
    running = await app[REDIS].zcard(app[REDIS_KEYS].batch_leases)
    return {"running": int(running), "in_flight_here": len(dispatcher.inflight) if dispatcher else 0,
            "slots": app[SETTINGS].max_concurrent_batch, "dispatcher_enabled": dispatcher is not None,
            "group": dispatcher.group if dispatcher else None}


async def recent_errors(app: web.Application, limit: int = 15) -> list[dict[str, Any]]:
    """The newest runtime failures (supervisor history) and failed batch jobs (job event stream)."""
    errors: list[dict[str, Any]] = [
        {"at": e["at"], "source": "runtime", "model": e["model"], "message": e["error"] or "runtime failed"}
        for e in runtime_history(app) if e["state"] == "failed"]
    try:
        entries = await app[REDIS].xrevrange(app[REDIS_KEYS].job_events, count=EVENTS_SCAN)
    except RedisError:
        entries = []
    for _, raw in entries or []:
        fields = _fields(raw)
        if fields.get("event") != "failed":
            continue
        errors.append({"at": float(fields.get("at") or 0), "source": "batch", "model": fields.get("model"),
                       "job_id": fields.get("job_id"), "key_id": fields.get("key_id"),
                       "message": fields.get("error") or "job failed"})
    errors.sort(key=lambda e: -e["at"])
    return errors[:limit]


def batch_queue(app: web.Application) -> Any:
    """The JobQueue, or a 503 when this gateway runs without the batch queue."""
    queue = app.get(BATCH_QUEUE)
    if queue is None:
        raise ApiError(503, "The batch queue is not running in this gateway.", type="server_error",
                       code="batch_unavailable")
    return queue


async def list_all_jobs(app: web.Application, *, limit: int, after: str | None = None, status: str | None = None,
                        model: str | None = None, key_id: str | None = None,
                        scan_max: int = 5000) -> tuple[list[dict[str, str]], str | None]:
    """Jobs of every key (or of one), newest first, filtered; returns the page and the next cursor.

    The batch queue indexes jobs per key (`job_index:<key_id>`, ordered by id = creation time), so the
    operator's view merges those indexes: the newest `batch` ids of the union are exactly the newest
    `batch` of all, because each one is among the newest `batch` of its own index.
    """
    if key_id is not None:
        page = await batch_queue(app).list(key_id, limit=limit, after=after, status=status, model=model)
        return page.jobs, page.next_cursor
    redis, keys = app[REDIS], app[REDIS_KEYS]
    indexes = sorted({k.decode() async for k in redis.scan_iter(match=keys.job_index_pattern(), count=500)})
    upper = f"({after}" if after else "+"
    found: list[dict[str, str]] = []
    scanned = 0
    last_seen: str | None = None
    batch = max(limit * 2, 50)
    while indexes and len(found) < limit and scanned < scan_max:
        pipe = redis.pipeline(transaction=False)
        for index in indexes:
            pipe.zrevrangebylex(index, upper, "-", start=0, num=batch)
        candidates = sorted({x.decode() for ids in await pipe.execute() for x in ids}, reverse=True)[:batch]
        if not candidates:
            return found, None
        pipe = redis.pipeline(transaction=False)
        for job_id in candidates:
            pipe.hmget(keys.job(job_id), _JOB_FIELDS)
        for job_id, row in zip(candidates, await pipe.execute(), strict=True):
            scanned += 1
            last_seen = job_id
            if row[0] is None:
                continue  # expired: the queue's own listing prunes its index entry
            job = {f: v.decode() for f, v in zip(_JOB_FIELDS, row, strict=True) if v is not None}
            if (status is None or job.get("status") == status) and (model is None or job.get("model") == model):
                found.append(job)
                if len(found) == limit:
                    break
        upper = f"({last_seen}"
        if len(candidates) < batch and len(found) < limit:
            return found, None
    if last_seen is None:
        return found, None
    pipe = redis.pipeline(transaction=False)
    for index in indexes:
        pipe.zrevrangebylex(index, f"({last_seen}", "-", start=0, num=1)
    more = any(await pipe.execute())
    return found, last_seen if more else None


def operator_job_view(job: dict[str, str], *, include_result: bool = False) -> dict[str, Any]:
    """The public job JSON plus what only an operator sees (the owning key id)."""
    view = job_view(job, include_result=include_result)
    view["key_id"] = job.get("key_id")
    return view


async def job_events(app: web.Application, job_id: str) -> list[dict[str, str]]:
    """This job's entries among the newest events of the stream, oldest first."""
    entries = await app[REDIS].xrevrange(app[REDIS_KEYS].job_events, count=5 * EVENTS_SCAN)
    found = []
    for entry_id, raw in entries or []:
        fields = _fields(raw)
        if fields.get("job_id") == job_id:
            found.append({"id": _text(entry_id) or "", **{k: v for k, v in fields.items() if v}})
    return list(reversed(found))


async def job_data(app: web.Application, job_id: str) -> dict[str, Any]:
    """One job of any key, with its result and its recent events (404 when missing)."""
    job = await batch_queue(app).get(job_id)
    if job is None:
        raise ApiError(404, f"No job with id '{job_id}'.", code="job_not_found", param="id")
    view = operator_job_view(job, include_result=True)
    view["events"] = await job_events(app, job_id)
    return view


async def cancel_any_job(app: web.Application, job_id: str, operator: str) -> dict[str, Any]:
    """Cancel a queued or running job of whichever key owns it (the queue's own cancel, as that key)."""
    queue = batch_queue(app)
    job = await queue.get(job_id)
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
    raw_limit = query.get("limit", str(JOBS_LIMIT_DEFAULT))
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= JOBS_LIMIT_MAX:
        raise bad_request(f"'limit' must be a whole number from 1 to {JOBS_LIMIT_MAX}.", param="limit")
    after = query.get("after") or None
    if after is not None and not after.startswith("job_"):
        raise bad_request("'after' must be the next_cursor of a previous page (a job id).", param="after")
    model = (query.get("model") or "").strip() or None
    key_id = (query.get("key_id") or "").strip() or None
    for name, value in (("model", model), ("key_id", key_id)):
        if value is not None and len(value) > 256:
            raise bad_request(f"'{name}' is longer than 256 characters.", param=name)
    return {"status": status, "model": model, "key_id": key_id, "limit": int(raw_limit), "after": after}


async def jobs_data(app: web.Application, filters: dict[str, Any]) -> dict[str, Any]:
    """The jobs page: a filtered page of jobs plus the queue counters."""
    jobs, cursor = await list_all_jobs(app, **filters)
    data = [operator_job_view(job) for job in jobs]
    depth = await queue_depth(app)
    running = await app[REDIS].zcard(app[REDIS_KEYS].batch_leases)
    return {"object": "list", "data": data, "has_more": cursor is not None, "next_cursor": cursor,
            "filters": {k: v for k, v in filters.items() if k not in ("limit", "after")},
            "counts": {"queued": depth["total"], "running": int(running)}}


# --- evals (the EvalRunner may not exist yet: everything here is read defensively)
def _eval_runner(app: web.Application) -> Any:
    key = getattr(appkeys, "EVAL_RUNNER", None)
    if key is None:
        return None
    try:
        return app.get(key)
    except (KeyError, TypeError):
        return None


def _as_dict(run: Any) -> dict[str, Any]:
    if isinstance(run, dict):
        return run
    for name in ("model_dump", "to_dict", "view", "as_dict"):
        method = getattr(run, name, None)
        if callable(method):
            result = method()
            if isinstance(result, dict):
                return result
    return {k: getattr(run, k) for k in dir(run) if not k.startswith("_") and not callable(getattr(run, k))}


def eval_run_view(run: Any) -> dict[str, Any]:
    """One eval run in the dashboard's shape: id, status, eval, model, progress counts, metrics, error."""
    data = _as_dict(run)
    raw_progress = data.get("progress")
    progress: dict[str, Any] = raw_progress if isinstance(raw_progress, dict) else {}
    counts = {name: int(progress.get(name, data.get(name)) or 0)
              for name in ("total", "prepared", "sent", "answered", "scored")}
    if not counts["total"]:
        counts["total"] = max(counts["prepared"], counts["sent"], counts["answered"], counts["scored"])
    error = data.get("error")
    if isinstance(error, dict):
        error = error.get("message") or orjson.dumps(error).decode()
    name = data.get("eval") or data.get("dataset") or data.get("name")
    if isinstance(name, (list, tuple)):
        name = ", ".join(str(n) for n in name)
    raw_metrics = data.get("metrics")
    metrics = raw_metrics if isinstance(raw_metrics, dict) else {}
    # eval-repo metrics are {name: {"value": ..., ...}}: the page shows the values, /eval/runs/<id> the rest.
    shown = {k: v.get("value") if isinstance(v, dict) and "value" in v else v for k, v in metrics.items()}
    return {"id": data.get("id"), "status": data.get("status"), "eval": name,
            "harness": data.get("harness"), "model": data.get("model"), "key_id": data.get("key_id"),
            "progress": counts, "metrics": shown,
            "error": error, "created_at": data.get("created_at"), "finished_at": data.get("finished_at")}


async def eval_runs(app: web.Application) -> list[dict[str, Any]]:
    """Eval runs from the EvalRunner when there is one; an empty list otherwise."""
    runner = _eval_runner(app)
    if runner is None:
        return []
    for name in ("list_runs", "runs", "list"):
        method = getattr(runner, name, None)
        if method is None:
            continue
        try:
            result = method() if callable(method) else method
            if inspect.isawaitable(result):
                result = await result
            if isinstance(result, dict):
                result = result.get("data", list(result.values()))
            return [eval_run_view(run) for run in result or []]
        except (RedisError, OSError) as exc:
            raise redis_down(exc) from None
        except Exception:
            # The runner's API is not settled yet: a shape we cannot read must not break the page.
            log.exception("eval_runs_unreadable", method=name)
            return []
    return []


# --- key usage
async def key_usage_days(app: web.Application, days: int = USAGE_DAYS) -> dict[str, Any]:
    """Per key: today's usage, the sum over `days` days and the daily series (from the daily hashes)."""
    redis, keys = app[REDIS], app[REDIS_KEYS]
    day_list = utc_days(days)
    key_ids = sorted(_text(k) or "" for k in await redis.smembers(keys.key_usage_ids))[:USAGE_MAX_KEYS]
    pipe = redis.pipeline(transaction=False)
    for key_id in key_ids:
        for day in day_list:
            pipe.hgetall(keys.key_usage_day(key_id, day))
    raw = await pipe.execute() if key_ids else []
    rows: list[dict[str, Any]] = []
    for i, key_id in enumerate(key_ids):
        daily = []
        total = dict.fromkeys(_USAGE_FIELDS, 0)
        last_used: float | None = None
        for j, day in enumerate(day_list):
            data = {k.decode(): v.decode() for k, v in raw[i * days + j].items()}
            counts = {name: int(data.get(name, 0)) for name in _USAGE_FIELDS}
            for name in _USAGE_FIELDS:
                total[name] += counts[name]
            if "last_used_at" in data:
                last_used = max(last_used or 0.0, float(data["last_used_at"]))
            daily.append({"day": day, "requests": counts["requests"],
                          "tokens": counts["prompt_tokens"] + counts["completion_tokens"]})
        today = {name: 0 for name in _USAGE_FIELDS}
        today_raw = {k.decode(): v.decode() for k, v in raw[i * days + days - 1].items()}
        today.update({name: int(today_raw.get(name, 0)) for name in _USAGE_FIELDS})
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
                            "queue": None, "batch": None, "recent_errors": []}
    try:
        data["queue"] = await queue_depth(app)
        data["batch"] = await batch_activity(app)
    except (RedisError, OSError):
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
    filters = parse_job_filters(request.query)
    try:
        return json_response(await jobs_data(request.app, filters))
    except (RedisError, OSError) as exc:
        raise redis_down(exc) from None


@requires_scope(Scope.MONITOR)
async def get_job(request: web.Request) -> web.Response:
    """GET /monitor/jobs/{job_id}: any key's job with its result and its recent events."""
    try:
        return json_response(await job_data(request.app, request.match_info["job_id"]))
    except (RedisError, OSError) as exc:
        raise redis_down(exc) from None


@requires_scope(Scope.MONITOR)
async def cancel_job(request: web.Request) -> web.Response:
    """DELETE /monitor/jobs/{job_id}: cancel any key's queued or running job (409 once finished).

    With the session cookie, the auth middleware requires the X-CSRF-Token header first.
    """
    try:
        view = await cancel_any_job(request.app, request.match_info["job_id"], request[API_KEY].id)
    except (RedisError, OSError) as exc:
        raise redis_down(exc) from None
    return json_response(view)


@requires_scope(Scope.MONITOR)
async def list_evals(request: web.Request) -> web.Response:
    """GET /monitor/evals: eval runs with progress counts and metrics (empty without an eval runner)."""
    return json_response({"object": "list", "data": await eval_runs(request.app)})


@requires_scope(Scope.MONITOR)
async def keys_usage(request: web.Request) -> web.Response:
    """GET /monitor/keys: per key usage today and over the last 30 UTC days, with the daily series."""
    try:
        return json_response(await key_usage_days(request.app))
    except (RedisError, OSError) as exc:
        raise redis_down(exc) from None


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
    """Add the monitor JSON routes and the traffic sampler."""
    app.router.add_get("/monitor/overview", overview)
    app.router.add_get("/monitor/jobs", list_jobs)
    app.router.add_get("/monitor/jobs/{job_id}", get_job)
    app.router.add_delete("/monitor/jobs/{job_id}", cancel_job)
    app.router.add_get("/monitor/evals", list_evals)
    app.router.add_get("/monitor/keys", keys_usage)
    app.router.add_get("/monitor/runtime", runtime_status)
    app.router.add_get("/monitor/runtime/crash_logs/{name}", crash_log)
    app.cleanup_ctx.append(_traffic_ctx)

