"""QueueDepthSampler: refreshes `llm_gateway_batch_queue_depth{model,priority}` from the batch queue.

Scrapes never touch Redis: the metric is a cached table this service replaces every
QUEUE_DEPTH_REFRESH_SECONDS, from the queue's own depth query (gateway/batch/queue.py).
"""

from __future__ import annotations

import time
from collections import Counter as Tally

from gateway import metrics
from gateway.actors.base import Service
from gateway.batch.queue import JobQueue, QueueDepth
from gateway.redis_client import REDIS_OR_OS_ERRORS
from gateway.settings import Settings


def depth_table(depth: QueueDepth, max_models: int) -> dict[tuple[str, str], int]:
    """The metric's rows: the busiest `max_models` models by name, split by priority; the rest summed as
    model="other", priority="unknown" (user-chosen model names must not grow the label set)."""
    ranked = sorted(depth.by_model, key=lambda m: (-depth.by_model[m], m))
    rows: Tally[tuple[str, str]] = Tally()
    for model in ranked[:max_models]:
        for priority, count in depth.by_priority.get(model, {}).items():
            rows[(model, priority)] += count
    rest = ranked[max_models:]
    if rest:
        rows[("other", "unknown")] += sum(depth.by_model[m] for m in rest)
    return dict(rows)


class QueueDepthSampler(Service):
    """Reads queue depth by model and priority into metrics.QUEUE_DEPTH on a timer."""

    name = "queue_depth"

    def __init__(self, queue: JobQueue, settings: Settings) -> None:
        super().__init__()
        self.queue = queue
        self.settings = settings
        self.refreshes = 0

    async def run(self) -> None:
        """Refresh, then wait for the interval or a stop."""
        while True:
            try:
                await self.refresh()
            except REDIS_OR_OS_ERRORS as exc:
                # Keep the last table: a gap in Redis is not an empty queue.
                self.log.warning("queue_depth_refresh_failed", error=str(exc))
            if await self.pause(self.settings.queue_depth_refresh_seconds):
                return

    async def refresh(self) -> dict[tuple[str, str], int]:
        """Read the queue once and publish the table; returns it."""
        table = depth_table(await self.queue.depth(self.settings.queue_depth_sample_max),
                            metrics.QUEUE_DEPTH_MAX_MODELS)
        metrics.QUEUE_DEPTH.set(table, time.time())
        self.refreshes += 1
        return table
