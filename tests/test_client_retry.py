"""What SDK clients rely on to decide about retries: x-should-retry, and a Retry-After worth waiting for."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import redis.asyncio as aredis

from gateway import metrics
from gateway.actors.supervisor import RETRY_AFTER_MAX, RuntimeSnapshot, RuntimeState, RuntimeSupervisor
from gateway.bootstrap import create_app
from gateway.redis_keys import RedisKeys
from gateway.settings import Settings
from gateway.start_times import StartTimeStore
from tests.conftest import REALTIME_MODEL, REDIS_URL, TOKENS, auth, eventually, free_port
from tests.polling import wait_for_state


def _requests(route: str, method: str, status: str) -> float:
    value = metrics.REGISTRY.get_sample_value("llm_gateway_http_requests_total",
                                              {"route": route, "method": method, "status": status})
    return value or 0.0


async def test_permanent_4xx_says_do_not_retry(gateway: Any) -> None:
    for method, path, role, status in (
        ("GET", "/v1/jobs/job_00000000000000aaaaaaaaaa", "batch", 404),
        ("POST", "/v1/batch/completions", "batch", 400),
        ("GET", "/v1/jobs", "realtime", 401),
        ("GET", "/nowhere", "batch", 404),
    ):
        resp = await gateway.request(method, path, headers=auth(role), data=b"{}")
        assert resp.status == status
        assert resp.headers["x-should-retry"] == "false", (method, path)
    ok = await gateway.get("/health")
    assert "x-should-retry" not in ok.headers


async def test_503_with_retry_after_says_retry(aiohttp_client: Any, make_settings: Any) -> None:
    # Nothing listens at the runtime URL: the runtime never gets ready, so realtime answers 503.
    client = await aiohttp_client(create_app(make_settings(runtime_url=f"http://127.0.0.1:{free_port()}")))
    resp = await client.post("/v1/completions", headers=auth("realtime"),
                             json={"model": REALTIME_MODEL, "prompt": "hi", "max_tokens": 1})
    assert resp.status == 503
    assert 1 <= int(resp.headers["Retry-After"]) <= RETRY_AFTER_MAX
    assert resp.headers["x-should-retry"] == "true"


async def test_sdk_gives_up_at_once_on_batch_not_cancellable(gateway: Any) -> None:
    """The SDK retries a bare 409 twice; with x-should-retry: false it sends exactly one request."""
    api = openai.AsyncOpenAI(base_url=str(gateway.make_url("/v1")), api_key=TOKENS["batch"], max_retries=2)
    try:
        row = {"custom_id": "a", "method": "POST", "url": "/v1/completions",
               "body": {"model": REALTIME_MODEL, "prompt": "x", "max_tokens": 1}}
        f = await api.files.create(file=("a.jsonl", orjson.dumps(row) + b"\n"), purpose="batch")
        batch = await api.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")

        async def completed() -> Any:
            b = await api.batches.retrieve(batch.id)
            return b if b.status == "completed" else None

        await eventually(completed, timeout=30, interval=0.1)
        route = "/v1/batches/{batch_id}/cancel"
        before = _requests(route, "POST", "409")
        with pytest.raises(openai.ConflictError) as info:
            await api.batches.cancel(batch.id)
        assert info.value.code == "batch_not_cancellable"
        assert _requests(route, "POST", "409") - before == 1
        # Without the header the SDK would have sent it three times (sleeping ~0.5 s, then ~1 s).
        assert info.value.response.headers["x-should-retry"] == "false"
    finally:
        await api.close()


def test_retry_after_stays_within_what_the_sdk_honours() -> None:
    now = time.time()
    snap = RuntimeSnapshot(RuntimeState.STARTING, REALTIME_MODEL, None, now, ready_eta=now + 900)
    # The openai SDK honours a Retry-After of at most 120 s (and gives up at once beyond): its
    # MAX_RETRY_AFTER_DELAY, which the SDK does not export.
    assert snap.retry_after(now) == RETRY_AFTER_MAX == 120
    assert RuntimeSnapshot(RuntimeState.STARTING, REALTIME_MODEL, None, now, ready_eta=now + 3.2).retry_after(now) == 4
    assert RuntimeSnapshot(RuntimeState.STARTING, REALTIME_MODEL, None, now, ready_eta=now - 5).retry_after(now) == 1


@pytest.fixture
async def store(redis_prefix: str) -> AsyncIterator[StartTimeStore]:
    redis = aredis.Redis.from_url(REDIS_URL)
    yield StartTimeStore(redis, RedisKeys(redis_prefix), max_models=3)
    await redis.aclose()


async def test_start_time_store_round_trip_and_bounds(store: StartTimeStore, redis_prefix: str) -> None:
    assert await store.load() == {}
    await store.record("org/a", 4.25)
    await store.record("org/b", 30)
    await store.record("org/a", 5.5)  # the last measurement wins
    await store.record("bad", float("nan"))
    await store.record("", 3)
    assert await store.load() == {"org/a": 5.5, "org/b": 30.0}
    await store.record("org/c", 1)
    await store.record("org/d", 1)  # beyond max_models: not recorded
    assert set(await store.load()) == {"org/a", "org/b", "org/c"}
    redis = aredis.Redis.from_url(REDIS_URL)
    try:
        assert await redis.hget(f"{redis_prefix}runtime_start_seconds", "org/a") == b"5.500"
    finally:
        await redis.aclose()


async def test_start_time_store_without_redis_falls_back_quickly() -> None:
    redis = aredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    try:
        store = StartTimeStore(redis, RedisKeys("x:"), timeout=0.5)
        started = time.monotonic()
        assert await store.load() == {}
        await store.record("m", 3.0)  # logged, not raised
        assert time.monotonic() - started < 5
    finally:
        await redis.aclose()


@pytest.fixture
def proc_settings(make_settings: Callable[..., Settings], tmp_path: Path) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"runtime_backend": "process", "runtime_pid_file": str(tmp_path / "runtime.pid"),
                                  "runtime_start_timeout": 30, "runtime_stop_timeout": 5,
                                  "runtime_expected_start_seconds": 42}
        values.update(overrides)
        return make_settings(**values)

    return build


async def test_supervisor_records_and_uses_measured_start_times(proc_settings: Callable[..., Settings],
                                                                redis_prefix: str) -> None:
    redis = aredis.Redis.from_url(REDIS_URL)
    store = StartTimeStore(redis, RedisKeys(redis_prefix))
    try:
        # A start measured by an earlier gateway (or another node) is the first estimate here.
        await store.record(REALTIME_MODEL, 7.5)
        sup = RuntimeSupervisor(proc_settings(), start_times=store)
        try:
            before = time.time()
            await sup.start()
            snap = await wait_for_state(sup, lambda s: s.state is not RuntimeState.STOPPED)
            assert snap.state is RuntimeState.STARTING and snap.ready_eta is not None
            assert before + 7.5 <= snap.ready_eta <= time.time() + 7.5
            assert snap.retry_after() <= 8  # not RUNTIME_EXPECTED_START_SECONDS (42)
            await sup.wait_ready(30)

            # And the start just measured replaces it.
            async def measured() -> float | None:
                seconds = (await store.load()).get(REALTIME_MODEL)
                return seconds if seconds != 7.5 else None

            assert 0 < await eventually(measured, timeout=10) < 30
        finally:
            await sup.stop()
    finally:
        await redis.aclose()
