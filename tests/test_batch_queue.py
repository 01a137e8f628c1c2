"""The Redis queue on its own: order (priority, aging, FIFO), leases, fencing, reaping, key layout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway.batch.jobs import Endpoint, Submission, new_job_id
from gateway.batch.queue import JobQueue
from gateway.redis_client import connect, keys_for
from gateway.redis_keys import RedisKeys

MODEL = "m/one"
pytestmark = pytest.mark.usefixtures("redis_backend")  # every test on one Redis and on a Redis Cluster


def sub(priority: int = 0, model: str = MODEL, prompt: str = "x") -> Submission:
    return Submission(Endpoint.COMPLETIONS, model, priority, {}, b'{"model": "%s", "prompt": "%s"}'
                      % (model.encode(), prompt.encode()))


@pytest.fixture
async def make_queue(make_settings: Callable[..., Any]) -> AsyncIterator[Callable[..., JobQueue]]:
    clients: list[Any] = []

    def build(**overrides: Any) -> JobQueue:
        settings = make_settings(**overrides)
        client = connect(settings)
        clients.append(client)
        return JobQueue(client, keys_for(settings), settings)

    yield build
    for client in clients:
        await client.aclose()


async def claim_all(queue: JobQueue, model: str = MODEL) -> list[str]:
    order = []
    while jobs := await queue.claim(model, 1, "tester"):
        order.append(jobs[0].fields["id"])
    return order


def test_job_ids_sort_by_creation_time() -> None:
    ids = [new_job_id(t) for t in (1.0, 1.000001, 2.5, 1e9, 4e9)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


async def test_priority_then_fifo(make_queue: Callable[..., JobQueue]) -> None:
    queue = make_queue(batch_aging_seconds=60)
    low1 = (await queue.enqueue("k", sub(0)))["id"]
    high = (await queue.enqueue("k", sub(9)))["id"]
    mid1 = (await queue.enqueue("k", sub(3)))["id"]
    low2 = (await queue.enqueue("k", sub(0)))["id"]
    mid2 = (await queue.enqueue("k", sub(3)))["id"]
    assert await claim_all(queue) == [high, mid1, mid2, low1, low2]


async def test_aging_lets_an_old_low_priority_job_overtake(make_queue: Callable[..., JobQueue]) -> None:
    # Each priority level is worth 0.1 s of waiting here: after 0.5 s, the priority-0 job beats a new
    # priority-5 job (worth 0.5 s) but not a new priority-9 one (worth 0.9 s).
    queue = make_queue(batch_aging_seconds=0.1)
    old_low = (await queue.enqueue("k", sub(0)))["id"]
    await asyncio.sleep(0.5)
    new_mid = (await queue.enqueue("k", sub(5)))["id"]
    new_top = (await queue.enqueue("k", sub(9)))["id"]
    assert await claim_all(queue) == [new_top, old_low, new_mid]


async def test_score_rule(make_queue: Callable[..., JobQueue]) -> None:
    queue = make_queue(batch_aging_seconds=60)
    assert queue.score(1000.0, 0) == 1000.0
    assert queue.score(1000.0, 9) == 1000.0 - 540
    assert queue.score(1000.0, 2) < queue.score(1000.0, 1) < queue.score(1001.0, 1)


async def test_claim_leases_and_marks_running(make_queue: Callable[..., JobQueue]) -> None:
    queue = make_queue(batch_lease_seconds=30)
    job_id = (await queue.enqueue("k", sub()))["id"]
    [held] = await queue.claim(MODEL, 5, "owner-a")
    # Claimed, not yet sent: no attempt counted until mark_sent.
    assert held.id == job_id and held.attempt == 0 and held.fields["status"] == "running"
    assert await queue.mark_sent(held) == 1 and held.attempt == 1
    assert held.token.startswith("owner-a:")
    r, keys = queue.redis, queue.keys
    assert await r.hget(keys.batch_lease_tokens, job_id) == held.token.encode()
    deadline = await r.zscore(keys.batch_leases, job_id)
    assert time.time() * 1000 < deadline <= (time.time() + 31) * 1000
    assert await r.hget(keys.job(job_id), "owner") == b"owner-a"
    assert await queue.claim(MODEL, 5, "owner-b") == []
    # The model set forgets a model once its ready set is empty.
    assert await r.smembers(keys.batch_models) == set()


async def test_expired_lease_is_taken_back_and_stale_holder_is_fenced(make_queue: Callable[..., JobQueue]) -> None:
    queue = make_queue(batch_lease_seconds=0.5)
    job_id = (await queue.enqueue("k", sub()))["id"]
    [stale] = await queue.claim(MODEL, 1, "dead-gateway")
    assert await queue.mark_sent(stale) == 1
    assert await queue.reap() == 0  # lease still valid
    await asyncio.sleep(0.7)
    assert await queue.reap() == 1
    job = await queue.get(job_id)
    assert job is not None and job["status"] == "queued" and job["requeue_reason"] == "lease_expired"
    [fresh] = await queue.claim(MODEL, 1, "live-gateway")
    assert await queue.mark_sent(fresh) == 2 and fresh.token != stale.token
    assert await queue.mark_sent(stale) is None
    # The old holder comes back: nothing it writes lands, its lease calls are no-ops.
    assert await queue.update(stale, {"status": "completed"}, final=True) is None
    assert await queue.renew([stale]) == {job_id}
    await queue.release(stale)
    assert await queue.redis.hget(queue.keys.batch_lease_tokens, job_id) == fresh.token.encode()
    assert await queue.update(fresh, {"status": "completed", "claim": ""}, final=True) == 2
    await queue.release(fresh)
    assert (await queue.get(job_id))["status"] == "completed"  # type: ignore[index]
    assert await queue.redis.zcard(queue.keys.batch_leases) == 0


async def test_renew_keeps_lease_alive(make_queue: Callable[..., JobQueue]) -> None:
    queue = make_queue(batch_lease_seconds=0.5)
    await queue.enqueue("k", sub())
    [held] = await queue.claim(MODEL, 1, "a")
    for _ in range(4):
        await asyncio.sleep(0.25)
        assert await queue.renew([held]) == set()
        assert await queue.reap() == 0


async def test_claimed_ahead_jobs_never_sent_cost_no_attempt(make_queue: Callable[..., JobQueue]) -> None:
    """A gateway dies holding jobs it claimed ahead but never sent: they come back with no attempt spent."""
    queue = make_queue(batch_lease_seconds=0.3, batch_max_attempts=1)
    ids = [(await queue.enqueue("k", sub(prompt=str(i))))["id"] for i in range(3)]
    held = await queue.claim(MODEL, 3, "dies")
    assert sorted(j.id for j in held) == sorted(ids)
    await asyncio.sleep(0.4)
    assert await queue.reap() == 3
    for job_id in ids:
        job = await queue.get(job_id)
        assert job is not None and job["status"] == "queued" and job["attempt"] == "0"
    # With one attempt allowed, every one of them still gets it.
    again = await queue.claim(MODEL, 3, "b")
    assert len(again) == 3 and all(j.fields["status"] == "running" for j in again)


async def test_each_step_writes_its_status_and_its_event_together(make_queue: Callable[..., JobQueue]) -> None:
    queue = make_queue()
    job_id = (await queue.enqueue("k", sub()))["id"]
    [held] = await queue.claim(MODEL, 1, "a")
    await queue.mark_sent(held)
    assert await queue.update(held, {"error": "attempt 1: boom"}, attempt_delta=1, event="retried",
                              reason="runtime_5xx") == 2
    assert await queue.requeue(held, "preempted", count_attempt=False)
    [held] = await queue.claim(MODEL, 1, "a")
    await queue.mark_sent(held)
    assert await queue.finish(held, {"status": "completed", "response": b"{}"}, "completed")
    events = [(e[b"event"].decode(), e[b"status"].decode(), e[b"attempt"].decode(), e.get(b"reason"))
              for _, e in await queue.redis.xrange(queue.keys.job_events) if e[b"job_id"].decode() == job_id]
    assert events == [("enqueued", "queued", "0", None), ("started", "running", "1", None),
                      ("retried", "running", "2", b"runtime_5xx"), ("requeued", "queued", "1", b"preempted"),
                      ("started", "running", "2", None), ("completed", "completed", "2", None)]
    assert await queue.redis.zcard(queue.keys.batch_leases) == 0
    assert await queue.redis.hlen(queue.keys.batch_lease_tokens) == 0


async def test_finish_many_in_one_round_trip(make_queue: Callable[..., JobQueue]) -> None:
    queue = make_queue()
    for i in range(5):
        await queue.enqueue("k", sub(prompt=str(i)))
    held = await queue.claim(MODEL, 5, "a")
    cancelled = held[0]
    assert (await queue.cancel(cancelled.id, "k"))[0] == "cancelled"
    done = await queue.finish_many([(j, {"status": "completed"}, "completed") for j in held])
    assert done == [False, True, True, True, True]
    assert await queue.redis.zcard(queue.keys.batch_leases) == 0
    statuses = [(await queue.get(j.id))["status"] for j in held]  # type: ignore[index]
    assert statuses == ["cancelled"] + ["completed"] * 4


async def test_job_fields_reads_many_jobs_in_order_and_none_for_a_gone_one(
        make_queue: Callable[..., JobQueue]) -> None:
    queue = make_queue()
    first = (await queue.enqueue("k", sub(prompt="a")))["id"]
    second = (await queue.enqueue("k", sub(prompt="b")))["id"]
    [held] = await queue.claim(MODEL, 1, "a")
    assert held.id == first
    assert await queue.finish(held, {"status": "completed", "response": '{"ok": 1}'}, "completed")
    gone = new_job_id()
    rows = await queue.job_fields([second, gone, first], ("status", "response"))
    assert rows == [[b"queued", None], [None, None], [b"completed", b'{"ok": 1}']]
    assert await queue.statuses([first, gone, second]) == ["completed", None, "queued"]
    assert await queue.job_fields([], ("status",)) == []


async def test_leased_job_that_was_finished_only_loses_its_lease(make_queue: Callable[..., JobQueue]) -> None:
    queue = make_queue(batch_lease_seconds=0.3)
    job_id = (await queue.enqueue("k", sub()))["id"]
    [held] = await queue.claim(MODEL, 1, "a")
    await queue.update(held, {"status": "completed", "claim": ""}, final=True)
    await asyncio.sleep(0.4)
    assert await queue.reap() == 0
    assert await queue.redis.zcard(queue.keys.batch_leases) == 0
    assert (await queue.get(job_id))["status"] == "completed"  # type: ignore[index]
    assert await queue.claim(MODEL, 1, "b") == []


async def test_gives_up_after_max_attempts_of_lost_holders(make_queue: Callable[..., JobQueue]) -> None:
    queue = make_queue(batch_lease_seconds=0.2, batch_max_attempts=2)
    job_id = (await queue.enqueue("k", sub()))["id"]
    for _ in range(2):
        [held] = await queue.claim(MODEL, 1, "dies")
        assert await queue.mark_sent(held) is not None
        await asyncio.sleep(0.3)
        assert await queue.reap() == 1
    assert await queue.claim(MODEL, 1, "c") == []
    job = await queue.get(job_id)
    assert job is not None and job["status"] == "failed"
    assert set(job["flags"].split(",")) >= {"max_attempts"} and job["error_code"] == "lease_expired"
    assert await queue.redis.ttl(queue.keys.job(job_id)) > 0


async def test_preempted_requeue_does_not_count_an_attempt(make_queue: Callable[..., JobQueue]) -> None:
    queue = make_queue()
    first = (await queue.enqueue("k", sub(prompt="first")))["id"]
    await queue.enqueue("k", sub(prompt="second"))
    [held] = await queue.claim(MODEL, 1, "a")
    assert held.id == first
    assert await queue.requeue(held, "preempted", count_attempt=False)
    job = await queue.get(first)
    assert job is not None and job["status"] == "queued" and job["attempt"] == "0"
    [again] = await queue.claim(MODEL, 1, "a")
    assert again.id == first  # back at its original place, first in line
    assert await queue.mark_sent(again) == 1
    # Sent, then preempted: the attempt it had counted is given back.
    assert await queue.requeue(again, "preempted", count_attempt=False)
    assert (await queue.get(first))["attempt"] == "0"  # type: ignore[index]


async def test_cancel_running_clears_claim(make_queue: Callable[..., JobQueue]) -> None:
    queue = make_queue()
    job_id = (await queue.enqueue("k", sub()))["id"]
    [held] = await queue.claim(MODEL, 1, "a")
    assert (await queue.cancel(job_id, "other-key"))[0] == "missing"
    outcome, job = await queue.cancel(job_id, "k")
    assert outcome == "cancelled" and job is not None and job["status"] == "cancelled"
    assert await queue.update(held, {"status": "completed"}, final=True) is None
    assert (await queue.cancel(job_id, "k"))[0] == "already:cancelled"


def test_queue_keys_share_one_cluster_slot() -> None:
    keys = RedisKeys("deploy-a:")
    names = [keys.batch_ready("org/model-x"), keys.batch_ready("other"), keys.batch_models, keys.batch_leases,
             keys.batch_lease_tokens, keys.batch_claim_seq, keys.job("job_1"), keys.job_index("k"), keys.job_owners,
             keys.job_events, keys.openai_batch("b"), keys.openai_batch_jobs("b"), keys.openai_batches_active]
    for name in names:
        assert name.startswith("deploy-a:")
        start = name.index("{")
        assert name[start:name.index("}") + 1] == "{batch}"
    assert RedisKeys("").job("job_1") == "{batch}:job:job_1"
    assert RedisKeys("").job_events == "{batch}:job_events"


def test_pubsub_channels_carry_prefix_and_database() -> None:
    a, b, c = RedisKeys("deploy:", db=0), RedisKeys("deploy:", db=3), RedisKeys("other:", db=3)
    for keys, prefix, db in ((a, "deploy:", 0), (b, "deploy:", 3), (c, "other:", 3)):
        for channel in (keys.batch_notify, keys.batch_cancel):
            assert channel.startswith(prefix) and f"db{db}:" in channel
    assert len({a.batch_notify, b.batch_notify, c.batch_notify}) == 3


async def test_event_stream_trimmed_by_length(make_queue: Callable[..., JobQueue]) -> None:
    queue = make_queue(job_stream_maxlen=10)
    for _ in range(300):
        await queue.enqueue("k", sub())
    # Approximate trimming keeps whole macro nodes (100 entries each), never the full history.
    assert await queue.redis.xlen(queue.keys.job_events) < 300


async def test_event_stream_trimmed_by_age(make_queue: Callable[..., JobQueue]) -> None:
    queue = make_queue(job_stream_max_age_seconds=1)
    r = queue.redis
    await r.xadd(queue.keys.job_events, {"event": "ancient"}, id=f"{int((time.time() - 3600) * 1000)}-0")
    await queue.enqueue("k", sub())
    await queue.trim_events()
    events = [e[b"event"] for _, e in await r.xrange(queue.keys.job_events)]
    assert events == [b"enqueued"]


async def test_concurrent_finishes_share_a_round_trip(make_queue: Callable[..., JobQueue],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    queue = make_queue()
    for i in range(20):
        await queue.enqueue("k", sub(prompt=str(i)))
    held = await queue.claim(MODEL, 20, "a")
    batches: list[int] = []
    real = queue.finish_many

    async def counted(outcomes: Any) -> list[bool]:
        batches.append(len(outcomes))
        return await real(outcomes)

    monkeypatch.setattr(queue, "finish_many", counted)
    results = await asyncio.gather(*(queue.finish(j, {"status": "completed"}, "completed") for j in held))
    assert results == [True] * 20
    assert sum(batches) == 20 and len(batches) <= 2  # twenty slots finishing at once: one or two round trips
    assert await queue.redis.zcard(queue.keys.batch_leases) == 0


async def test_mark_sent_counts_once_per_claim(make_queue: Callable[..., JobQueue]) -> None:
    """redis-py resends a call whose reply was lost: a resent mark-sent must not spend a second attempt."""
    queue = make_queue()
    await queue.enqueue("k", sub())
    [held] = await queue.claim(MODEL, 1, "a")
    assert await queue.mark_sent(held) == 1
    assert await queue.mark_sent(held) == 1
    assert await queue.requeue(held, "preempted", count_attempt=False)
    [again] = await queue.claim(MODEL, 1, "a")
    assert await queue.mark_sent(again) == 1  # a new claim, a new attempt


async def test_a_resent_retry_update_counts_once(make_queue: Callable[..., JobQueue]) -> None:
    queue = make_queue()
    job_id = (await queue.enqueue("k", sub()))["id"]
    [held] = await queue.claim(MODEL, 1, "a")
    await queue.mark_sent(held)
    seen = held.attempt
    assert await queue.update(held, {"error": "attempt 1: boom"}, attempt_delta=1, event="retried") == 2
    held.fields["attempt"] = str(seen)  # what the caller knew when the lost call was sent
    assert await queue.update(held, {"error": "attempt 1: boom"}, attempt_delta=1, event="retried") == 2
    events = [e[b"event"] for _, e in await queue.redis.xrange(queue.keys.job_events)
              if e[b"job_id"] == job_id.encode()]
    assert events.count(b"retried") == 1
