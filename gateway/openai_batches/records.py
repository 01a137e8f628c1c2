"""OpenAI-style batch records in Redis: create, read, list, compare-and-set status changes, the public view.

One hash per batch (`openai_batch:<id>`) holds its state, counters and the progress cursor of the
enqueue pass; `openai_batches_active` lists the batches a manager must drive (resumed on start-up).
Every status change goes through one Lua compare-and-set, so the HTTP cancel and the manager never
overwrite each other's transition.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson
from redis.asyncio import Redis

from gateway import redis_client
from gateway.redis_codec import as_bytes, hash_fields, opt_text, text, text_hash, texts
from gateway.redis_keys import RedisKeys

# Change status only when it is one of the expected ones: ARGV = n, status_1..status_n, field, value, ...
_TRANSITION = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
local n = tonumber(ARGV[1])
for i = 2, n + 1 do
  if ARGV[i] == st then
    redis.call('HSET', KEYS[1], unpack(ARGV, n + 2))
    return 'ok'
  end
end
return st
"""

# The batch's owner lease lives in its own hash (one key: one slot on a cluster). Take it when free,
# expired or already ours: ARGV = owner, ttl ms. 'ok', 'taken' (another live owner) or 'missing'.
_TAKE_OWNER = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cur = redis.call('HGET', KEYS[1], 'owner')
local deadline = tonumber(redis.call('HGET', KEYS[1], 'owner_until') or '0') or 0
if cur and cur ~= '' and cur ~= ARGV[1] and deadline > now then return 'taken' end
if cur ~= ARGV[1] then redis.call('HINCRBY', KEYS[1], 'owner_epoch', 1) end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'owner_until', now + tonumber(ARGV[2]))
return 'ok'
"""

_RELEASE_OWNER = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'owner', '', 'owner_until', '0')
end
return 1
"""

# A status change fenced by the owner lease: ARGV = owner, n, status_1..status_n, field, value, ...
_TRANSITION_OWNED = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 'not_owner' end
local n = tonumber(ARGV[2])
for i = 3, n + 2 do
  if ARGV[i] == st then
    redis.call('HSET', KEYS[1], unpack(ARGV, n + 3))
    return 'ok'
  end
end
return st
"""


class BatchStatus(StrEnum):
    """OpenAI's batch statuses; the last four are final."""

    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        """True when nothing will happen to the batch any more."""
        return self in (BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED)


_BATCH_ID = re.compile(r"^batch_[0-9a-f]{24,32}$")


def new_batch_id(now: float | None = None) -> str:
    """A batch id whose text order is its creation order (like job ids), for cursor pagination."""
    micros = time.time_ns() // 1000 if now is None else round(now * 1_000_000)
    return f"batch_{micros:014x}{secrets.token_hex(5)}"


@dataclass(frozen=True, slots=True)
class BatchPage:
    """One page of a key's batches, newest first."""

    batches: list[dict[str, str]]
    has_more: bool


async def file_in_use(redis: Redis, keys: RedisKeys, fid: str, key_id: str) -> bool:
    """True while a batch of `key_id` that has not finished reads the file `fid` (deleting it, through the
    Files API or TUS termination, would take the input from under the batch)."""
    active = texts(await redis.smembers(keys.openai_batches_active))
    if not active:
        return False
    pipe = redis.pipeline(transaction=False)
    for batch_id in active:
        pipe.hmget(keys.openai_batch(batch_id), ["input_file_id", "status", "key_id"])
    for input_id, status, owner in await pipe.execute():
        if (input_id is not None and opt_text(input_id) == fid and status is not None and owner is not None
                and not BatchStatus(text(status)).final and opt_text(owner) == key_id):
            return True
    return False


class BatchRecords:
    """Every Redis operation on batch records."""

    def __init__(self, redis: Redis, keys: RedisKeys, ttl_seconds: int) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_seconds = ttl_seconds
        self._transition = redis.register_script(_TRANSITION)
        self._take_owner = redis.register_script(_TAKE_OWNER)
        self._release_owner = redis.register_script(_RELEASE_OWNER)
        self._transition_owned = redis.register_script(_TRANSITION_OWNED)

    async def create(self, fields: dict[str, str]) -> None:
        """Store a new batch (status validating) and make it visible to its key and to the manager."""
        pipe = await redis_client.transaction(self.redis)  # one slot: `{batch}`
        pipe.hset(self.keys.openai_batch(fields["id"]), mapping=hash_fields(fields))
        pipe.zadd(self.keys.openai_batch_index(fields["key_id"]), {fields["id"]: 0})
        pipe.sadd(self.keys.openai_batches_active, fields["id"])
        await pipe.execute()

    async def get(self, batch_id: str, key_id: str | None = None) -> dict[str, str] | None:
        """The decoded batch hash, or None (also for another key's batch when key_id is given, and for a
        text that is no batch id)."""
        if not _BATCH_ID.match(batch_id):
            return None
        raw = await self.redis.hgetall(self.keys.openai_batch(batch_id))
        if not raw:
            return None
        batch = text_hash(raw)
        if key_id is not None and batch.get("key_id") != key_id:
            return None
        return batch

    async def active_ids(self) -> list[str]:
        """Ids of batches not yet final."""
        return sorted(texts(await self.redis.smembers(self.keys.openai_batches_active)))

    async def transition(self, batch_id: str, allowed: tuple[BatchStatus, ...], fields: dict[str, str]) -> str:
        """Set `fields` if the status is one of `allowed`: 'ok', else the current status or 'missing'."""
        args: list[Any] = [len(allowed), *(s.value for s in allowed)]
        for k, v in fields.items():
            args.extend((k, v))
        result = await self._transition(keys=[self.keys.openai_batch(batch_id)], args=args)
        return text(result)

    # --- the owner lease: one manager (of one gateway) drives a batch at a time
    async def take_owner(self, batch_id: str, owner: str, seconds: float) -> str:
        """Take or renew the batch's owner lease: 'ok', 'taken' (another owner holds it) or 'missing'."""
        result = await self._take_owner(keys=[self.keys.openai_batch(batch_id)],
                                        args=[owner, max(1, int(seconds * 1000))])
        return result.decode() if isinstance(result, bytes) else str(result)

    async def release_owner(self, batch_id: str, owner: str) -> None:
        """Give the lease back if it is still ours (another manager may take the batch at once)."""
        await self._release_owner(keys=[self.keys.openai_batch(batch_id)], args=[owner])

    async def transition_owned(self, batch_id: str, owner: str, allowed: tuple[BatchStatus, ...],
                               fields: dict[str, str]) -> str:
        """`transition`, fenced: 'not_owner' (and nothing written) unless `owner` holds the lease."""
        args: list[Any] = [owner, len(allowed), *(s.value for s in allowed)]
        for k, v in fields.items():
            args.extend((k, v))
        result = await self._transition_owned(keys=[self.keys.openai_batch(batch_id)], args=args)
        return result.decode() if isinstance(result, bytes) else str(result)

    async def set(self, batch_id: str, fields: dict[str, str]) -> None:
        """Update fields that are not the status (counters, cursor)."""
        await self.redis.hset(self.keys.openai_batch(batch_id), mapping=hash_fields(fields))

    async def retire(self, batch_id: str) -> None:
        """A batch reached a final state: stop driving it; its records expire after BATCH_JOB_TTL_SECONDS."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.srem(self.keys.openai_batches_active, batch_id)
        for key in (self.keys.openai_batch(batch_id), self.keys.openai_batch_jobs(batch_id),
                    self.keys.openai_batch_errors(batch_id)):
            pipe.expire(key, self.ttl_seconds)
        await pipe.execute()

    async def forget_active(self, batch_id: str) -> None:
        """Drop a batch from the active set (its record is gone: nothing left to drive)."""
        await self.redis.srem(self.keys.openai_batches_active, batch_id)

    async def status(self, batch_id: str) -> str | None:
        """The batch's status alone (None when its record is gone)."""
        return opt_text(await self.redis.hget(self.keys.openai_batch(batch_id), "status"))

    async def status_expiring(self, batch_id: str) -> tuple[str, bool]:
        """The batch's status ('' when its record is gone) and whether it is finalizing as expired."""
        status, expiring = await self.redis.hmget(self.keys.openai_batch(batch_id), ["status", "expiring"])
        return opt_text(status) or "", opt_text(expiring) == "1"

    async def counter(self, batch_id: str, name: str) -> int:
        """An integer field of the batch (`enqueued_line`, `invalid`, ...), 0 when unset."""
        return int(await self.redis.hget(self.keys.openai_batch(batch_id), name) or 0)

    async def job_id_chunks(self, batch_id: str, size: int) -> AsyncIterator[list[str]]:
        """The batch's job ids in input-line order, `size` at a time (each chunk read when asked for)."""
        key = self.keys.openai_batch_jobs(batch_id)
        start = 0
        while True:
            ids = texts(await self.redis.lrange(key, start, start + size - 1))
            if not ids:
                return
            start += len(ids)
            yield ids

    async def error_line_chunks(self, batch_id: str, size: int) -> AsyncIterator[list[bytes]]:
        """The error-file lines of the batch's invalid input lines, in order, `size` at a time."""
        key = self.keys.openai_batch_errors(batch_id)
        start = 0
        while True:
            lines = await self.redis.lrange(key, start, start + size - 1)
            if not lines:
                return
            start += len(lines)
            yield [as_bytes(entry) for entry in lines]

    async def transaction(self) -> Any:
        """A MULTI/EXEC pipeline on the `{batch}` slot, for `add_enqueued` with JobQueue.enqueue_many."""
        return await redis_client.transaction(self.redis)

    async def owned_transaction(self, batch_id: str, owner: str) -> tuple[Any, str] | None:
        """A MULTI/EXEC pipeline on the `{batch}` slot fenced by the owner lease, and the batch's status.

        The record is WATCHed before its owner is read, so the transaction runs only if nothing wrote the
        record in between: a takeover (which writes `owner`) makes its EXEC fail with WatchError, and the
        chunk is never enqueued by two nodes. None (nothing watched) when `owner` does not hold the batch.
        The caller adds its commands and executes it, or calls `reset()` to drop it.
        """
        pipe = await redis_client.transaction(self.redis)
        key = self.keys.openai_batch(batch_id)
        await pipe.watch(key)
        current, status = await pipe.hmget(key, ["owner", "status"])
        if opt_text(current) != owner:
            await pipe.reset()
            return None
        pipe.multi()
        return pipe, opt_text(status) or ""

    def add_enqueued(self, pipe: Any, batch_id: str, job_ids: Sequence[str], error_lines: Sequence[bytes],
                     enqueued_line: int, invalid: int) -> None:
        """Add to `pipe` (a transaction) the record of one enqueued chunk: its job ids, its invalid lines'
        errors and the progress cursor, so that they land together with the jobs or not at all."""
        if job_ids:
            pipe.rpush(self.keys.openai_batch_jobs(batch_id), *job_ids)
        if error_lines:
            pipe.rpush(self.keys.openai_batch_errors(batch_id), *error_lines)
        pipe.hset(self.keys.openai_batch(batch_id), mapping={"enqueued_line": str(enqueued_line),
                                                              "invalid": str(invalid)})

    async def list(self, key_id: str, *, limit: int, after: str | None) -> BatchPage:
        """A page of the key's batches, newest first, after the cursor (a batch id)."""
        index = self.keys.openai_batch_index(key_id)
        upper = f"({after}" if after else "+"
        found: list[dict[str, str]] = []
        while len(found) < limit + 1:
            ids = await self.redis.zrevrangebylex(index, upper, "-", start=0, num=max(limit + 1, 20))
            if not ids:
                break
            pipe = self.redis.pipeline(transaction=False)
            for raw_id in ids:
                pipe.hgetall(self.keys.openai_batch(text(raw_id)))
            gone = []
            for raw_id, raw in zip(ids, await pipe.execute(), strict=True):
                if not raw:
                    gone.append(raw_id)  # expired after its TTL: forget it in the index too
                    continue
                found.append(text_hash(raw))
            if gone:
                await self.redis.zrem(index, *gone)
            upper = f"({text(ids[-1])}"
        return BatchPage(found[:limit], len(found) > limit)


def _ts(batch: dict[str, str], field: str) -> int | None:
    value = batch.get(field)
    return int(float(value)) if value else None


def _json(batch: dict[str, str], field: str) -> Any:
    value = batch.get(field)
    return orjson.loads(value) if value else None


def batch_view(batch: dict[str, str]) -> dict[str, Any]:
    """OpenAI's batch object (plus our `priority`) from a decoded batch hash."""
    invalid = int(batch.get("invalid") or 0)
    return {
        "id": batch["id"],
        "object": "batch",
        "endpoint": batch.get("endpoint"),
        "model": batch.get("model") or None,
        "errors": _json(batch, "errors"),
        "input_file_id": batch.get("input_file_id"),
        "completion_window": batch.get("completion_window", "24h"),
        "status": batch.get("status"),
        "output_file_id": batch.get("output_file_id") or None,
        "error_file_id": batch.get("error_file_id") or None,
        "created_at": _ts(batch, "created_at"),
        "in_progress_at": _ts(batch, "in_progress_at"),
        "expires_at": _ts(batch, "expires_at"),
        "finalizing_at": _ts(batch, "finalizing_at"),
        "completed_at": _ts(batch, "completed_at"),
        "failed_at": _ts(batch, "failed_at"),
        "expired_at": _ts(batch, "expired_at"),
        "cancelling_at": _ts(batch, "cancelling_at"),
        "cancelled_at": _ts(batch, "cancelled_at"),
        "request_counts": {
            "total": int(batch.get("total") or 0),
            "completed": int(batch.get("jobs_completed") or 0),
            "failed": int(batch.get("jobs_failed") or 0) + invalid,
        },
        "usage": _json(batch, "usage"),
        "metadata": _json(batch, "metadata") or {},
        "priority": int(batch.get("priority") or 0),
    }
