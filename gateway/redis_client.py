"""Connecting to Redis (one server or a Redis Cluster) and the helpers every store uses on both.

- `connect` builds `redis.asyncio.Redis` or, with REDIS_CLUSTER=true, `redis.asyncio.cluster.RedisCluster`.
- `run_scripts` sends many Lua script calls at once: one pipeline on a single server; on a cluster, whose
  pipeline refuses EVALSHA, concurrent calls (`asyncio.gather`), each routed to its key's slot.
- `transaction` is a MULTI/EXEC pipeline on both: on a cluster every key in it must share one hash slot
  (the stores choose hash tags so that they do; see gateway/redis_keys.py).
- `pubsub` subscribes on both (a cluster broadcasts PUBLISH to every node, so any node will do).
- `classify` tells an unreachable Redis (503 `redis_unavailable`, retry later) from a Redis that answered
  with an error (500 `redis_error`, naming the cause: a script error, WRONGTYPE, CROSSSLOT, ...).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

from gateway.redis_keys import RedisKeys
from gateway.settings import Settings

REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException)
"""What a Redis call can raise: the cluster client's own exceptions do not derive from RedisError."""
REDIS_OR_OS_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException, OSError)
"""The same, and the socket errors a few code paths let through."""

RedisClient: TypeAlias = "Redis | RedisCluster"
"""Either client: stores accept both and use only commands the two share."""

ScriptCall: TypeAlias = "tuple[AsyncScript, Sequence[str], Sequence[Any]]"
"""One Lua script call: the script, its KEYS and its ARGV."""


def connect(settings: Settings, *, socket_timeout: float = 5, socket_connect_timeout: float = 2) -> Any:
    """The client for REDIS_URL: a cluster client when REDIS_CLUSTER is true (REDIS_URL names any node)."""
    if settings.redis_cluster:
        return RedisCluster.from_url(settings.redis_url, socket_timeout=socket_timeout,
                                     socket_connect_timeout=socket_connect_timeout)
    # Short socket timeouts: a dead Redis must fail fast, never hang a request or an actor.
    return Redis.from_url(settings.redis_url, socket_timeout=socket_timeout,
                          socket_connect_timeout=socket_connect_timeout, health_check_interval=30)


def database_of(settings: Settings) -> int:
    """The database number REDIS_URL selects (always 0 on a cluster, which has only database 0)."""
    if settings.redis_cluster:
        return 0
    parts = urlsplit(settings.redis_url)
    path = parts.path.strip("/")
    if path.isdigit():
        return int(path)
    for item in parts.query.split("&"):
        name, _, value = item.partition("=")
        if name == "db" and value.isdigit():
            return int(value)
    return 0


async def open_client(settings: Settings, *, socket_timeout: float = 5, socket_connect_timeout: float = 2) -> Any:
    """`connect`, and on a cluster load the slot map now (a cluster pipeline built before the client has
    its map does not run). A cluster that is down now is not fatal: the client loads the map on first use."""
    client = connect(settings, socket_timeout=socket_timeout, socket_connect_timeout=socket_connect_timeout)
    if is_cluster(client):
        try:
            await client.initialize()
        except REDIS_OR_OS_ERRORS:
            pass
    return client


async def _ready(redis: Any) -> None:
    if is_cluster(redis):
        await redis.initialize()  # a no-op once the slot map is loaded


def keys_for(settings: Settings) -> RedisKeys:
    """The key and channel names of this deployment (REDIS_PREFIX, and the database for channels)."""
    return RedisKeys(settings.redis_prefix, db=database_of(settings))


def is_cluster(redis: Any) -> bool:
    """True for a Redis Cluster client."""
    return isinstance(redis, RedisCluster)


async def run_scripts(redis: Any, calls: Sequence[ScriptCall]) -> list[Any]:
    """Run many script calls in one round trip where the client allows it; results in call order.

    No call may depend on another having run first: on a cluster they run concurrently on their nodes.
    """
    if not calls:
        return []
    if is_cluster(redis):
        def runner(call: ScriptCall) -> Callable[[], Awaitable[Any]]:
            script, keys, args = call
            return lambda: script(keys=list(keys), args=list(args))

        return await gather_bounded([runner(call) for call in calls])
    pipe = redis.pipeline(transaction=False)
    for script, keys, args in calls:
        await script(keys=list(keys), args=list(args), client=pipe)
    return list(await pipe.execute())


async def transaction(redis: Any) -> Any:
    """A MULTI/EXEC pipeline; on a cluster all of its keys must be in one hash slot (and it may hold no
    PUBLISH nor script call: publish after it has run)."""
    await _ready(redis)
    return redis.pipeline(transaction=True)


async def pubsub(redis: Any) -> Any:
    """A pub/sub connection on either client (a cluster client needs its slot map to pick a node)."""
    await _ready(redis)
    return redis.pubsub()


async def close(redis: Any) -> None:
    """Close the client and its connections."""
    await redis.aclose()


@dataclass(frozen=True, slots=True)
class RedisFailure:
    """What a Redis exception means for a client: 503 to retry, or 500 naming the cause."""

    status: int
    code: str
    message: str
    retry_after: int | None


# A replica promoted or demoted mid-failover answers READONLY for a moment: also worth a retry.
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ClusterDownError, MasterDownError, TryAgainError,
                BusyLoadingError, ReadOnlyError, OSError, asyncio.TimeoutError)
# What redis-py's cluster client says when it reaches no node or has no usable slot map.
_CLUSTER_UNREACHABLE = ("cannot be connected", "reachable node", "failed to initialize", "slots cache")


def unavailable(exc: BaseException) -> bool:
    """True when Redis could not be reached (worth retrying later), False when it answered with an error."""
    if isinstance(exc, _UNAVAILABLE):
        return True
    text = str(exc).lower()
    return isinstance(exc, RedisClusterException) and any(s in text for s in _CLUSTER_UNREACHABLE)


def classify(exc: BaseException) -> RedisFailure:
    """Map a Redis exception to the answer a client gets (the middleware uses it once for every route)."""
    if unavailable(exc):
        return RedisFailure(503, "redis_unavailable", "Redis, where the gateway keeps jobs, batches and "
                            "evaluations, is unreachable right now; retry shortly.", 5)
    cause = _cause(exc)
    return RedisFailure(500, "redis_error", f"Redis refused an operation of the gateway: {cause}. This is a "
                        "gateway or deployment fault, not a problem with the request.", None)


def _cause(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:300] or type(exc).__name__
    if isinstance(exc, RedisClusterException) and "slot" in text.lower():
        return f"CROSSSLOT ({text})"
    if isinstance(exc, ResponseError):
        first = text.split(" ", 1)[0]
        if first.isupper() and first.isalpha():
            return f"{first} ({text})" if first != text else first
        return f"script or command error ({text})"
    return f"{type(exc).__name__}: {text}"


async def gather_bounded(factories: Sequence[Callable[[], Awaitable[Any]]], limit: int = 64) -> list[Any]:
    """Await the factories' coroutines with at most `limit` in flight; results in order."""
    semaphore = asyncio.Semaphore(limit)

    async def one(factory: Callable[[], Awaitable[Any]]) -> Any:
        async with semaphore:
            return await factory()

    return list(await asyncio.gather(*(one(f) for f in factories)))


__all__ = ["REDIS_ERRORS", "REDIS_OR_OS_ERRORS", "RedisClient", "RedisError", "RedisFailure", "ScriptCall",
           "classify", "close", "connect", "database_of", "gather_bounded", "is_cluster", "keys_for", "open_client",
           "pubsub", "run_scripts", "transaction", "unavailable"]
