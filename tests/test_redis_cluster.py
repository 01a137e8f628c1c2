"""Redis Cluster support and the slot-safety rules, on one Redis and on a real local 3-master cluster:
idempotent usage flushes, all-or-nothing enqueue, channels per prefix and database, errors naming the cause."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis import exceptions as redis_exceptions
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from gateway.actors.usage import UsageAccountant, UsageEvent
from gateway.batch.jobs import Endpoint, Submission
from gateway.batch.queue import JobQueue
from gateway.bootstrap import create_app
from gateway.redis_client import (
    REDIS_ERRORS,
    classify,
    connect,
    database_of,
    is_cluster,
    keys_for,
    open_client,
    transaction,
)
from gateway.redis_client import pubsub as redis_pubsub
from gateway.redis_keys import RedisKeys
from gateway.settings import Settings
from gateway.usage_store import FlushId, UsageDelta, UsageStore, utc_day
from tests.conftest import REALTIME_MODEL, RedisBackend, auth, wait_ready

pytestmark = pytest.mark.usefixtures("redis_backend")


@pytest.fixture
async def client_of(make_settings: Callable[..., Settings]) -> AsyncIterator[Callable[..., Any]]:
    """Builds (settings, client) on the test's backend; closes the clients afterwards."""
    clients: list[Any] = []

    def build(**overrides: Any) -> tuple[Settings, Any]:
        settings = make_settings(**overrides)
        client = connect(settings)
        clients.append(client)
        return settings, client

    yield build
    for c in clients:
        await c.aclose()


def test_the_backend_is_what_it_claims(make_settings: Callable[..., Settings], test_redis: RedisBackend) -> None:
    settings = make_settings()
    assert settings.redis_cluster is test_redis.cluster
    assert is_cluster(connect(settings)) is test_redis.cluster


async def test_a_retried_usage_flush_is_counted_once(client_of: Callable[..., Any]) -> None:
    settings, redis = client_of()
    store = UsageStore(redis, keys_for(settings))
    day = utc_day(1_800_000_000.0)
    counts = {"requests": 5, "successes": 5, "errors": 0, "prompt_tokens": 50, "completion_tokens": 20}
    totals = {"key-a": counts, "key-b": counts}
    daily = [UsageDelta("key-a", day, counts, 1_800_000_000.0), UsageDelta("key-b", day, counts, 1_800_000_000.0)]
    last = {"key-a": 1_800_000_000.0, "key-b": 1_800_000_000.0}
    flush = FlushId("gw-1", 1)
    assert await store.add(totals, daily, last, flush) == 2
    assert await store.add(totals, daily, last, flush) == 0  # the same flush, retried: nothing applied
    rows = {r["key_id"]: r for r in await store.top(limit=10, bucket=None)}
    assert rows["key-a"]["requests"] == 5 and rows["key-b"]["prompt_tokens"] == 50
    assert (await store.day_totals([day]))[day]["requests"] == 10
    # Another writer's flush number 1, and this writer's next flush, both count.
    await store.add({"key-a": counts}, [], {"key-a": 1_800_000_000.0}, FlushId("gw-2", 1))
    await store.add({"key-a": counts}, [], {"key-a": 1_800_000_000.0}, FlushId("gw-1", 2))
    rows = {r["key_id"]: r for r in await store.top(limit=10, bucket=None)}
    assert rows["key-a"]["requests"] == 15


class _ReplyLost(UsageStore):
    """A store whose first write lands but whose reply is lost (what a MOVED or a dropped connection does
    to a round trip that was half done)."""

    failures = 1

    async def add(self, *args: Any, **kwargs: Any) -> int:
        applied = await super().add(*args, **kwargs)
        if self.failures:
            self.failures -= 1
            raise RedisConnectionError("connection lost while reading the reply")
        return applied


async def test_the_accountant_retries_a_half_done_flush_without_counting_twice(client_of: Callable[..., Any]) -> None:
    settings, redis = client_of()
    store = _ReplyLost(redis, keys_for(settings))
    accountant = UsageAccountant(store, flush_interval=0.01)
    for _ in range(5):
        accountant.record(UsageEvent("key-retry", True, 3, 2))
    with pytest.raises(RedisError):
        await accountant.flush()
    assert accountant.buffered == 5  # still owed
    accountant.record(UsageEvent("key-retry", True, 1, 1))  # arrives during the outage: a later flush
    await accountant.flush()  # the same flush again: applied already, skipped
    assert accountant.buffered == 1
    await accountant.flush()
    assert accountant.buffered == 0
    [row] = [r for r in await store.top(limit=10, bucket=None) if r["key_id"] == "key-retry"]
    assert row["requests"] == 6 and row["prompt_tokens"] == 16 and row["completion_tokens"] == 11


def _sub(model: str = "m/one") -> Submission:
    return Submission(Endpoint.COMPLETIONS, model, 0, {}, b'{"model": "%s", "prompt": "x"}' % model.encode())


async def test_a_failed_enqueue_writes_nothing_and_names_the_cause(client_of: Callable[..., Any]) -> None:
    settings, redis = client_of()
    keys = keys_for(settings)
    queue = JobQueue(redis, keys, settings)
    # Something else holds the key's job index under the wrong type: the enqueue must fail whole.
    await redis.set(keys.job_index("k-broken"), "not a sorted set")
    with pytest.raises(RedisError) as caught:
        await queue.enqueue_chunk("k-broken", [_sub(), _sub("m/two")])
    failure = classify(caught.value)
    assert failure.status == 500 and failure.code == "redis_error" and failure.retry_after is None
    assert "WRONGTYPE" in failure.message and keys.job_index("k-broken") in failure.message
    # Nothing of it exists: no job claimable, no hash, no event, not an owner.
    assert await queue.claim("m/one", 10, "x") == [] and await queue.claim("m/two", 10, "x") == []
    assert await redis.exists(keys.job_events) == 0
    assert await redis.sismember(keys.job_owners, "k-broken") == 0
    assert await queue.queued_count() == 0


async def test_an_enqueue_retried_after_a_lost_reply_adds_nothing(client_of: Callable[..., Any],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    settings, redis = client_of()
    queue = JobQueue(redis, keys_for(settings), settings)
    # A retry sends the same script call again, with the same job id (ids are chosen before the call).
    monkeypatch.setattr("gateway.batch.queue.new_job_id", lambda now: "job_0000000000000fixedretry")
    [first] = await queue.enqueue_chunk("k", [_sub()])
    [again] = await queue.enqueue_chunk("k", [_sub()])
    assert first["id"] == again["id"]
    assert await queue.queued_count() == 1
    assert len(await redis.xrange(queue.keys.job_events)) == 1
    assert len(await queue.claim("m/one", 10, "x")) == 1


async def test_the_http_api_answers_500_naming_the_cause_and_503_only_when_unreachable(
        aiohttp_client: Any, make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    client = await aiohttp_client(create_app(settings))
    await wait_ready(client.app)
    redis = await open_client(settings)
    try:
        keys = keys_for(settings)
        await redis.set(keys.job_index("k-batch"), "wrong type")
        resp = await client.post("/v1/batch/completions", json={"model": REALTIME_MODEL, "prompt": "hi"},
                                 headers=auth("batch"))
        body = await resp.json()
        assert resp.status == 500 and body["error"]["code"] == "redis_error"
        assert "WRONGTYPE" in body["error"]["message"] and "Retry-After" not in resp.headers
        assert await redis.exists(keys.job_events) == 0  # nothing of the request was written
    finally:
        await redis.aclose()


async def test_unreachable_redis_is_a_503_with_retry_after(aiohttp_client: Any, make_settings: Callable[..., Settings],
                                                          test_redis: RedisBackend) -> None:
    from tests.conftest import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"
    client = await aiohttp_client(create_app(make_settings(redis_url=dead)))
    await wait_ready(client.app)
    resp = await client.post("/v1/batch/completions", json={"model": REALTIME_MODEL, "prompt": "hi"},
                             headers=auth("batch"))
    body = await resp.json()
    assert resp.status == 503 and body["error"]["code"] == "redis_unavailable"
    assert resp.headers["Retry-After"] == "5"
    ready = await client.get("/ready")  # what a load balancer health-checks
    assert ready.status == 503 and (await ready.json())["redis"] == "down"


async def test_cross_slot_errors_name_the_cause(client_of: Callable[..., Any], test_redis: RedisBackend) -> None:
    settings, redis = client_of()
    pipe = await transaction(redis)
    pipe.set(f"{settings.redis_prefix}{{a}}x", 1)
    pipe.set(f"{settings.redis_prefix}{{b}}y", 1)
    if not test_redis.cluster:
        assert await pipe.execute() == [True, True]  # one server has no slots to cross
        return
    with pytest.raises(REDIS_ERRORS) as caught:
        await pipe.execute()
    failure = classify(caught.value)
    assert failure.status == 500 and failure.code == "redis_error" and "CROSSSLOT" in failure.message


async def test_notifications_stay_within_prefix_and_database(client_of: Callable[..., Any],
                                                             test_redis: RedisBackend) -> None:
    settings, redis = client_of()
    assert database_of(settings) == 0
    here = JobQueue(redis, RedisKeys(settings.redis_prefix, db=0), settings)
    # The same prefix on another database (a second deployment), and another prefix on this database.
    other_db = JobQueue(redis, RedisKeys(settings.redis_prefix, db=1), settings)
    other_prefix = JobQueue(redis, RedisKeys(settings.redis_prefix + "other:", db=0), settings)
    pubsub = await redis_pubsub(redis)
    await pubsub.subscribe(here.keys.batch_notify)
    try:
        await asyncio.sleep(0.1)
        await other_db.notify(["m/from-db1"])
        await other_prefix.notify(["m/from-other-prefix"])
        await here.enqueue("k", _sub("m/here"))  # the enqueue script publishes on this deployment's channel
        heard = []
        for _ in range(30):
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if message is not None:
                heard.append(message["data"])
            if b"m/here" in heard:
                break
        assert heard == [b"m/here"]
    finally:
        await pubsub.aclose()


@pytest.mark.parametrize(("exc", "status", "needle"), [
    (RedisConnectionError("Error 111 connecting"), 503, "unreachable"),
    (redis_exceptions.TimeoutError("Timeout reading"), 503, "unreachable"),
    (redis_exceptions.ClusterDownError("CLUSTERDOWN The cluster is down"), 503, "unreachable"),
    (redis_exceptions.ReadOnlyError("READONLY You can't write against a read only replica."), 503, "unreachable"),
    (redis_exceptions.RedisClusterException("Redis Cluster cannot be connected. Please provide at least one "
                                            "reachable node: Error 111"), 503, "unreachable"),
    (redis_exceptions.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), 500,
     "WRONGTYPE"),
    (redis_exceptions.ResponseError("OOM command not allowed when used memory > 'maxmemory'."), 500, "OOM"),
    (redis_exceptions.ResponseError("Error running script (call to f_x): @user_script:3: bad argument"), 500,
     "script or command error"),
    (redis_exceptions.RedisClusterException("EVAL - all keys must map to the same key slot"), 500, "CROSSSLOT"),
])
def test_classify_tells_unreachable_from_answered_errors(exc: Exception, status: int, needle: str) -> None:
    failure = classify(exc)
    assert failure.status == status and needle in failure.message
    assert (failure.code, failure.retry_after) == (("redis_unavailable", 5) if status == 503 else ("redis_error", None))
