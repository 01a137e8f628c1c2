"""The durable batch queue in Redis: enqueue, claim with a lease, fenced updates, reaping, the event stream.

Every key of the queue (job hashes, per-key indexes, ready sets per model, the model set, leases, lease
tokens, the event stream) carries the `{batch}` hash tag, so on a Redis Cluster they share one slot and
each queue step is one Lua script (docs/batch.md, docs/redis.md): enqueue, claim, mark-sent, update,
finish, requeue, reap, cancel. A step therefore changes the job's status, the queue's bookkeeping and
appends the job's event together or not at all; nothing depends on the order of commands in a pipeline.
A job's status changes are fenced by the holder's claim token, so a stale holder changes nothing.
"""

from __future__ import annotations

import asyncio
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

from gateway import metrics, redis_client
from gateway.batch.jobs import PRIORITY_MAX, PRIORITY_MIN, JobStatus, Submission, decode_hash, new_job_id
from gateway.redis_codec import opt_text, stream_entries, text, texts, xread_entries
from gateway.redis_keys import RedisKeys
from gateway.settings import Settings

log = structlog.get_logger(component="batch_queue")

# Every script below touches only `{batch}` keys (one hash slot): the job hash, whose name the script
# builds from the job-key prefix it is given (ARGV), and the queue keys it is passed (KEYS). Each queue
# step is one script, so the status change, the queue's bookkeeping and the event are written together.
_EMIT = """
local function emit(stream, maxlen, jk, name, at, attempt, ekey, evalue)
  local f = redis.call('HMGET', jk, 'id', 'key_id', 'model', 'status', 'priority', 'attempt', 'owner', 'error',
    'flags', 'crash_log')
  local e = {'event', name, 'job_id', f[1] or '', 'key_id', f[2] or '', 'model', f[3] or '', 'status', f[4] or '',
    'priority', f[5] or '', 'attempt', attempt or f[6] or '0', 'at', at}
  local opt = {'owner', 'error', 'flags', 'crash_log'}
  for i = 1, 4 do
    local v = f[6 + i]
    if v and v ~= '' then e[#e + 1] = opt[i]; e[#e + 1] = v end
  end
  if ekey and evalue and evalue ~= '' then e[#e + 1] = ekey; e[#e + 1] = evalue end
  if tonumber(maxlen) > 0 then return redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', unpack(e)) end
  return redis.call('XADD', stream, '*', unpack(e))
end
"""

# Store and queue new jobs of one key. KEYS: events, owners, the key's job index, models.
# ARGV: maxlen, at, key_id, job-key prefix, ready-key prefix, notify channel, job count, then per job:
# id, model, score, field count, field, value, ... A replay (a retried call) finds the first job and
# changes nothing, so a retry never duplicates jobs.
_ENQUEUE = _EMIT + """
local n = tonumber(ARGV[7])
local pos = 8
if n == 0 then return 0 end
if redis.call('EXISTS', ARGV[4] .. ARGV[pos]) == 1 then return 0 end
-- Check every key it will write before writing any (a script stops at a failing command but keeps what it
-- already wrote): a key of the wrong type fails the call with nothing written.
local function expect(key, kind)
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= kind then
    return redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. t .. ', the batch queue needs a ' .. kind)
  end
end
local bad = expect(KEYS[1], 'stream') or expect(KEYS[2], 'set') or expect(KEYS[3], 'zset') or expect(KEYS[4], 'set')
if bad then return bad end
local scan = pos
for j = 1, n do
  bad = expect(ARGV[5] .. ARGV[scan + 1], 'zset')
  if bad then return bad end
  scan = scan + 4 + 2 * tonumber(ARGV[scan + 3])
end
local models = {}
for j = 1, n do
  local id, model, score, nf = ARGV[pos], ARGV[pos + 1], ARGV[pos + 2], tonumber(ARGV[pos + 3])
  local jk = ARGV[4] .. id
  for i = pos + 4, pos + 3 + 2 * nf, 2 do redis.call('HSET', jk, ARGV[i], ARGV[i + 1]) end
  pos = pos + 4 + 2 * nf
  redis.call('ZADD', KEYS[3], 0, id)
  redis.call('ZADD', ARGV[5] .. model, score, id)
  if not models[model] then
    models[model] = true
    redis.call('SADD', KEYS[4], model)
  end
  emit(KEYS[1], ARGV[1], jk, 'enqueued', ARGV[2])
end
redis.call('SADD', KEYS[2], ARGV[3])
for model, _ in pairs(models) do redis.call('PUBLISH', ARGV[6], model) end
return n
"""

# Pop up to N queued ids of one model, lease each with a unique claim token and mark it running (or fail it
# when its attempts are used up). KEYS: ready, leases, lease tokens, models, claim seq, events.
# ARGV: n, lease deadline ms, owner, model, job-key prefix, now, max attempts, ttl, maxlen.
_CLAIM = _EMIT + """
local popped = redis.call('ZPOPMIN', KEYS[1], tonumber(ARGV[1]))
local out = {}
for i = 1, #popped, 2 do
  local id, score = popped[i], popped[i + 1]
  local jk = ARGV[5] .. id
  local st = redis.call('HGET', jk, 'status')
  if st == 'queued' then
    local attempt = tonumber(redis.call('HGET', jk, 'attempt') or '0')
    if attempt >= tonumber(ARGV[7]) then
      local flags = redis.call('HGET', jk, 'flags') or ''
      if flags ~= '' then flags = flags .. ',' end
      redis.call('HSET', jk, 'status', 'failed', 'claim', '', 'finished_at', ARGV[6], 'updated_at', ARGV[6],
        'error', 'Gave up after ' .. attempt .. ' attempts: the gateway running the job stopped each time.',
        'error_type', 'batch_job_failed', 'error_code', 'lease_expired', 'flags', flags .. 'max_attempts')
      redis.call('EXPIRE', jk, ARGV[8])
      emit(KEYS[6], ARGV[9], jk, 'failed', ARGV[6])
      out[#out + 1] = {id, '', score, {}}
    else
      local token = ARGV[3] .. ':' .. string.format('%d', redis.call('INCR', KEYS[5]))
      redis.call('ZADD', KEYS[2], ARGV[2], id)
      redis.call('HSET', KEYS[3], id, token)
      redis.call('HSET', jk, 'status', 'running', 'claim', token, 'owner', ARGV[3], 'updated_at', ARGV[6])
      redis.call('HSETNX', jk, 'started_at', ARGV[6])
      emit(KEYS[6], ARGV[9], jk, 'started', ARGV[6], tostring(attempt + 1))
      out[#out + 1] = {id, token, score, redis.call('HGETALL', jk)}
    end
  end
end
if redis.call('ZCARD', KEYS[1]) == 0 then redis.call('SREM', KEYS[4], ARGV[4]) end
return out
"""

# The holder sends the job to the runtime: that is when an attempt counts, once per claim (a resent call
# counts nothing more). KEYS: job. ARGV: token, now.
_MARK_SENT = """
if ARGV[1] == '' or redis.call('HGET', KEYS[1], 'claim') ~= ARGV[1]
   or redis.call('HGET', KEYS[1], 'status') ~= 'running' then
  return -1
end
if redis.call('HGET', KEYS[1], 'sent') == ARGV[1] then
  return tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0')
end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[2], 'sent', ARGV[1])
return redis.call('HINCRBY', KEYS[1], 'attempt', 1)
"""

# Change a running job only if the caller still holds it (fencing by claim token), with its event if any.
# KEYS: job, events. ARGV: token, now, ttl (0 = none), attempt delta, event ('' = none), reason, maxlen,
# the attempt the caller saw, then field, value, ... A change of the attempt applies only from the attempt
# the caller saw: a resent call (its reply was lost) changes nothing more.
_UPDATE = _EMIT + """
if ARGV[1] == '' or redis.call('HGET', KEYS[1], 'claim') ~= ARGV[1]
   or redis.call('HGET', KEYS[1], 'status') ~= 'running' then
  return -1
end
local a = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0')
if tonumber(ARGV[4]) ~= 0 then
  if a ~= tonumber(ARGV[8]) then return a end
  a = redis.call('HINCRBY', KEYS[1], 'attempt', ARGV[4])
end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[2])
if #ARGV > 8 then redis.call('HSET', KEYS[1], unpack(ARGV, 9)) end
if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
if ARGV[5] ~= '' then emit(KEYS[2], ARGV[7], KEYS[1], ARGV[5], ARGV[2], nil, 'reason', ARGV[6]) end
return a
"""

# Write the final outcome of a job we hold, its event, and drop our lease, in one step.
# KEYS: job, leases, lease tokens, events. ARGV: token, now, ttl, event, maxlen, job id, field, value, ...
# Returns 1 when written, 0 when the job was no longer ours (the lease is dropped either way if ours).
_FINISH = _EMIT + """
local ours = ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'claim') == ARGV[1]
  and redis.call('HGET', KEYS[1], 'status') == 'running'
if ours then
  redis.call('HSET', KEYS[1], 'updated_at', ARGV[2], 'claim', '')
  if #ARGV > 6 then redis.call('HSET', KEYS[1], unpack(ARGV, 7)) end
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  emit(KEYS[4], ARGV[5], KEYS[1], ARGV[4], ARGV[2])
end
if redis.call('HGET', KEYS[3], ARGV[6]) == ARGV[1] then
  redis.call('ZREM', KEYS[2], ARGV[6])
  redis.call('HDEL', KEYS[3], ARGV[6])
end
if ours then return 1 end
return 0
"""

# Drop a lease, but only for the holder of its token ('' = a lease that lost its token).
_RELEASE = """
local t = redis.call('HGET', KEYS[2], ARGV[1])
if (t == false and ARGV[2] == '') or t == ARGV[2] then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  return 1
end
return 0
"""

# Give a job we hold back to its model's ready set at its place, with its event and a wake-up.
# KEYS: job, leases, lease tokens, events, ready, models.
# ARGV: token, now, attempt delta, reason, score, model, maxlen, notify channel, job id.
_REQUEUE = _EMIT + """
local ours = ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'claim') == ARGV[1]
  and redis.call('HGET', KEYS[1], 'status') == 'running'
if redis.call('HGET', KEYS[3], ARGV[9]) == ARGV[1] then
  redis.call('ZREM', KEYS[2], ARGV[9])
  redis.call('HDEL', KEYS[3], ARGV[9])
end
if not ours then return 0 end
if tonumber(ARGV[3]) ~= 0 then redis.call('HINCRBY', KEYS[1], 'attempt', ARGV[3]) end
redis.call('HSET', KEYS[1], 'status', 'queued', 'claim', '', 'requeue_reason', ARGV[4], 'updated_at', ARGV[2])
redis.call('ZADD', KEYS[5], ARGV[5], ARGV[9])
redis.call('SADD', KEYS[6], ARGV[6])
emit(KEYS[4], ARGV[7], KEYS[1], 'requeued', ARGV[2], nil, 'reason', ARGV[4])
redis.call('PUBLISH', ARGV[8], ARGV[6])
return 1
"""

# Push the deadline of every lease still held with the given token; return the lost ids.
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

# Take back one job whose lease ran out: requeue it if it is still running under that lease, else just
# drop the lease. KEYS: leases, lease tokens, events, models.
# ARGV: job id, now, now ms, job-key prefix, ready-key prefix, maxlen, notify channel.
_REAP = _EMIT + """
local deadline = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not deadline or tonumber(deadline) > tonumber(ARGV[3]) then return 0 end
local token = redis.call('HGET', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
local jk = ARGV[4] .. ARGV[1]
local f = redis.call('HMGET', jk, 'status', 'claim', 'model', 'score')
if not token or f[1] ~= 'running' or f[2] ~= token or not f[3] or not f[4] then return 0 end
redis.call('HSET', jk, 'status', 'queued', 'claim', '', 'requeue_reason', 'lease_expired', 'updated_at', ARGV[2])
redis.call('ZADD', ARGV[5] .. f[3], f[4], ARGV[1])
redis.call('SADD', KEYS[4], f[3])
emit(KEYS[3], ARGV[6], jk, 'requeued', ARGV[2], nil, 'reason', 'lease_expired')
redis.call('PUBLISH', ARGV[7], f[3])
return 1
"""

# Cancel a queued or running job of the given key. KEYS: job, events.
# ARGV: now, ttl, key_id, ready-key prefix, cancel channel, maxlen, job id.
_CANCEL = _EMIT + """
local f = redis.call('HMGET', KEYS[1], 'status', 'key_id', 'model')
if not f[1] or f[2] ~= ARGV[3] then return {'missing'} end
if f[1] ~= 'queued' and f[1] ~= 'running' then return {f[1]} end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'claim', '', 'finished_at', ARGV[1], 'updated_at', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
if f[1] == 'queued' then
  redis.call('ZREM', ARGV[4] .. f[3], ARGV[7])
else
  -- The holder (any gateway) stops the request; if it is gone, its lease runs out.
  redis.call('PUBLISH', ARGV[5], ARGV[7])
end
emit(KEYS[2], ARGV[6], KEYS[1], 'cancelled', ARGV[1])
-- A cancelled job is never sent again: its stored request goes now, not when the job expires.
redis.call('HDEL', KEYS[1], 'request')
return {'done', f[1]}
"""

# Operator (`llm-gateway jobs requeue`): failed -> queued with a fresh set of attempts, claimable at once.
# KEYS: job, events, models. ARGV: now, reason, ready-key prefix, notify channel, maxlen, job id.
_REQUEUE_FAILED = _EMIT + """
local f = redis.call('HMGET', KEYS[1], 'status', 'model', 'score')
if not f[1] then return {'missing'} end
if f[1] ~= 'failed' then return {f[1]} end
redis.call('HSET', KEYS[1], 'status', 'queued', 'claim', '', 'attempt', '0', 'updated_at', ARGV[1],
  'requeue_reason', ARGV[2], 'error', '', 'error_type', '', 'error_code', '', 'runtime_status', '',
  'crash_log', '', 'flags', '')
redis.call('HDEL', KEYS[1], 'finished_at', 'response', 'usage', 'final_event')
redis.call('PERSIST', KEYS[1])
redis.call('ZADD', ARGV[3] .. f[2], f[3], ARGV[6])
redis.call('SADD', KEYS[3], f[2])
emit(KEYS[2], ARGV[5], KEYS[1], 'requeued', ARGV[1], nil, 'reason', ARGV[2])
redis.call('PUBLISH', ARGV[4], f[2])
return {'requeued'}
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
    sent: bool = False
    """Set by `JobQueue.mark_sent`: this claim's attempt has been counted."""

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
        self._enqueue = redis.register_script(_ENQUEUE)
        self._claim = redis.register_script(_CLAIM)
        self._mark_sent = redis.register_script(_MARK_SENT)
        self._release = redis.register_script(_RELEASE)
        self._requeue = redis.register_script(_REQUEUE)
        self._renew = redis.register_script(_RENEW)
        self._update = redis.register_script(_UPDATE)
        self._finish = redis.register_script(_FINISH)
        self._reap = redis.register_script(_REAP)
        self._cancel = redis.register_script(_CANCEL)
        self._requeue_failed = redis.register_script(_REQUEUE_FAILED)
        self._finishing: builtins.list[tuple[tuple[HeldJob, Mapping[str, str | bytes], str], asyncio.Future[bool]]] = []
        self._finisher: asyncio.Task[None] | None = None

    # --- scoring
    def score(self, created_at: float, priority: int) -> float:
        """Queue order: each priority level is worth BATCH_AGING_SECONDS of waiting (lower runs first)."""
        return created_at - priority * self.settings.batch_aging_seconds

    # --- API side
    async def enqueue(self, key_id: str, submission: Submission) -> dict[str, str]:
        """Store a new job and queue it in one script (all of it or nothing); returns its decoded hash."""
        (fields,) = await self.enqueue_chunk(key_id, [submission])
        return fields

    async def enqueue_chunk(self, key_id: str, submissions: Sequence[Submission]) -> builtins.list[dict[str, str]]:
        """Store and queue several jobs of one key in one script: either all of them exist afterwards, or
        none does. A call retried after a lost reply finds its jobs and adds nothing."""
        now = time.time()
        jobs: builtins.list[dict[str, str]] = []
        args: builtins.list[Any] = [self.settings.job_stream_maxlen or 0, repr(now), key_id, self.keys.job(""),
                           self.keys.batch_ready(""), self.keys.batch_notify, len(submissions)]
        for submission in submissions:
            fields = self._new_fields(key_id, submission, now)
            stored = {**fields, "request": submission.body}
            args.extend((fields["id"], submission.model, fields["score"], len(stored)))
            for k, v in stored.items():
                args.extend((k, v))
            jobs.append(fields)
        await self._enqueue(keys=[self.keys.job_events, self.keys.job_owners, self.keys.job_index(key_id),
                                  self.keys.batch_models], args=args)
        metrics.BATCH_JOBS.labels("enqueued").inc(len(jobs))
        return jobs

    def _new_fields(self, key_id: str, submission: Submission, now: float) -> dict[str, str]:
        created = max(now, time.time())
        job_id = new_job_id(created)
        return {
            "id": job_id, "key_id": key_id, "endpoint": str(submission.endpoint), "model": submission.model,
            "priority": str(submission.priority), "metadata": orjson.dumps(submission.metadata).decode(),
            "status": JobStatus.QUEUED.value, "score": repr(self.score(created, submission.priority)),
            "created_at": repr(created), "updated_at": repr(created), "attempt": "0",
            "max_attempts": str(self.settings.batch_max_attempts), "flags": "", "claim": "",
        }

    async def get(self, job_id: str, key_id: str | None = None) -> dict[str, str] | None:
        """The decoded job hash, or None when missing (or owned by another key when key_id is given)."""
        raw = await self.redis.hgetall(self.keys.job(job_id))
        if not raw:
            return None
        job = decode_hash(raw)
        if key_id is not None and job.get("key_id") != key_id:
            return None
        return job

    async def job_fields(self, job_ids: Sequence[str], fields: Sequence[str]
                         ) -> builtins.list[builtins.list[bytes | None]]:
        """HMGET of `fields` for each of `job_ids`, in their order, as raw values (a job whose hash expired
        or was deleted gives None for every field). One pipeline: every job hash is in the `{batch}` slot."""
        if not job_ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self.keys.job(job_id), builtins.list(fields))
        return [builtins.list(row) for row in await pipe.execute()]

    async def statuses(self, job_ids: Sequence[str]) -> builtins.list[str | None]:
        """The status of each of `job_ids`, in their order (None for a job whose hash is gone)."""
        return [opt_text(status) for (status,) in await self.job_fields(job_ids, ("status",))]

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
        (result,) = await redis_client.run_scripts(self.redis, [self._cancel_call(job_id, key_id, repr(time.time()))])
        outcome = text(result[0])
        if outcome == "missing":
            return outcome, None
        if outcome == "done":
            outcome = "cancelled"
            metrics.BATCH_JOBS.labels("cancelled").inc()
        else:
            outcome = f"already:{outcome}"
        return outcome, await self.get(job_id)

    def _cancel_call(self, job_id: str, key_id: str, now: str) -> redis_client.ScriptCall:
        return (self._cancel, [self.keys.job(job_id), self.keys.job_events],
                [now, self.settings.batch_job_ttl_seconds, key_id, self.keys.batch_ready(""), self.keys.batch_cancel,
                 self.settings.job_stream_maxlen or 0, job_id])

    def enqueue_many(self, pipe: Any, key_id: str, submissions: Sequence[Submission]) -> builtins.list[dict[str, str]]:
        """Add the commands that store and queue new jobs to `pipe`, a transaction; the caller executes it.

        For callers that enqueue many jobs at once in the same MULTI/EXEC as their own bookkeeping (the
        OpenAI Batches manager records its progress atomically with the jobs; its keys share the queue's
        `{batch}` slot). The order inside a MULTI holds, so the hash is written before the id is claimable.
        A cluster transaction takes no PUBLISH: the caller calls `notify` once it has run, and counts
        BATCH_JOBS{event="enqueued"}.
        """
        out: builtins.list[dict[str, str]] = []
        models: set[str] = set()
        now = time.time()
        for submission in submissions:
            fields = self._new_fields(key_id, submission, now)
            job_id = fields["id"]
            pipe.hset(self.keys.job(job_id), mapping={**fields, "request": submission.body})
            pipe.zadd(self.keys.job_index(key_id), {job_id: 0})
            pipe.zadd(self.keys.batch_ready(submission.model), {job_id: float(fields["score"])})
            models.add(submission.model)
            self._xadd(pipe, fields, "enqueued")
            out.append(fields)
        if submissions:
            pipe.sadd(self.keys.job_owners, key_id)
        for model in models:
            pipe.sadd(self.keys.batch_models, model)
        return out

    async def notify(self, models: Iterable[str]) -> None:
        """Wake idle dispatchers for work just queued on `models` (a hint: they also poll)."""
        for model in sorted(set(models)):
            await self.redis.publish(self.keys.batch_notify, model)

    async def cancel_many(self, job_ids: Sequence[str], key_id: str) -> int:
        """Cancel the queued or running ones among `job_ids` (of `key_id`), 500 per round trip; how many."""
        cancelled = 0
        now = repr(time.time())
        for start in range(0, len(job_ids), 500):
            chunk = job_ids[start:start + 500]
            results = await redis_client.run_scripts(self.redis, [self._cancel_call(j, key_id, now) for j in chunk])
            done = sum(1 for result in results if text(result[0]) == "done")
            cancelled += done
            metrics.BATCH_JOBS.labels("cancelled").inc(done)
        return cancelled

    async def requeue_failed(self, job_id: str, reason: str = "operator") -> str:
        """Put a failed job back in the queue at its original place with fresh attempts (operator action).

        Returns 'requeued', 'missing', or the status that prevented it (only failed jobs are requeued).
        """
        result = await self._requeue_failed(
            keys=[self.keys.job(job_id), self.keys.job_events, self.keys.batch_models],
            args=[repr(time.time()), reason, self.keys.batch_ready(""), self.keys.batch_notify,
                  self.settings.job_stream_maxlen or 0, job_id])
        outcome = text(result[0])
        if outcome == "requeued":
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

    async def model_backlog(self, model: str) -> tuple[int, float | None]:
        """Queued jobs for one model, and its most urgent job's score (enqueue time less priority aging)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(self.keys.batch_ready(model))
        pipe.zrange(self.keys.batch_ready(model), 0, 0, withscores=True)
        count, head = await pipe.execute()
        return int(count), float(head[0][1]) if head else None

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
        """Lease up to n queued jobs of `model` and mark them running, in one script; jobs out of attempts
        are failed there. A claimed job costs no attempt until `mark_sent`."""
        raw = await self._claim(keys=[self.keys.batch_ready(model), self.keys.batch_leases,
                                      self.keys.batch_lease_tokens, self.keys.batch_models,
                                      self.keys.batch_claim_seq, self.keys.job_events],
                                args=[n, self._lease_deadline(), owner, model, self.keys.job(""), repr(time.time()),
                                      self.settings.batch_max_attempts, self.settings.batch_job_ttl_seconds,
                                      self.settings.job_stream_maxlen or 0])
        held: builtins.list[HeldJob] = []
        for job_id, token, score, fields in raw or []:
            if not token:
                metrics.BATCH_JOBS.labels("failed").inc()  # gave up: out of attempts
                continue
            held.append(HeldJob(text(job_id), text(token), float(score), _pairs(fields)))
        return held

    async def mark_sent(self, job: HeldJob) -> int | None:
        """Count the attempt of a held job that is now being sent to the runtime (claimed-ahead jobs that are
        never sent cost none); the new attempt number, or None if we no longer hold the job."""
        result = await self._mark_sent(keys=[self.keys.job(job.id)], args=[job.token, repr(time.time())])
        if int(result) < 0:
            return None
        job.sent = True
        job.fields["attempt"] = str(result)
        return int(result)

    async def update(self, job: HeldJob, fields: Mapping[str, str | bytes], *, attempt_delta: int = 0,
                     final: bool = False, event: str = "", reason: str = "") -> int | None:
        """Change a running job we hold, with its `event` (if any) in the same step; the new attempt
        number, or None if we no longer hold it."""
        args: builtins.list[Any] = [job.token, repr(time.time()), self.settings.batch_job_ttl_seconds if final else 0,
                                    attempt_delta, event, reason, self.settings.job_stream_maxlen or 0, job.attempt]
        for k, v in fields.items():
            args.extend((k, v))
        result = await self._update(keys=[self.keys.job(job.id), self.keys.job_events], args=args)
        if int(result) == -1:
            return None
        job.fields["attempt"] = str(result)
        for k, v in fields.items():
            if isinstance(v, str):
                job.fields[k] = v
        return int(result)

    async def finish(self, job: HeldJob, fields: Mapping[str, str | bytes], event: str) -> bool:
        """Write a final outcome of a job we hold, its event, and drop the lease, in one script; False if
        the job was no longer ours.

        Outcomes that arrive while another finish is on the wire go together in the next round trip
        (`finish_many`), so many slots finishing at once cost one round trip, not one each.
        """
        job.settled = True
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._finishing.append(((job, fields, event), done))
        if self._finisher is None or self._finisher.done():
            self._finisher = asyncio.create_task(self._finish_pending(), name="batch_queue:finish")
        # Shielded: a caller cancelled now still has its outcome written (the job is settled).
        return await asyncio.shield(done)

    async def _finish_pending(self) -> None:
        while self._finishing:
            batch, self._finishing = self._finishing, []
            try:
                results = await self.finish_many([outcome for outcome, _ in batch])
            except BaseException as exc:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc if isinstance(exc, Exception) else RuntimeError("finish cancelled"))
                if not isinstance(exc, Exception):
                    raise
                continue
            for (_, done), result in zip(batch, results, strict=True):
                if not done.done():
                    done.set_result(result)

    async def finish_many(self, outcomes: Sequence[tuple[HeldJob, Mapping[str, str | bytes], str]]
                          ) -> builtins.list[bool]:
        """`finish` for many jobs in one round trip (one pipeline; concurrent calls on a cluster)."""
        calls: builtins.list[redis_client.ScriptCall] = []
        now = repr(time.time())
        for job, fields, event in outcomes:
            job.settled = True
            args: builtins.list[Any] = [job.token, now, self.settings.batch_job_ttl_seconds, event,
                               self.settings.job_stream_maxlen or 0, job.id]
            for k, v in fields.items():
                args.extend((k, v))
            calls.append((self._finish, [self.keys.job(job.id), self.keys.batch_leases, self.keys.batch_lease_tokens,
                                         self.keys.job_events], args))
        results = await redis_client.run_scripts(self.redis, calls)
        for (job, fields, _), result in zip(outcomes, results, strict=True):
            for k, v in fields.items():
                if isinstance(v, str):
                    job.fields[k] = v
            if int(result) != 1:
                log.info("batch_finish_not_ours", job_id=job.id)
        return [int(r) == 1 for r in results]

    async def release(self, job: HeldJob) -> None:
        """Drop our lease of a job that reached a final state (or that we lost)."""
        await self._release(keys=[self.keys.batch_leases, self.keys.batch_lease_tokens], args=[job.id, job.token])

    async def requeue(self, job: HeldJob, reason: str, *, count_attempt: bool) -> bool:
        """Put a job we hold back in the queue at its original place (e.g. preempted by a swap), in one script.

        With count_attempt False an attempt already counted by `mark_sent` is given back; a job never sent
        has cost none either way.
        """
        job.settled = True
        if job.sent:
            delta = 0 if count_attempt else -1
        else:
            delta = 1 if count_attempt else 0
        ok = await self._requeue(keys=[self.keys.job(job.id), self.keys.batch_leases, self.keys.batch_lease_tokens,
                                       self.keys.job_events, self.keys.batch_ready(job.model), self.keys.batch_models],
                                 args=[job.token, repr(time.time()), delta, reason, repr(job.score), job.model,
                                       self.settings.job_stream_maxlen or 0, self.keys.batch_notify, job.id])
        if int(ok) != 1:
            return False
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
        """Take back jobs whose holder stopped renewing its lease (one script each); how many were requeued."""
        now = time.time()
        now_ms = int(now * 1000)
        expired = await self.redis.zrangebyscore(self.keys.batch_leases, "-inf", now_ms, start=0, num=limit)
        if not expired:
            return 0
        ids = texts(cast("list[bytes | str]", expired))  # members only: no WITHSCORES
        calls: builtins.list[redis_client.ScriptCall] = [
            (self._reap, [self.keys.batch_leases, self.keys.batch_lease_tokens, self.keys.job_events,
                          self.keys.batch_models],
             [job_id, repr(now), now_ms, self.keys.job(""), self.keys.batch_ready(""),
              self.settings.job_stream_maxlen or 0, self.keys.batch_notify]) for job_id in ids]
        results = await redis_client.run_scripts(self.redis, calls)
        requeued = 0
        for job_id, result in zip(ids, results, strict=True):
            if int(result) == 1:
                requeued += 1
                metrics.BATCH_JOBS.labels("requeued").inc()
                log.warning("lease_expired_requeued", job_id=job_id)
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

    # --- per-key caps (BATCH_KEY_MAX_JOBS)
    async def held_jobs(self, key_id: str, *, at_least: int | None = None) -> int:
        """How many jobs `key_id` holds (any status, until their TTL), from its index.

        The index keeps ids of expired jobs until a listing prunes them, so the count can be high; when it
        reaches `at_least`, the expired ids are pruned first and the count taken again.
        """
        index = self.keys.job_index(key_id)
        count = int(await self.redis.zcard(index))
        if at_least is None or count < at_least:
            return count
        start = 0
        while True:
            ids = texts(cast("list[bytes]", await self.redis.zrange(index, start, start + 999)))
            if not ids:
                break
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.exists(self.keys.job(job_id))
            gone = [job_id for job_id, alive in zip(ids, await pipe.execute(), strict=True) if not alive]
            if gone:
                await self.redis.zrem(index, *gone)
            start += len(ids) - len(gone)
        return int(await self.redis.zcard(index))
