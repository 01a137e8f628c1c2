"""UsageAccountant: per-key usage counters in Redis, written in batches off the request path."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Never

from gateway import metrics
from gateway.actors.base import STOP, Actor
from gateway.batch.queue import instance_id
from gateway.redis_client import REDIS_OR_OS_ERRORS
from gateway.usage_store import FIELDS, FlushId, UsageDelta, UsageStore, utc_day


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
    """Aggregates usage events in memory and writes them to Redis in one round trip per flush.

    `record()` never awaits and never fails: the proxy calls it with `put_nowait` semantics. While Redis
    is unreachable, events stay buffered up to `buffer_max` (beyond that they are dropped and counted in
    llm_gateway_usage_events_dropped_total) and are written once Redis answers again.

    Each flush is numbered (this process's instance id and a sequence number) and retried with the same
    number and the same events until it succeeds, so a retry is never counted twice (UsageStore.add). What
    a kill -9 loses is what was not yet flushed: at most one flush interval of events while Redis answers,
    and the whole buffer (at most `buffer_max` events) while it does not.
    """

    name = "usage"

    def __init__(self, store: UsageStore, *, buffer_max: int = 100_000, flush_interval: float = 0.25) -> None:
        super().__init__()
        self.store = store
        self.buffer_max = buffer_max
        self.flush_interval = flush_interval
        self._pending: list[UsageEvent] = []
        self._batch: tuple[FlushId, list[UsageEvent]] | None = None  # the flush being written (or retried)
        self._instance = instance_id()
        self._seq = 0
        self._wake = asyncio.Event()
        self.flushed_events = 0

    def record(self, event: UsageEvent) -> None:
        """Account one event (never blocks; drops and counts when the buffer is full)."""
        if self.buffered >= self.buffer_max:
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
        return len(self._pending) + (len(self._batch[1]) if self._batch is not None else 0)

    async def run(self) -> None:
        backoff = self.flush_interval
        while True:
            stop = not self.inbox.empty() and self.inbox.get_nowait() is STOP
            if self._pending or self._batch is not None:
                try:
                    await self.flush()
                    backoff = self.flush_interval
                except REDIS_OR_OS_ERRORS as exc:
                    metrics.USAGE_FLUSH_FAILURES.inc()
                    self.log.warning("usage_flush_failed", error=str(exc), buffered=self.buffered,
                                     retry_in=backoff)
                    if stop:
                        self.log.error("usage_lost_on_stop", events=self.buffered)
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
        """Write the pending events as one numbered flush; on failure the same flush is retried next time."""
        if self._batch is None:
            if not self._pending:
                return
            self._seq += 1
            self._batch = (FlushId(self._instance, self._seq), self._pending[:])
            self._pending.clear()
        flush_id, events = self._batch
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
                                      for (key_id, day), counts in daily.items()], last_used, flush_id)
        self._batch = None
        self.flushed_events += len(events)
        metrics.USAGE_BUFFERED.set(len(self._pending))
