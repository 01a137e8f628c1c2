"""Redis going down during realtime traffic: requests keep working, usage is buffered and flushed after."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync

from gateway import metrics
from gateway.bootstrap import create_app
from gateway.http.appkeys import ACCOUNTANT
from gateway.redis_keys import RedisKeys
from tests.conftest import KEY_IDS, REALTIME_MODEL, auth, eventually, free_port, wait_ready

pytestmark = pytest.mark.slow  # a private Redis server stopped and started


def _sample(name: str) -> float:
    """A counter's current value, read through the registry (0 before its first increment)."""
    return metrics.REGISTRY.get_sample_value(name) or 0.0


class PrivateRedis:
    """A redis-server of the test's own, so the test can stop and restart it."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is needed for this test (the machine provides it)"
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis_sync.Redis.from_url(self.url).ping():
                    return
            except redis_sync.ConnectionError:
                time.sleep(0.05)
        raise TimeoutError("private redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


async def test_realtime_survives_redis_outage_and_usage_is_flushed(aiohttp_client: Any, make_settings: Any,
                                                                   private_redis: PrivateRedis) -> None:
    client = await aiohttp_client(create_app(make_settings(redis_url=private_redis.url, redis_prefix="")))
    await wait_ready(client.app)
    accountant = client.app[ACCOUNTANT]
    body = {"model": REALTIME_MODEL, "prompt": "a b c", "max_tokens": 3}

    async def send(n: int, stream: bool = False) -> None:
        for _ in range(n):
            resp = await client.post("/v1/completions", headers=auth("realtime"), json={**body, "stream": stream})
            assert resp.status == 200
            await resp.read()

    await send(2)
    await eventually(lambda: accountant.buffered == 0)
    private_redis.stop()
    failures_before = _sample("llm_gateway_usage_flush_failures_total")
    await send(5)
    await send(3, stream=True)
    assert accountant.buffered == 8
    ready = await client.get("/ready")
    assert ready.status == 503 and (await ready.json())["redis"] == "down"
    await eventually(lambda: _sample("llm_gateway_usage_flush_failures_total") > failures_before)
    private_redis.start()
    await eventually(lambda: accountant.buffered == 0, timeout=20)
    stored = redis_sync.Redis.from_url(private_redis.url, decode_responses=True).hgetall(
        RedisKeys("").key_usage(KEY_IDS["realtime"]))
    # The restarted Redis kept nothing on disk: exactly the 8 buffered events were written after recovery.
    assert stored["requests"] == "8"
    assert stored["completion_tokens"] == str(8 * 3)


async def test_buffer_is_bounded_and_drops_are_counted(aiohttp_client: Any, make_settings: Any) -> None:
    client = await aiohttp_client(create_app(make_settings(redis_url="redis://127.0.0.1:1/0", usage_buffer_max=3)))
    await wait_ready(client.app)
    dropped_before = _sample("llm_gateway_usage_events_dropped_total")
    for _ in range(5):
        resp = await client.post("/v1/completions", headers=auth("realtime"),
                                 json={"model": REALTIME_MODEL, "prompt": "x", "max_tokens": 1})
        assert resp.status == 200
    assert client.app[ACCOUNTANT].buffered == 3
    assert _sample("llm_gateway_usage_events_dropped_total") - dropped_before == 2
