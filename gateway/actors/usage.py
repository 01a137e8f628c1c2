"""UsageAccountant: per-key usage counters in Redis, written in batches off the request path."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Never

from redis.exceptions import RedisError

from gateway import metrics
from gateway.actors.base import STOP, Actor
from gateway.usage_store import FIELDS, UsageDelta, UsageStore, utc_day


@dataclass(slots=True)
class UsageEvent:
    """One finished inference call of one key (realtime or batch)."""

    key_id: str
    ok: bool
    prompt_tokens: int = 0
    completion_tokens: int = 0
    kind: str = "realtime"
    at: float = field(default_factory=time.time)


class UsageAccountant(Actor[Never]):
    """Aggregates usage events in memory and writes them to Redis in one pipeline per flush.

    `record()` never awaits and never fails: the proxy calls it with `put_nowait` semantics. While Redis
    is unreachable, events stay buffered up to `buffer_max` (beyond that they are dropped and counted in
    llm_gateway_usage_events_dropped_total) and are written once Redis answers again.
    """

    name = "usage"

    def __init__(self, store: UsageStore, *, buffer_max: int = 100_000, flush_interval: float = 0.25) -> None:
        super().__init__()
        self.store = store
        self.buffer_max = buffer_max
        self.flush_interval = flush_interval
        self._pending: list[UsageEvent] = []
        self._wake = asyncio.Event()
        self.flushed_events = 0

    def record(self, event: UsageEvent) -> None:
        """Account one event (never blocks; drops and counts when the buffer is full)."""
        if len(self._pending) >= self.buffer_max:
            metrics.USAGE_EVENTS_DROPPED.inc()
            return
        self._pending.append(event)
        metrics.TOKENS_BY(event.key_id, "prompt").inc(event.prompt_tokens)
        metrics.TOKENS_BY(event.key_id, "completion").inc(event.completion_tokens)
        if len(self._pending) >= 1000:
            self._wake.set()

    @property
    def buffered(self) -> int:
        """Events not yet written to Redis."""
        return len(self._pending)

    async def run(self) -> None:
        backoff = self.flush_interval
        while True:
            stop = not self.inbox.empty() and self.inbox.get_nowait() is STOP
            if self._pending:
                try:
                    await self.flush()
                    backoff = self.flush_interval
                except (RedisError, OSError) as exc:
                    metrics.USAGE_FLUSH_FAILURES.inc()
                    self.log.warning("usage_flush_failed", error=str(exc), buffered=len(self._pending),
                                     retry_in=backoff)
                    if stop:
                        self.log.error("usage_lost_on_stop", events=len(self._pending))
                        return
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
            if stop:
                return
            await self._sleep(self.flush_interval)

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        getter = asyncio.ensure_future(self.inbox.get())
        waker = asyncio.ensure_future(self._wake.wait())
        done, pending = await asyncio.wait({getter, waker}, timeout=seconds,
                                           return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if getter in done:
            # Put the message (STOP) back so the loop sees it after one last flush.
            self.inbox.put_nowait(getter.result())

    async def flush(self) -> None:
        """Write every pending event in one pipeline; on failure the events stay pending."""
        events = self._pending[:]
        if not events:
            return
        totals: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(FIELDS, 0))
        daily: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: dict.fromkeys(FIELDS, 0))
        last_used: dict[str, float] = {}
        for ev in events:
            for bucket in (totals[ev.key_id], daily[(ev.key_id, utc_day(ev.at))]):
                bucket["requests"] += 1
                bucket["successes" if ev.ok else "errors"] += 1
                bucket["prompt_tokens"] += ev.prompt_tokens
                bucket["completion_tokens"] += ev.completion_tokens
            last_used[ev.key_id] = max(ev.at, last_used.get(ev.key_id, 0.0))
        await self.store.add(totals, [UsageDelta(key_id, day, counts, last_used[key_id])
                                      for (key_id, day), counts in daily.items()], last_used)
        # Events recorded while the pipeline ran were appended after the ones just written.
        del self._pending[: len(events)]
        self.flushed_events += len(events)
        metrics.USAGE_BUFFERED.set(len(self._pending))
