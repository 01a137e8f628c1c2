"""The durable batch queue in Redis: enqueue, claim with a lease, fenced updates, reaping, the event stream.

Two kinds of keys (docs/batch.md has the full layout and the reasoning):
- queue keys under the `{batch}` hash tag (ready sets per model, the model set, leases, lease tokens):
  every Lua script touches only these, so in a Redis Cluster they live in one slot;
- `job:<id>` hashes, the operator's record and the source of truth for a job's status; each change is a
  single-key Lua compare-and-set on the holder's claim token, so a stale holder changes nothing.
A step that touches both kinds is two commands, ordered so that a crash between them leaves a state the
lease reaper repairs (it reads the job hash to decide what an expired lease means).
"""

from __future__ import annotations

import builtins
import os
import secrets
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson
import structlog
from redis.asyncio import Redis

from gateway import metrics
from gateway.batch.jobs import PRIORITY_MAX, PRIORITY_MIN, JobStatus, Submission, decode_hash, new_job_id
from gateway.redis_codec import opt_text, stream_entries, text, texts, xread_entries
from gateway.redis_keys import RedisKeys
from gateway.settings import Settings

log = structlog.get_logger(component="batch_queue")

# Queue side: pop up to N ids of one model and lease them, each with a unique claim token.
_CLAIM = """
local popped = redis.call('ZPOPMIN', KEYS[1], tonumber(ARGV[1]))
local out = {}
local n = #popped / 2
if n > 0 then
  local last = redis.call('INCRBY', KEYS[5], n)
  for i = 1, n do
    local id = popped[2 * i - 1]
    local token = ARGV[3] .. ':' .. string.format('%d', last - n + i)
    redis.call('ZADD', KEYS[2], ARGV[2], id)
    redis.call('HSET', KEYS[3], id, token)
    out[#out + 1] = id
    out[#out + 1] = token
    out[#out + 1] = popped[2 * i]
  end
end
if redis.call('ZCARD', KEYS[1]) == 0 then redis.call('SREM', KEYS[4], ARGV[4]) end
return out
"""

# Queue side: drop a lease, but only for the holder of its token ('' = a lease that lost its token).
_RELEASE = """
local t = redis.call('HGET', KEYS[2], ARGV[1])
if (t == false and ARGV[2] == '') or t == ARGV[2] then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  return 1
end
return 0
"""

# Queue side: give a leased job back to its model's ready set (holder only).
_REQUEUE = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[4])
return 1
"""

# Queue side: push the deadline of every lease still held with the given token; return the lost ids.
_RENEW = """
local lost = {}
for i = 2, #ARGV, 2 do
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[i + 1] then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[1], ARGV[i])
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
"""

# Job side: queued -> running for the claim token, or give up when the attempts are used up.
_START = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'missing'} end
if st ~= 'queued' then return {st} end
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0')
if attempt >= tonumber(ARGV[4]) then
  local flags = redis.call('HGET', KEYS[1], 'flags') or ''
  if flags ~= '' then flags = flags .. ',' end
  redis.call('HSET', KEYS[1], 'status', 'failed', 'claim', '', 'finished_at', ARGV[3], 'updated_at', ARGV[3],
    'error', 'Gave up after ' .. attempt .. ' attempts: the gateway running the job stopped each time.',
    'error_type', 'batch_job_failed', 'error_code', 'lease_expired', 'flags', flags .. 'max_attempts')
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  return {'gave_up', redis.call('HGETALL', KEYS[1])}
end
redis.call('HSET', KEYS[1], 'status', 'running', 'claim', ARGV[1], 'owner', ARGV[2], 'attempt', attempt + 1,
  'updated_at', ARGV[3])
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[3])
return {'running', redis.call('HGETALL', KEYS[1])}
"""

# Job side: change a running job only if the caller still holds it (fencing by claim token).
_UPDATE = """
if ARGV[1] == '' or redis.call('HGET', KEYS[1], 'claim') ~= ARGV[1]
   or redis.call('HGET', KEYS[1], 'status') ~= 'running' then
  return -1
end
local a = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0')
if tonumber(ARGV[4]) ~= 0 then a = redis.call('HINCRBY', KEYS[1], 'attempt', ARGV[4]) end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[2])
if #ARGV > 4 then redis.call('HSET', KEYS[1], unpack(ARGV, 5)) end
if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return a
"""

# Job side: cancel a queued or running job of the given key.
_CANCEL = """
local f = redis.call('HMGET', KEYS[1], 'status', 'key_id', 'model', 'score')
if not f[1] or f[2] ~= ARGV[3] then return {'missing'} end
if f[1] ~= 'queued' and f[1] ~= 'running' then return {f[1]} end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'claim', '', 'finished_at', ARGV[1], 'updated_at', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {'done', f[1], f[3], f[4]}
"""

# Job side (operator, `llm-gateway jobs requeue`): failed -> queued with a fresh set of attempts.
_REQUEUE_FAILED = """
local f = redis.call('HMGET', KEYS[1], 'status', 'model', 'score')
if not f[1] then return {'missing'} end
if f[1] ~= 'failed' then return {f[1]} end
redis.call('HSET', KEYS[1], 'status', 'queued', 'claim', '', 'attempt', '0', 'updated_at', ARGV[1],
  'requeue_reason', ARGV[2], 'error', '', 'error_type', '', 'error_code', '', 'runtime_status', '',
  'crash_log', '', 'flags', '')
redis.call('HDEL', KEYS[1], 'finished_at', 'response', 'usage', 'final_event')
redis.call('PERSIST', KEYS[1])
return {'requeued', f[2], f[3]}
"""


def instance_id() -> str:
    """A name for this gateway process that is unique across restarts (leases and logs carry it)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass(slots=True)
class HeldJob:
    """A job this gateway has claimed: the token fences every later change."""

    id: str
    token: str
    score: float
    fields: dict[str, str]
    settled: bool = False
    """Set once the holder starts writing the outcome: the lease is no longer renewed or defended."""

    @property
    def model(self) -> str:
        """The model the job runs on."""
        return self.fields["model"]

    @property
    def attempt(self) -> int:
        """The attempt number the holder is on."""
        return int(self.fields.get("attempt") or 0)


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """Queued jobs now: the count per model, and per model the count per priority ("unknown" for entries
    past the sample or whose priority cannot be derived)."""

    by_model: dict[str, int]
    by_priority: dict[str, dict[str, int]]

    @property
    def total(self) -> int:
        """Queued jobs over all models."""
        return sum(self.by_model.values())


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One entry of the job event stream: its stream id and its fields."""

    id: str
    fields: dict[str, str]


# The fields a job listing shows (never the request or response bodies).
LISTED_FIELDS = ("id", "key_id", "status", "model", "endpoint", "priority", "metadata", "created_at",
                 "started_at", "finished_at", "attempt", "max_attempts", "flags", "error", "error_type",
                 "error_code", "crash_log", "runtime_status", "usage")
WAITING_REASON_TTL = 30  # seconds a dispatcher's word on why jobs wait is trusted
_ID_TIME_DIGITS = 14  # job ids are "job_" + 14 hex digits of enqueue microseconds + randomness


def priority_from_entry(job_id: str, score: float, aging_seconds: float) -> str | None:
    """A queued job's priority as text, from its id and ready-set score; None when it cannot be told.

    The id carries the enqueue time and the score is that time minus priority x BATCH_AGING_SECONDS.
    """
    if aging_seconds <= 0 or not job_id.startswith("job_"):
        return None
    try:
        created = int(job_id[4:4 + _ID_TIME_DIGITS], 16) / 1_000_000
    except ValueError:
        return None
    priority = round((created - score) / aging_seconds)
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        return None
    return str(priority)


@dataclass(slots=True)
class ListPage:
    """One page of a key's jobs, newest first."""

    jobs: list[dict[str, str]]
    next_cursor: str | None


def _pairs(values: Sequence[Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for i in range(0, len(values) - 1, 2):
        k, v = values[i], values[i + 1]
        out[text(k)] = text(v)
    return out


class JobQueue:
    """Every Redis operation on batch jobs. Safe to share between the HTTP handlers and the dispatcher."""

    def __init__(self, redis: Redis, keys: RedisKeys, settings: Settings) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self._claim = redis.register_script(_CLAIM)
        self._release = redis.register_script(_RELEASE)
        self._requeue = redis.register_script(_REQUEUE)
        self._renew = redis.register_script(_RENEW)
        self._start = redis.register_script(_START)
        self._update = redis.register_script(_UPDATE)
        self._cancel = redis.register_script(_CANCEL)
        self._requeue_failed = redis.register_script(_REQUEUE_FAILED)

    # --- scoring
    def score(self, created_at: float, priority: int) -> float:
        """Queue order: each priority level is worth BATCH_AGING_SECONDS of waiting (lower runs first)."""
        return created_at - priority * self.settings.batch_aging_seconds

    # --- API side
    async def enqueue(self, key_id: str, submission: Submission) -> dict[str, str]:
        """Store a new job and queue it; returns its decoded hash."""
        pipe = self.redis.pipeline(transaction=False)
        (fields,) = self.enqueue_many(pipe, key_id, [submission])
        await pipe.execute()
        metrics.BATCH_JOBS.labels("enqueued").inc()
        return fields

    async def get(self, job_id: str, key_id: str | None = None) -> dict[str, str] | None:
        """The decoded job hash, or None when missing (or owned by another key when key_id is given)."""
        raw = await self.redis.hgetall(self.keys.job(job_id))
        if not raw:
            return None
        job = decode_hash(raw)
        if key_id is not None and job.get("key_id") != key_id:
            return None
        return job

    async def list(self, key_id: str | None, *, limit: int, after: str | None = None,
                   status: str | None = None, model: str | None = None, scan_max: int = 5000) -> ListPage:
        """A page of one key's jobs (or, with key_id None, of every key's), newest first, after the cursor.

        Each key has its own index ordered by id (= creation time). For all keys the indexes are merged:
        the newest `batch` ids of the union are exactly the newest `batch` of all, since each one is among
        the newest `batch` of its own index. Ids whose hash has expired are pruned from their index.
        """
        if key_id is not None:
            owners = [key_id]
        else:
            owners = sorted(text(k) for k in await self.redis.smembers(self.keys.job_owners))
        indexes = [self.keys.job_index(owner) for owner in owners]
        upper = f"({after}" if after else "+"
        found: list[dict[str, str]] = []
        scanned = 0
        last_seen: str | None = None
        batch = max(limit * 2, 50)
        while indexes and len(found) < limit and scanned < scan_max:
            pipe = self.redis.pipeline(transaction=False)
            for index in indexes:
                pipe.zrevrangebylex(index, upper, "-", start=0, num=batch)
            source: dict[str, str] = {}
            for index, ids in zip(indexes, await pipe.execute(), strict=True):
                for raw_id in ids:
                    source[text(raw_id)] = index
            candidates = sorted(source, reverse=True)[:batch]
            if not candidates:
                return ListPage(found, None)
            pipe = self.redis.pipeline(transaction=False)
            for job_id in candidates:
                pipe.hmget(self.keys.job(job_id), LISTED_FIELDS)
            gone: dict[str, list[str]] = {}
            for job_id, row in zip(candidates, await pipe.execute(), strict=True):
                scanned += 1
                last_seen = job_id
                if row[0] is None:
                    gone.setdefault(source[job_id], []).append(job_id)  # expired after its TTL
                    continue
                job = {f: text(v) for f, v in zip(LISTED_FIELDS, row, strict=True) if v is not None}
                if (status is None or job.get("status") == status) and (model is None or job.get("model") == model):
                    found.append(job)
                    if len(found) == limit:
                        break
            if gone:
                pipe = self.redis.pipeline(transaction=False)
                for index, ids in gone.items():
                    pipe.zrem(index, *ids)
                await pipe.execute()
            upper = f"({last_seen}"
            if len(candidates) < batch and len(found) < limit:
                return ListPage(found, None)
        if last_seen is None:
            return ListPage(found, None)
        # Only promise more when there is something older than the last id looked at.
        pipe = self.redis.pipeline(transaction=False)
        for index in indexes:
            pipe.zrevrangebylex(index, f"({last_seen}", "-", start=0, num=1)
        more = any(await pipe.execute())
        return ListPage(found, last_seen if more else None)

    async def owners(self) -> builtins.list[str]:
        """Key ids that have submitted jobs (from the owners index, never a SCAN)."""
        return sorted(texts(await self.redis.smembers(self.keys.job_owners)))

    async def cancel(self, job_id: str, key_id: str) -> tuple[str, dict[str, str] | None]:
        """Cancel a queued or running job: ('cancelled', job), ('already:<status>', job) or ('missing', None)."""
        now = time.time()
        result = await self._cancel(keys=[self.keys.job(job_id)],
                                    args=[repr(now), self.settings.batch_job_ttl_seconds, key_id])
        outcome = text(result[0])
        if outcome == "missing":
            return outcome, None
        if outcome == "done":
            outcome = "cancelled"
            previous, model = text(result[1]), text(result[2])
            pipe = self.redis.pipeline(transaction=False)
            if previous == JobStatus.QUEUED:
                pipe.zrem(self.keys.batch_ready(model), job_id)
            else:
                # The holder (any gateway) stops the request; if it is gone, its lease runs out.
                pipe.publish(self.keys.batch_cancel, job_id)
            await pipe.execute()
        else:
            outcome = f"already:{outcome}"
        job = await self.get(job_id)
        if result[0] == b"done" and job is not None:
            await self.event(job, "cancelled")
            metrics.BATCH_JOBS.labels("cancelled").inc()
        return outcome, job

    def enqueue_many(self, pipe: Any, key_id: str, submissions: Sequence[Submission]) -> builtins.list[dict[str, str]]:
        """Add the commands that store and queue new jobs to `pipe`; the caller executes it.

        For callers that enqueue many jobs at once and want them in the same MULTI/EXEC as their own
        bookkeeping (the OpenAI Batches manager records its progress atomically with the jobs). The
        caller counts BATCH_JOBS{event="enqueued"} once the pipeline has run.
        """
        out: list[dict[str, str]] = []
        models: set[str] = set()
        for submission in submissions:
            now = time.time()
            job_id = new_job_id(now)
            score = self.score(now, submission.priority)
            fields = {
                "id": job_id, "key_id": key_id, "endpoint": str(submission.endpoint), "model": submission.model,
                "priority": str(submission.priority), "metadata": orjson.dumps(submission.metadata).decode(),
                "status": JobStatus.QUEUED.value, "score": repr(score), "created_at": repr(now),
                "updated_at": repr(now), "attempt": "0", "max_attempts": str(self.settings.batch_max_attempts),
                "flags": "", "claim": "",
            }
            pipe.hset(self.keys.job(job_id), mapping={**fields, "request": submission.body})
            pipe.zadd(self.keys.job_index(key_id), {job_id: 0})
            # The job hash is written before the id becomes claimable (commands run in order).
            pipe.zadd(self.keys.batch_ready(submission.model), {job_id: score})
            models.add(submission.model)
            self._xadd(pipe, fields, "enqueued")
            out.append(fields)
        if submissions:
            pipe.sadd(self.keys.job_owners, key_id)
        for model in models:
            pipe.sadd(self.keys.batch_models, model)
            pipe.publish(self.keys.batch_notify, model)
        return out

    async def cancel_many(self, job_ids: Sequence[str], key_id: str) -> int:
        """Cancel the queued or running ones among `job_ids` (of `key_id`) in pipelines; returns how many."""
        cancelled = 0
        now = repr(time.time())
        for start in range(0, len(job_ids), 500):
            chunk = job_ids[start:start + 500]
            pipe = self.redis.pipeline(transaction=False)
            for job_id in chunk:
                await self._cancel(keys=[self.keys.job(job_id)],
                                   args=[now, self.settings.batch_job_ttl_seconds, key_id], client=pipe)
            results = await pipe.execute()
            after = self.redis.pipeline(transaction=False)
            done: list[str] = []
            for job_id, result in zip(chunk, results, strict=True):
                if result[0] != b"done":
                    continue
                done.append(job_id)
                if result[1] == JobStatus.QUEUED.value.encode():
                    after.zrem(self.keys.batch_ready(text(result[2])), job_id)
                else:
                    after.publish(self.keys.batch_cancel, job_id)
                after.hgetall(self.keys.job(job_id))
            if not done:
                continue
            rows = [r for r in await after.execute() if isinstance(r, dict)]
            events = self.redis.pipeline(transaction=False)
            for raw in rows:
                if raw:
                    self._xadd(events, decode_hash(raw), "cancelled")
            await events.execute()
            cancelled += len(done)
            metrics.BATCH_JOBS.labels("cancelled").inc(len(done))
        return cancelled

    async def requeue_failed(self, job_id: str, reason: str = "operator") -> str:
        """Put a failed job back in the queue at its original place with fresh attempts (operator action).

        Returns 'requeued', 'missing', or the status that prevented it (only failed jobs are requeued).
        """
        result = await self._requeue_failed(keys=[self.keys.job(job_id)], args=[repr(time.time()), reason])
        outcome = text(result[0])
        if outcome != "requeued":
            return outcome
        model, score = text(result[1]), float(result[2])
        # As in enqueue, the hash says queued before the id becomes claimable.
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(self.keys.batch_ready(model), {job_id: score})
        pipe.sadd(self.keys.batch_models, model)
        pipe.publish(self.keys.batch_notify, model)
        await pipe.execute()
        job = await self.get(job_id)
        if job is not None:
            await self.event(job, "requeued", reason=reason)
        metrics.BATCH_JOBS.labels("requeued").inc()
        return outcome

    # --- dispatcher side
    async def ready_heads(self) -> dict[str, float]:
        """Model -> score of its most urgent queued job, for every model with queued work."""
        models = texts(await self.redis.smembers(self.keys.batch_models))
        if not models:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for model in models:
            pipe.zrange(self.keys.batch_ready(model), 0, 0, withscores=True)
        heads: dict[str, float] = {}
        for model, head in zip(models, await pipe.execute(), strict=True):
            if head:
                heads[model] = float(head[0][1])
        return heads

    async def queued_count(self) -> int:
        """Jobs queued over all models."""
        models = texts(await self.redis.smembers(self.keys.batch_models))
        if not models:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for model in models:
            pipe.zcard(self.keys.batch_ready(model))
        return sum(await pipe.execute())

    async def depth(self, sample_max: int) -> QueueDepth:
        """Queued jobs by model and, from the first `sample_max` entries of each model, by priority.

        A queued job's priority is read from its ready-set entry (see `priority_from_entry`), so this is
        one ZCARD and one ZRANGE per model, never a read per job.
        """
        models = sorted(text(m) for m in await self.redis.smembers(self.keys.batch_models))
        pipe = self.redis.pipeline(transaction=False)
        for model in models:
            pipe.zcard(self.keys.batch_ready(model))
            pipe.zrange(self.keys.batch_ready(model), 0, sample_max - 1, withscores=True)
        raw = await pipe.execute() if models else []
        aging = self.settings.batch_aging_seconds
        by_model: dict[str, int] = {}
        by_priority: dict[str, dict[str, int]] = {}
        for i, model in enumerate(models):
            count, head = int(raw[2 * i]), raw[2 * i + 1]
            if not count:
                continue
            by_model[model] = count
            tally: dict[str, int] = {}
            for raw_id, score in head:
                p = priority_from_entry(text(raw_id), float(score), aging) or "unknown"
                tally[p] = tally.get(p, 0) + 1
            if count > len(head):  # past the sampled head, or enqueued between the two reads
                tally["unknown"] = tally.get("unknown", 0) + count - len(head)
            by_priority[model] = tally
        return QueueDepth(by_model, by_priority)

    async def set_waiting_reasons(self, owner: str, reasons: Mapping[str, Mapping[str, Any]]) -> None:
        """Record why each model's queued jobs wait (the dispatcher's view), for any reader of a job."""
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.keys.batch_waiting, mapping={
            model: orjson.dumps({**reason, "node": owner, "at": round(now, 3)}) for model, reason in reasons.items()})
        pipe.expire(self.keys.batch_waiting, WAITING_REASON_TTL)
        await pipe.execute()

    async def waiting_reason(self, model: str) -> dict[str, Any] | None:
        """Why queued jobs for `model` wait, as a dispatcher last said it; None when nobody said recently."""
        raw = await self.redis.hget(self.keys.batch_waiting, model)
        if raw is None:
            return None
        reason: dict[str, Any] = orjson.loads(raw)
        if time.time() - float(reason.get("at") or 0) > WAITING_REASON_TTL:
            return None
        return reason

    async def explain(self, job: Mapping[str, str]) -> dict[str, Any] | None:
        """The waiting_reason of a queued job (None for a job in any other state)."""
        if job.get("status") != JobStatus.QUEUED:
            return None
        reason = await self.waiting_reason(job.get("model", ""))
        if reason is None:
            return {"code": "no_dispatcher", "message": "No gateway with a batch dispatcher has reported in the last "
                    f"{WAITING_REASON_TTL} s (is one running, with BATCH_DISPATCHER_ENABLED=true, on this Redis?).",
                    "until": None, "seconds": None}
        return reason

    async def running_count(self) -> int:
        """Jobs leased by any gateway right now."""
        return int(await self.redis.zcard(self.keys.batch_leases))

    async def recent_events(self, count: int) -> builtins.list[JobEvent]:
        """The newest `count` entries of the job event stream, newest first."""
        entries = await self.redis.xrevrange(self.keys.job_events, count=count)
        return [JobEvent(entry_id, fields) for entry_id, fields in stream_entries(entries)]

    async def latest_event_id(self) -> str:
        """The id of the newest event ("0-0" when the stream is empty): where a new follower starts."""
        newest = await self.redis.xrevrange(self.keys.job_events, count=1)
        return stream_entries(newest)[0][0] if newest else "0-0"

    async def read_events(self, after: str, count: int, block_ms: int) -> builtins.list[JobEvent]:
        """Events after id `after`, oldest first, waiting up to `block_ms` for the first one."""
        reply = await self.redis.xread({self.keys.job_events: after}, count=count, block=block_ms)
        return [JobEvent(entry_id, fields) for entry_id, fields in xread_entries(reply)]

    async def events_of(self, job_id: str, scan: int) -> builtins.list[JobEvent]:
        """This job's entries among the newest `scan` events of the stream, oldest first."""
        return [e for e in reversed(await self.recent_events(scan)) if e.fields.get("job_id") == job_id]

    async def claim(self, model: str, n: int, owner: str) -> builtins.list[HeldJob]:
        """Lease up to n queued jobs of `model` and mark them running; jobs that cannot start are settled."""
        deadline = self._lease_deadline()
        raw = await self._claim(keys=[self.keys.batch_ready(model), self.keys.batch_leases,
                                      self.keys.batch_lease_tokens, self.keys.batch_models,
                                      self.keys.batch_claim_seq],
                                args=[n, deadline, owner, model])
        if not raw:
            return []
        claimed = [(text(raw[i]), text(raw[i + 1]), float(raw[i + 2])) for i in range(0, len(raw), 3)]
        now = repr(time.time())
        pipe = self.redis.pipeline(transaction=False)
        for job_id, token, _ in claimed:
            await self._start(keys=[self.keys.job(job_id)],
                        args=[token, owner, now, self.settings.batch_max_attempts,
                              self.settings.batch_job_ttl_seconds], client=pipe)
        results = await pipe.execute()
        held: list[HeldJob] = []
        settle = self.redis.pipeline(transaction=False)
        for (job_id, token, score), result in zip(claimed, results, strict=True):
            outcome = text(result[0])
            if outcome == "running":
                job = HeldJob(job_id, token, score, _pairs(result[1]))
                held.append(job)
                self._xadd(settle, job.fields, "started")
                continue
            # Cancelled while queued, expired, or out of attempts: it must not stay leased.
            await self._release(keys=[self.keys.batch_leases, self.keys.batch_lease_tokens],
                                args=[job_id, token], client=settle)
            if outcome == "gave_up":
                fields = _pairs(result[1])
                self._xadd(settle, fields, "failed")
                metrics.BATCH_JOBS.labels("failed").inc()
        await settle.execute()
        return held

    async def update(self, job: HeldJob, fields: Mapping[str, str | bytes], *, attempt_delta: int = 0,
                     final: bool = False) -> int | None:
        """Change a running job we hold; the new attempt number, or None if we no longer hold it."""
        args: list[Any] = [job.token, repr(time.time()),
                           self.settings.batch_job_ttl_seconds if final else 0, attempt_delta]
        for k, v in fields.items():
            args.extend((k, v))
        result = await self._update(keys=[self.keys.job(job.id)], args=args)
        if result == -1:
            return None
        job.fields["attempt"] = str(result)
        for k, v in fields.items():
            if isinstance(v, str):
                job.fields[k] = v
        return int(result)

    async def finish(self, job: HeldJob, fields: Mapping[str, str | bytes], event: str) -> bool:
        """Write a final outcome of a job we hold, append its event, drop the lease; False if not ours.

        The job hash records the event as `final_event` with the outcome, and the lease goes last: if this
        process dies before the event is in the stream, the lease runs out and the reaper appends it (a
        finished job that still has a lease is exactly that case, so the field needs no clearing).
        """
        job.settled = True
        result = await self.update(job, {**fields, "final_event": event}, final=True)
        # One round trip for the rest; commands run in order, so the lease still goes last.
        pipe = self.redis.pipeline(transaction=False)
        if result is not None:
            self._xadd(pipe, job.fields, event)
        await self._release(keys=[self.keys.batch_leases, self.keys.batch_lease_tokens],
                            args=[job.id, job.token], client=pipe)
        await pipe.execute()
        return result is not None

    async def release(self, job: HeldJob) -> None:
        """Drop our lease of a job that reached a final state (or that we lost)."""
        await self._release(keys=[self.keys.batch_leases, self.keys.batch_lease_tokens], args=[job.id, job.token])

    async def requeue(self, job: HeldJob, reason: str, *, count_attempt: bool) -> bool:
        """Put a job we hold back in the queue at its original place (e.g. preempted by a swap)."""
        job.settled = True
        attempt = await self.update(job, {"status": JobStatus.QUEUED.value, "claim": "", "requeue_reason": reason},
                                    attempt_delta=0 if count_attempt else -1)
        if attempt is None:
            await self.release(job)
            return False
        await self._requeue(keys=[self.keys.batch_leases, self.keys.batch_lease_tokens,
                                  self.keys.batch_ready(job.model), self.keys.batch_models],
                            args=[job.id, job.token, repr(job.score), job.model])
        pipe = self.redis.pipeline(transaction=False)
        self._xadd(pipe, {**job.fields, "status": JobStatus.QUEUED.value}, "requeued", reason=reason)
        pipe.publish(self.keys.batch_notify, job.model)
        await pipe.execute()
        metrics.BATCH_JOBS.labels("requeued").inc()
        return True

    async def renew(self, jobs: Iterable[HeldJob]) -> set[str]:
        """Extend the leases of the jobs we hold; returns the ids whose lease we lost."""
        args: list[Any] = [self._lease_deadline()]
        for job in jobs:
            if not job.settled:
                args.extend((job.id, job.token))
        if len(args) == 1:
            return set()
        lost = await self._renew(keys=[self.keys.batch_leases, self.keys.batch_lease_tokens], args=args)
        return set(texts(lost))

    async def reap(self, limit: int = 200) -> int:
        """Take back jobs whose holder stopped renewing its lease; returns how many were requeued."""
        now_ms = int(time.time() * 1000)
        expired = await self.redis.zrangebyscore(self.keys.batch_leases, "-inf", now_ms, start=0, num=limit)
        if not expired:
            return 0
        ids = texts(cast("list[bytes | str]", expired))  # members only: no WITHSCORES
        tokens = await self.redis.hmget(self.keys.batch_lease_tokens, ids)
        requeued = 0
        for job_id, raw_token in zip(ids, tokens, strict=True):
            token = opt_text(raw_token) or ""
            raw = await self.redis.hmget(self.keys.job(job_id), ["status", "claim", "model", "score",
                                                                 "final_event"])
            status, claim, model, score, pending = (opt_text(v) for v in raw)
            lease_args = [self.keys.batch_leases, self.keys.batch_lease_tokens]
            if token and status == JobStatus.RUNNING and claim == token and model and score:
                held = HeldJob(job_id, token, float(score), {"model": model})
                attempt = await self.update(held, {"status": JobStatus.QUEUED.value, "claim": "",
                                                   "requeue_reason": "lease_expired"})
                if attempt is not None:
                    status = JobStatus.QUEUED.value
            if token and status == JobStatus.QUEUED and model and score:
                # Also covers a holder that died between marking the job queued and moving its id back.
                ok = await self._requeue(keys=[*lease_args, self.keys.batch_ready(model), self.keys.batch_models],
                                         args=[job_id, token, score, model])
                if ok:
                    requeued += 1
                    job = await self.get(job_id)
                    if job is not None:
                        await self.event(job, "requeued", reason="lease_expired")
                    metrics.BATCH_JOBS.labels("requeued").inc()
                    log.warning("lease_expired_requeued", job_id=job_id, token=token)
                    await self.redis.publish(self.keys.batch_notify, model)
            else:
                if pending and status in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED):
                    # Its holder died after writing the outcome but before the event reached the stream.
                    job = await self.get(job_id)
                    if job is not None:
                        pipe = self.redis.pipeline(transaction=False)
                        self._xadd(pipe, job, pending, reason="recovered")
                        await pipe.execute()
                await self._release(keys=lease_args, args=[job_id, token])
        return requeued

    async def trim_events(self) -> None:
        """Trim the event stream by age when JOB_STREAM_MAX_AGE_SECONDS is set (length trims on XADD)."""
        age = self.settings.job_stream_max_age_seconds
        if age > 0:
            min_id = f"{int((time.time() - age) * 1000)}-0"
            # Exact: an approximate MINID trim keeps whole macro nodes, which could hold old entries forever
            # on a quiet stream; this runs every few seconds and removes only what is due.
            await self.redis.xtrim(self.keys.job_events, minid=min_id, approximate=False)

    # --- events
    async def event(self, job: Mapping[str, str], event: str, **extra: str) -> None:
        """Append one state change of a job to the event stream."""
        pipe = self.redis.pipeline(transaction=False)
        self._xadd(pipe, job, event, **extra)
        await pipe.execute()

    def _xadd(self, pipe: Any, job: Mapping[str, str], event: str, **extra: str) -> None:
        entry = {
            "event": event,
            "job_id": job.get("id", ""),
            "key_id": job.get("key_id", ""),
            "model": job.get("model", ""),
            "status": job.get("status", ""),
            "priority": job.get("priority", ""),
            "attempt": job.get("attempt", "0"),
            "at": repr(time.time()),
        }
        # Optional fields only when they say something (fewer bytes per event on the hot path).
        for name in ("owner", "error", "flags", "crash_log"):
            if job.get(name):
                entry[name] = job[name]
        entry.update({k: v for k, v in extra.items() if v})
        maxlen = self.settings.job_stream_maxlen or None
        pipe.xadd(self.keys.job_events, entry, maxlen=maxlen, approximate=True)

    def _lease_deadline(self) -> int:
        return int((time.time() + self.settings.batch_lease_seconds) * 1000)
