"""QueueDepthSampler: refreshes `llm_gateway_batch_queue_depth{model,priority}` from the Redis queue.

Scrapes never touch Redis: the metric is a cached table this actor replaces every
QUEUE_DEPTH_REFRESH_SECONDS. The priority of a queued job is read from its place in the ready set, not
from its hash: a job's id carries its enqueue time (microseconds) and its score is that time minus
priority x BATCH_AGING_SECONDS, so one ZRANGE WITHSCORES per model gives both (no per-job round trip).
"""

from __future__ import annotations

import time
from collections import Counter as Tally

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway import metrics
from gateway.actors.base import STOP, Actor
from gateway.batch.jobs import PRIORITY_MAX, PRIORITY_MIN
from gateway.redis_keys import RedisKeys
from gateway.settings import Settings

_ID_TIME_DIGITS = 14  # job ids are "job_" + 14 hex digits of enqueue microseconds + randomness


def priority_from_entry(job_id: str, score: float, aging_seconds: float) -> str | None:
    """The job's priority as text, derived from its id and ready-set score; None when it cannot be."""
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


class QueueDepthSampler(Actor):
    """Reads queue depth by model and priority into metrics.QUEUE_DEPTH on a timer."""

    name = "queue_depth"

    def __init__(self, redis: Redis, keys: RedisKeys, settings: Settings) -> None:
        super().__init__()
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self.refreshes = 0

    async def run(self) -> None:
        """Refresh, then wait for the interval or the stop sentinel."""
        while True:
            try:
                await self.refresh()
            except (RedisError, OSError) as exc:
                # Keep the last table: a gap in Redis is not an empty queue.
                self.log.warning("queue_depth_refresh_failed", error=str(exc))
            if await self.receive(self.settings.queue_depth_refresh_seconds) is STOP:
                return

    async def refresh(self) -> dict[tuple[str, str], int]:
        """Read the queue once and publish the table; returns it."""
        models = sorted(m.decode() if isinstance(m, bytes) else m
                        for m in await self.redis.smembers(self.keys.batch_models))
        pipe = self.redis.pipeline(transaction=False)
        for model in models:
            pipe.zcard(self.keys.batch_ready(model))
        depth = {m: int(n) for m, n in zip(models, await pipe.execute() if models else [], strict=True) if n}
        # Bounded labels and bounded reads: the busiest models by name (split by priority), the rest
        # summed as model="other" without reading their entries.
        ranked = sorted(depth, key=lambda m: (-depth[m], m))
        named, rest = ranked[:metrics.QUEUE_DEPTH_MAX_MODELS], ranked[metrics.QUEUE_DEPTH_MAX_MODELS:]
        cap = self.settings.queue_depth_sample_max
        pipe = self.redis.pipeline(transaction=False)
        for model in named:
            pipe.zrange(self.keys.batch_ready(model), 0, cap - 1, withscores=True)
        heads = await pipe.execute() if named else []
        aging = self.settings.batch_aging_seconds
        rows: Tally[tuple[str, str]] = Tally()
        for model, head in zip(named, heads, strict=True):
            for raw_id, score in head:
                rows[(model, priority_from_entry(raw_id.decode(), float(score), aging) or "unknown")] += 1
            if depth[model] > len(head):  # past the sampled head, or enqueued between the two reads
                rows[(model, "unknown")] += depth[model] - len(head)
        if rest:
            rows[("other", "unknown")] += sum(depth[m] for m in rest)
        table = dict(rows)
        metrics.QUEUE_DEPTH.set(table, time.time())
        self.refreshes += 1
        return table
