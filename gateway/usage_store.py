"""UsageStore: the one owner of the per-key usage hashes in Redis (docs/operations.md, "Usage").

Layout: `key_usage:<key_id>` (all-time counters), `key_usage:<key_id>::YYYYMMDD` (one UTC day, expiring
after USAGE_DAILY_TTL_DAYS), and the id sets `key_usage_ids` / `key_usage_ids::YYYYMMDD` that make
listings possible without a SCAN. The accountant writes through `add`; the monitor API, the dashboard
and the CLI read through the queries below.

Every flush is numbered by its writer (`FlushId`: instance and sequence number). One script per key id
applies the key's counters and records the number in `key_usage:<key_id>::flushes`, all in the key's
hash slot (`{<key_id>}`), and skips a flush whose number it has seen: a flush retried after a lost reply
or a half-done round trip (a cluster spreads the keys over nodes) is never counted twice. The id sets are
plain SADDs, idempotent by nature.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis

from gateway import redis_client
from gateway.redis_codec import text as _text
from gateway.redis_keys import RedisKeys

FIELDS = ("requests", "successes", "errors", "prompt_tokens", "completion_tokens")
FLUSHES_TTL = 7 * 86400  # the flush record of a key outlives any retry of a flush

# Apply one flush to one key id, at most once. KEYS: flushes, all-time hash, then one hash per day.
# ARGV: instance, seq, flushes ttl, daily ttl, last_used_at, then the FIELDS counts (all-time), then
# per day: last_used_at and the FIELDS counts.
_APPLY = """
local seen = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if seen >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
local names = {'requests', 'successes', 'errors', 'prompt_tokens', 'completion_tokens'}
local function add(key, at, base)
  for i = 1, 5 do
    local v = tonumber(ARGV[base + i])
    if v ~= 0 then redis.call('HINCRBY', key, names[i], v) end
  end
  redis.call('HSET', key, 'last_used_at', at)
end
add(KEYS[2], ARGV[5], 5)
for d = 3, #KEYS do
  local base = 10 + (d - 3) * 6
  add(KEYS[d], ARGV[base + 1], base + 1)
  redis.call('EXPIRE', KEYS[d], ARGV[4])
end
return 1
"""


@dataclass(frozen=True, slots=True)
class FlushId:
    """Names one flush of one writer: a retry of the flush carries the same id."""

    instance: str
    seq: int


def utc_day(ts: float) -> str:
    """YYYYMMDD of a timestamp in UTC: the daily bucket it belongs to."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y%m%d")


def utc_days(count: int, now: float | None = None) -> list[str]:
    """The last `count` UTC days as YYYYMMDD, oldest first (today last)."""
    today = datetime.fromtimestamp(time.time() if now is None else now, UTC).date()
    return [(today - timedelta(days=n)).strftime("%Y%m%d") for n in range(count - 1, -1, -1)]


@dataclass(frozen=True, slots=True)
class UsageDelta:
    """Counters to add for one key, all-time and in one day's bucket."""

    key_id: str
    day: str
    counts: Mapping[str, int]
    last_used_at: float


def _by_day(days: Mapping[str, list[UsageDelta]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key_id, deltas in days.items():
        for delta in deltas:
            out.setdefault(delta.day, []).append(key_id)
    return out



def _counts(raw: Mapping[bytes, bytes] | Mapping[str, str]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


class UsageStore:
    """Reads and writes per-key usage counters."""

    def __init__(self, redis: Redis, keys: RedisKeys, *, daily_ttl_days: int = 90) -> None:
        self.redis = redis
        self.keys = keys
        self.daily_ttl = daily_ttl_days * 86400
        self._apply = redis.register_script(_APPLY)

    async def add(self, totals: Mapping[str, Mapping[str, int]], daily: Iterable[UsageDelta],
                  last_used: Mapping[str, float], flush: FlushId) -> int:
        """Apply one flush: per key id one script (counters and flush record together), plus the id sets.

        Safe to retry with the same `flush` after any failure: keys that already have it are skipped.
        Returns how many key ids had it applied now.
        """
        days: dict[str, list[UsageDelta]] = {}
        for delta in daily:
            days.setdefault(delta.key_id, []).append(delta)
        calls: list[redis_client.ScriptCall] = []
        for key_id, counts in totals.items():
            keys = [self.keys.usage_flushes(key_id), self.keys.key_usage(key_id)]
            args: list[object] = [flush.instance, flush.seq, FLUSHES_TTL, self.daily_ttl,
                                  f"{last_used[key_id]:.3f}", *(int(counts.get(n, 0)) for n in FIELDS)]
            for delta in days.get(key_id, []):
                keys.append(self.keys.key_usage_day(key_id, delta.day))
                args.extend((f"{delta.last_used_at:.3f}", *(int(delta.counts.get(n, 0)) for n in FIELDS)))
            calls.append((self._apply, keys, args))
        # The id sets first (idempotent): a key's counters are never written without it being listed.
        pipe = self.redis.pipeline(transaction=False)
        if totals:
            pipe.sadd(self.keys.key_usage_ids, *totals)
        for day, ids in sorted(_by_day(days).items()):
            ids_key = self.keys.key_usage_day_ids(day)
            pipe.sadd(ids_key, *ids)
            pipe.expire(ids_key, self.daily_ttl)
        await pipe.execute()
        return sum(int(r) for r in await redis_client.run_scripts(self.redis, calls))

    async def top(self, *, limit: int, bucket: str | None) -> list[dict[str, object]]:
        """Usage rows, all-time or for one UTC day (YYYYMMDD), busiest keys first."""
        ids_key = self.keys.key_usage_day_ids(bucket) if bucket else self.keys.key_usage_ids
        key_ids = sorted(_text(k) for k in await self.redis.smembers(ids_key))
        pipe = self.redis.pipeline(transaction=False)
        for key_id in key_ids:
            pipe.hgetall(self.keys.key_usage_day(key_id, bucket) if bucket else self.keys.key_usage(key_id))
        rows: list[tuple[int, str, dict[str, object]]] = []
        for key_id, raw in zip(key_ids, await pipe.execute(), strict=True):
            if not raw:
                continue
            data = _counts(raw)
            counts = {name: int(data.get(name, 0)) for name in FIELDS}
            row: dict[str, object] = {"key_id": key_id, **counts,
                                      "total_tokens": counts["prompt_tokens"] + counts["completion_tokens"],
                                      "last_used_at": float(data["last_used_at"]) if "last_used_at" in data else None}
            rows.append((-counts["requests"], key_id, row))
        rows.sort(key=lambda r: (r[0], r[1]))
        return [row for _, _, row in rows[:limit]]

    async def daily(self, days: list[str], *, key_ids: list[str] | None = None,
                    max_keys: int = 200) -> dict[str, list[dict[str, str]]]:
        """Key id -> its day hashes for `days` (in order; empty where it had no usage).

        Without `key_ids`, every key with usage recorded (at most `max_keys`, by id).
        """
        if key_ids is None:
            key_ids = sorted(_text(k) for k in await self.redis.smembers(self.keys.key_usage_ids))[:max_keys]
        pipe = self.redis.pipeline(transaction=False)
        for key_id in key_ids:
            for day in days:
                pipe.hgetall(self.keys.key_usage_day(key_id, day))
        raw = await pipe.execute() if key_ids else []
        return {key_id: [_counts(raw[i * len(days) + j]) for j in range(len(days))]
                for i, key_id in enumerate(key_ids)}

    async def day_totals(self, days: list[str], key_id: str | None = None) -> dict[str, dict[str, int]]:
        """Day -> the counters summed over every key (or one key's) on that day."""
        if key_id is not None:
            owners = {day: [key_id] for day in days}
        else:
            pipe = self.redis.pipeline(transaction=False)
            for day in days:
                pipe.smembers(self.keys.key_usage_day_ids(day))
            owners = {day: sorted(_text(k) for k in members)
                      for day, members in zip(days, await pipe.execute(), strict=True)}
        plan = [(day, owner) for day in days for owner in owners[day]]
        pipe = self.redis.pipeline(transaction=False)
        for day, owner in plan:
            pipe.hmget(self.keys.key_usage_day(owner, day), FIELDS)
        values = await pipe.execute() if plan else []
        totals: dict[str, dict[str, int]] = {day: dict.fromkeys(FIELDS, 0) for day in days}
        for (day, _), row in zip(plan, values, strict=True):
            for name, value in zip(FIELDS, row, strict=True):
                totals[day][name] += int(value or 0)
        return totals
