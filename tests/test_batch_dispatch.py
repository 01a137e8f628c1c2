"""The BatchDispatcher end to end: order, cancel while running, retries, a runtime crash, two gateways."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aredis

from gateway.bootstrap import create_app
from gateway.http.appkeys import DISPATCHER, REDIS, REDIS_KEYS
from tests.api_helpers import events, submit, wait_status
from tests.conftest import REALTIME_MODEL, REDIS_URL, auth, eventually, start_simulator, wait_ready

pytestmark = pytest.mark.slow  # the dispatcher end to end on simulators


@pytest.fixture
async def slow_sim() -> AsyncIterator[str]:
    """A simulator whose first token takes 3 s (a request stays in flight long enough to act on it)."""
    proc, url = start_simulator(REALTIME_MODEL, "--served-model-name", REALTIME_MODEL, "--sim-ttft", "3")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
async def failing_sim() -> AsyncIterator[str]:
    """A simulator that answers every second generation request with a 500."""
    proc, url = start_simulator(REALTIME_MODEL, "--served-model-name", REALTIME_MODEL, "--sim-fail-every", "2")
    yield url
    proc.terminate()
    proc.wait(10)


async def test_jobs_start_in_priority_order(aiohttp_client: Any, make_settings: Callable[..., Any]) -> None:
    """One slot: queued work starts by priority, FIFO within a priority, once a dispatcher runs."""
    api = await aiohttp_client(create_app(make_settings(batch_dispatcher_enabled=False)))
    plan = [0, 5, 9, 5, 0, 9, 2]
    ids = [(await submit(api, {"model": REALTIME_MODEL, "prompt": f"job {i}", "priority": p}))["id"]
           for i, p in enumerate(plan)]
    worker = await aiohttp_client(create_app(make_settings(max_concurrent_batch=1)))
    await wait_ready(worker.app)
    for job_id in ids:
        await wait_status(worker, job_id, {"completed"})
    started = [e["job_id"] for e in await events(worker) if e["event"] == "started"]
    expected = [ids[i] for i in (2, 5, 1, 3, 6, 0, 4)]
    assert started == expected


async def test_cancel_running_job_stops_its_request(aiohttp_client: Any, make_settings: Callable[..., Any],
                                                    slow_sim: str) -> None:
    client = await aiohttp_client(create_app(make_settings(runtime_url=slow_sim)))
    await wait_ready(client.app)
    created = await submit(client, {"model": REALTIME_MODEL, "prompt": "long one"})
    await wait_status(client, created["id"], {"running"})
    dispatcher = client.app[DISPATCHER]
    await eventually(lambda: created["id"] in dispatcher.status().held and dispatcher.status().sending == 1)
    resp = await client.delete(f"/v1/jobs/{created['id']}", headers=auth("batch"))
    assert resp.status == 200 and (await resp.json())["status"] == "cancelled"
    # The holder drops the request well before the runtime would have answered.
    await eventually(lambda: created["id"] not in dispatcher.status().held, timeout=2.5)
    keys = client.app[REDIS_KEYS]
    assert await client.app[REDIS].zcard(keys.batch_leases) == 0
    await asyncio.sleep(3.2)  # past the runtime's answer: nothing may overwrite the cancellation
    job = await wait_status(client, created["id"], {"cancelled"})
    assert job["response"] is None
    assert [e["event"] for e in await events(client)] == ["enqueued", "started", "cancelled"]


async def test_transient_failure_retries_then_completes(aiohttp_client: Any, make_settings: Callable[..., Any],
                                                        failing_sim: str) -> None:
    client = await aiohttp_client(create_app(make_settings(runtime_url=failing_sim, max_concurrent_batch=1,
                                                           batch_retry_backoff_seconds=0.05)))
    await wait_ready(client.app)
    first = await submit(client, {"model": REALTIME_MODEL, "prompt": "one"})
    await wait_status(client, first["id"], {"completed"})
    second = await submit(client, {"model": REALTIME_MODEL, "prompt": "two"})  # request 2 answers 500
    job = await wait_status(client, second["id"], {"completed"})
    assert job["attempts"] == 2
    assert "runtime_5xx" in job["flags"]
    kinds = [e["event"] for e in await events(client) if e["job_id"] == second["id"]]
    assert kinds == ["enqueued", "started", "retried", "completed"]


async def test_gives_up_after_max_attempts(aiohttp_client: Any, make_settings: Callable[..., Any]) -> None:
    proc, url = start_simulator(REALTIME_MODEL, "--served-model-name", REALTIME_MODEL, "--sim-fail-every", "1")
    try:
        client = await aiohttp_client(create_app(make_settings(runtime_url=url, batch_max_attempts=3,
                                                               batch_retry_backoff_seconds=0.02)))
        await wait_ready(client.app)
        created = await submit(client, {"model": REALTIME_MODEL, "prompt": "doomed"})
        job = await wait_status(client, created["id"], {"failed"})
        assert job["attempts"] == 3
        assert set(job["error"]["flags"]) >= {"runtime_5xx", "max_attempts"}
        assert job["error"]["runtime_status"] == 500 and "Simulated engine failure" in job["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(10)


async def test_runtime_crash_mid_job_retries_on_restarted_runtime(
        aiohttp_client: Any, make_settings: Callable[..., Any], tmp_path: Path) -> None:
    """The process runtime exits during the 2nd request; the job retries on the restarted runtime and
    its record names the crash log file."""
    settings = make_settings(runtime_backend="process", runtime_url="", max_concurrent_batch=1,
                             runtime_args="--sim-crash-after 1 --sim-ttft 0.2",
                             runtime_pid_file=str(tmp_path / "runtime.pid"),
                             batch_retry_backoff_seconds=0.2)
    client = await aiohttp_client(create_app(settings))
    await wait_ready(client.app)
    first = await submit(client, {"model": REALTIME_MODEL, "prompt": "fine"})
    await wait_status(client, first["id"], {"completed"})
    second = await submit(client, {"model": REALTIME_MODEL, "prompt": "crashes the runtime"})
    job = await wait_status(client, second["id"], {"completed"}, timeout=60)
    assert job["attempts"] == 2
    assert {"runtime_crash", "connection_error"} <= set(job["flags"])
    crash_log = (await client.app[REDIS].hget(client.app[REDIS_KEYS].job(second["id"]), "crash_log")).decode()
    assert crash_log.startswith(str(tmp_path / "runtime_failures")) and Path(crash_log).is_file()
    assert "simulated crash" in Path(crash_log).read_text()
    retried = [e for e in await events(client) if e["event"] == "retried"]
    assert retried[0]["crash_log"] == crash_log


async def test_two_gateways_share_the_queue(aiohttp_client: Any, make_settings: Callable[..., Any]) -> None:
    """Two dispatchers on one prefix: every job completes exactly once and both do work."""
    one = await aiohttp_client(create_app(make_settings(max_concurrent_batch=4)))
    two = await aiohttp_client(create_app(make_settings(max_concurrent_batch=4)))
    await wait_ready(one.app)
    await wait_ready(two.app)
    ids = []
    for i in range(120):
        ids.append((await submit(one if i % 2 else two, {"model": REALTIME_MODEL, "prompt": f"p{i}",
                                                          "max_tokens": 2}))["id"])

    async def all_done() -> bool:
        return sum(e["event"] == "completed" for e in await events(one)) >= len(ids)

    await eventually(all_done, timeout=60, interval=0.2)
    log = await events(one)
    completed = Counter(e["job_id"] for e in log if e["event"] == "completed")
    started = Counter(e["job_id"] for e in log if e["event"] == "started")
    assert set(completed) == set(ids) and set(completed.values()) == {1}
    assert set(started.values()) == {1}
    owner_ids = {e["owner"] for e in log if e["event"] == "completed"}
    assert owner_ids == {one.app[DISPATCHER].owner, two.app[DISPATCHER].owner}


async def test_lease_is_renewed_during_a_long_request(aiohttp_client: Any, make_settings: Callable[..., Any],
                                                      slow_sim: str) -> None:
    """A request longer than the lease keeps its job: renewals stop the reaper from taking it back."""
    client = await aiohttp_client(create_app(make_settings(runtime_url=slow_sim, batch_lease_seconds=0.6)))
    await wait_ready(client.app)
    created = await submit(client, {"model": REALTIME_MODEL, "prompt": "takes 3 s"})
    job = await wait_status(client, created["id"], {"completed"}, timeout=30)
    assert job["attempts"] == 1
    assert [e["event"] for e in await events(client)] == ["enqueued", "started", "completed"]


async def test_graceful_stop_requeues_without_counting_an_attempt(
        aiohttp_client: Any, make_settings: Callable[..., Any], slow_sim: str) -> None:
    client = await aiohttp_client(create_app(make_settings(runtime_url=slow_sim, shutdown_timeout=0.6)))
    await wait_ready(client.app)
    created = await submit(client, {"model": REALTIME_MODEL, "prompt": "interrupted"})
    await wait_status(client, created["id"], {"running"})
    await eventually(lambda: client.app[DISPATCHER].active == 1)
    keys = client.app[REDIS_KEYS]
    log_before = await events(client)
    await client.close()  # runs the cleanup contexts: the dispatcher stops first
    r = aredis.Redis.from_url(REDIS_URL)
    try:
        job = await r.hgetall(keys.job(created["id"]))
        assert job[b"status"] == b"queued" and job[b"attempt"] == b"0"
        assert await r.zrange(keys.batch_ready(REALTIME_MODEL), 0, -1) == [created["id"].encode()]
        assert await r.zcard(keys.batch_leases) == 0
        raw = await r.xrange(keys.job_events)
        last = {k.decode(): v.decode() for k, v in raw[-1][1].items()}
        assert len(raw) == len(log_before) + 1
        assert last["event"] == "requeued" and last["reason"] == "shutdown"
    finally:
        await r.aclose()
