"""JobEventFeed: the one follower of the job event stream, fanning each event out to its subscribers.

The Batches manager and the EvalRunner both wait for job outcomes; one XREAD loop serves them all, so a
gateway reads each event once however many components care. A subscriber's callback runs in the feed's
task and must not block (set an event, update a dict). After a gap (start-up, or a Redis error) events
may have been missed, so each subscriber's `on_gap` is called and it re-reads what it waits for.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from gateway.actors.base import Service
from gateway.batch.queue import JobEvent, JobQueue
from gateway.redis_client import REDIS_OR_OS_ERRORS


@dataclass(frozen=True, slots=True)
class Subscription:
    """What a subscriber is called with: every event, and the gaps between them."""

    on_event: Callable[[JobEvent], None]
    on_gap: Callable[[], None] | None = None


class JobEventFeed(Service):
    """Tails `job_events` from the moment it starts and calls every subscriber for each entry."""

    name = "job_event_feed"
    batch = 1000
    block_ms = 1000
    retry_seconds = 1.0

    def __init__(self, queue: JobQueue) -> None:
        super().__init__()
        self.queue = queue
        self._subscribers: list[Subscription] = []
        self.delivered = 0

    def subscribe(self, on_event: Callable[[JobEvent], None], on_gap: Callable[[], None] | None = None) -> None:
        """Receive every event from now on; `on_gap` after each start and each reconnect."""
        self._subscribers.append(Subscription(on_event, on_gap))

    async def run(self) -> None:
        """Follow the stream until stopped; reconnect after a Redis error, then report the gap."""
        last: str | None = None
        while not self.stopping:
            try:
                if last is None:
                    last = await self.queue.latest_event_id()
                    self._gap()
                events = await self._read_unless_stopped(last)
                if events is None:
                    return
            except REDIS_OR_OS_ERRORS as exc:
                self.log.warning("job_feed_error", error=str(exc))
                last = None
                if await self.pause(self.retry_seconds):
                    return
                continue
            for event in events:
                last = event.id
                for sub in self._subscribers:
                    try:
                        sub.on_event(event)
                    except Exception:
                        self.log.exception("job_feed_subscriber_failed", event_id=event.id)
                self.delivered += 1

    async def _read_unless_stopped(self, last: str) -> list[JobEvent] | None:
        """The next events after `last`, or None when a stop is asked first: a stop does not wait out the
        blocking read (up to `block_ms`), which would add that much to every shutdown."""
        read = asyncio.ensure_future(self.queue.read_events(last, self.batch, self.block_ms))
        stop = asyncio.ensure_future(self._stop_asked.wait())
        try:
            await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not read.done():
                read.cancel()
        if read.cancelled() or not read.done():
            with contextlib.suppress(asyncio.CancelledError, *REDIS_OR_OS_ERRORS):
                await read
            return None
        return read.result()

    def _gap(self) -> None:
        for sub in self._subscribers:
            if sub.on_gap is not None:
                try:
                    sub.on_gap()
                except Exception:
                    self.log.exception("job_feed_subscriber_failed", on="gap")
