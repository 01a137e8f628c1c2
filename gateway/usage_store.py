"""UsageStore: the one owner of the per-key usage hashes in Redis (docs/operations.md, "Usage").

Layout: `key_usage:<key_id>` (all-time counters), `key_usage:<key_id>::YYYYMMDD` (one UTC day, expiring
after USAGE_DAILY_TTL_DAYS), and the id sets `key_usage_ids` / `key_usage_ids::YYYYMMDD` that make
listings possible without a SCAN. The accountant writes through `add`; the monitor API, the dashboard
and the CLI read through the queries below.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis

from gateway.redis_codec import text as _text
from gateway.redis_keys import RedisKeys

FIELDS = ("requests", "successes", "errors", "prompt_tokens", "completion_tokens")


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


def _counts(raw: Mapping[bytes, bytes] | Mapping[str, str]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


class UsageStore:
    """Reads and writes per-key usage counters."""

    def __init__(self, redis: Redis, keys: RedisKeys, *, daily_ttl_days: int = 90) -> None:
        self.redis = redis
        self.keys = keys
        self.daily_ttl = daily_ttl_days * 86400

    async def add(self, totals: Mapping[str, Mapping[str, int]], daily: Iterable[UsageDelta],
                  last_used: Mapping[str, float]) -> None:
        """Add the counters in one pipeline.

        Not a MULTI: the usage keys of one key id live in different hash slots.
        """
        pipe = self.redis.pipeline(transaction=False)
        for key_id, counts in totals.items():
            key = self.keys.key_usage(key_id)
            for name, value in counts.items():
                if value:
                    pipe.hincrby(key, name, value)
            pipe.hset(key, "last_used_at", f"{last_used[key_id]:.3f}")
            pipe.sadd(self.keys.key_usage_ids, key_id)
        for delta in daily:
            key = self.keys.key_usage_day(delta.key_id, delta.day)
            for name, value in delta.counts.items():
                if value:
                    pipe.hincrby(key, name, value)
            pipe.hset(key, "last_used_at", f"{delta.last_used_at:.3f}")
            pipe.expire(key, self.daily_ttl)
            ids_key = self.keys.key_usage_day_ids(delta.day)
            pipe.sadd(ids_key, delta.key_id)
            pipe.expire(ids_key, self.daily_ttl)
        await pipe.execute()

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
