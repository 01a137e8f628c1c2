"""The last measured start time of each model's runtime, kept in Redis so that it outlives a restart.

It is the first Retry-After estimate a client gets while a runtime starts: without it a freshly started
gateway could only say RUNTIME_EXPECTED_START_SECONDS (a guess) until it had timed one start itself. In
a fleet every node shares the figures. This store owns the `runtime_start_seconds` hash; Redis being
unreachable only means falling back to the default, never a failed or delayed start.
"""

from __future__ import annotations

import asyncio
import math

import structlog
from redis.asyncio import Redis

from gateway.redis_client import REDIS_OR_OS_ERRORS
from gateway.redis_codec import text_hash
from gateway.redis_keys import RedisKeys

log = structlog.get_logger(component="start_times")

MAX_MODELS = 256
"""Models kept in the hash: a new model beyond this is not recorded (names are user-chosen for batch)."""
MODEL_MAX_CHARS = 512
TIMEOUT = 1.0
"""Seconds a read or write may take before it is given up (the supervisor is waiting)."""


class StartTimeStore:
    """Reads and writes the measured start time of each model (one hash, model -> seconds)."""

    def __init__(self, redis: Redis, keys: RedisKeys, *, max_models: int = MAX_MODELS,
                 timeout: float = TIMEOUT) -> None:
        self.redis = redis
        self.key = keys.runtime_start_seconds
        self.max_models = max_models
        self.timeout = timeout

    async def load(self) -> dict[str, float]:
        """Every recorded start time; empty when Redis cannot be read in time."""
        try:
            raw = await asyncio.wait_for(self.redis.hgetall(self.key), self.timeout)
        except REDIS_OR_OS_ERRORS as exc:  # TimeoutError is an OSError
            log.warning("start_times_unreadable", error=str(exc))
            return {}
        known: dict[str, float] = {}
        for model, value in text_hash(raw).items():
            try:
                seconds = float(value)
            except ValueError:
                continue
            if math.isfinite(seconds) and seconds > 0:
                known[model] = seconds
        return known

    async def record(self, model: str, seconds: float) -> None:
        """Remember that `model`'s runtime took `seconds` to start (best effort)."""
        if not model or len(model) > MODEL_MAX_CHARS or not math.isfinite(seconds) or seconds <= 0:
            return
        try:
            async with asyncio.timeout(self.timeout):
                # Not atomic with the HSET: a race can go a few entries past the bound, which is harmless.
                if not await self.redis.hexists(self.key, model) and await self.redis.hlen(self.key) >= self.max_models:
                    return
                await self.redis.hset(self.key, model, f"{seconds:.3f}")
        except REDIS_OR_OS_ERRORS as exc:  # TimeoutError is an OSError
            log.warning("start_time_not_recorded", model=model[:200], error=str(exc))
