"""The realtime proxy end to end: the official openai SDK, streams, errors, limits, usage accounting."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import orjson
import pytest
import redis.asyncio as redis_async
from openai import AsyncOpenAI

from gateway.bootstrap import create_app
from gateway.http.appkeys import ACCOUNTANT, SETTINGS
from gateway.redis_keys import RedisKeys
from tests.conftest import (
    KEY_IDS,
    REALTIME_MODEL,
    REDIS_URL,
    TOKENS,
    RedisBackend,
    auth,
    eventually,
    start_simulator,
    wait_ready,
)


def sdk(client: Any, role: str = "realtime") -> AsyncOpenAI:
    """The official SDK pointed at the test gateway."""
    return AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=TOKENS[role], max_retries=0)


async def test_sdk_chat_and_completions(gateway: Any) -> None:
    api = sdk(gateway)
    chat = await api.chat.completions.create(model=REALTIME_MODEL, messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=5, seed=7)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content
    assert chat.usage is not None and chat.usage.completion_tokens == 5
    again = await api.chat.completions.create(model=REALTIME_MODEL, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=5, seed=7)
    assert again.choices[0].message.content == chat.choices[0].message.content
    comp = await api.completions.create(model=REALTIME_MODEL, prompt="Once upon a time", max_tokens=4,
                                        logprobs=2)
    assert comp.choices[0].text
    assert comp.choices[0].logprobs is not None and len(comp.choices[0].logprobs.tokens or []) == 4
    models = await api.models.list()
    assert REALTIME_MODEL in [m.id for m in models.data]


async def test_sdk_streaming_usage_only_when_asked(gateway: Any) -> None:
    api = sdk(gateway)
    stream = await api.chat.completions.create(model=REALTIME_MODEL, messages=[{"role": "user", "content": "x"}],
                                               max_tokens=6, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6

    plain = await api.chat.completions.create(model=REALTIME_MODEL, messages=[{"role": "user", "content": "x"}],
                                              max_tokens=6, stream=True)
    plain_chunks = [c async for c in plain]
    assert all(c.choices for c in plain_chunks), "usage-only chunk leaked to a client that did not ask"
    assert "".join(c.choices[0].delta.content or "" for c in plain_chunks) == text

    # Both streams were accounted with the runtime's token counts, though only one client asked.
    accountant = gateway.app[ACCOUNTANT]
    await eventually(lambda: accountant.buffered == 0)
    prefix = gateway.app[SETTINGS].redis_prefix
    r = redis_async.Redis.from_url(REDIS_URL, decode_responses=True)
    usage = await r.hgetall(RedisKeys(prefix).key_usage(KEY_IDS['realtime']))
    await r.aclose()
    assert usage["requests"] == "2" and usage["completion_tokens"] == "12"


async def test_stream_and_non_stream_agree(gateway: Any) -> None:
    body = {"model": REALTIME_MODEL, "prompt": "abc def", "max_tokens": 5, "seed": 3}
    resp = await gateway.post("/v1/completions", json=body, headers=auth("realtime"))
    assert resp.status == 200
    whole = await resp.json()
    resp = await gateway.post("/v1/completions", json={**body, "stream": True}, headers=auth("realtime"))
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    raw = await resp.read()
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    text = "".join(orjson.loads(e[6:])["choices"][0]["text"] for e in events[:-1])
    assert text == whole["choices"][0]["text"]
    assert resp.headers.get("X-Request-ID")


@pytest.mark.parametrize(("kwargs", "status", "needle"), [
    ({"data": b"not json"}, 400, "not valid JSON"),
    ({"data": b"[1,2]"}, 400, "JSON object"),
    ({"data": b""}, 400, "empty"),
    ({"json": {"messages": [{"role": "user", "content": "x"}]}}, 400, "'model'"),
    ({"json": {"model": 5, "messages": []}}, 400, "'model'"),
    ({"json": {"model": REALTIME_MODEL, "messages": "hi"}}, 400, "'messages'"),
    ({"json": {"model": REALTIME_MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": "7"}}, 400,
     "'max_tokens'"),
    ({"json": {"model": REALTIME_MODEL, "messages": [{"role": "user", "content": "x"}], "stream": "yes"}}, 400,
     "'stream'"),
    ({"json": {"model": "other/model", "messages": [{"role": "user", "content": "x"}]}}, 404, REALTIME_MODEL),
    ({"data": b"{" + b" " * (4 * 1024 * 1024 + 10) + b"}"}, 413, "MAX_BODY_BYTES"),
])
async def test_bad_bodies_get_clear_4xx(gateway: Any, kwargs: dict[str, Any], status: int, needle: str) -> None:
    resp = await gateway.post("/v1/chat/completions", headers=auth("realtime"), **kwargs)
    assert resp.status == status
    body = await resp.json()
    assert set(body["error"]) == {"message", "type", "code", "param"}
    assert needle in body["error"]["message"]
    if status == 404:
        assert body["error"]["code"] == "model_not_found"


async def test_runtime_errors_pass_through(gateway: Any) -> None:
    # The simulator (like vLLM) refuses a prompt longer than the model's context: its 400 reaches the client.
    resp = await gateway.post("/v1/completions", headers=auth("realtime"),
                              json={"model": REALTIME_MODEL, "prompt": "word " * 5000, "max_tokens": 1})
    assert resp.status == 400
    assert "error" in await resp.json()


async def test_model_alias(aiohttp_client: Any, make_settings: Any) -> None:
    client = await aiohttp_client(create_app(make_settings(model_aliases="short-name, other")))
    await wait_ready(client.app)
    resp = await client.post("/v1/completions", headers=auth("realtime"),
                             json={"model": "short-name", "prompt": "hi", "max_tokens": 2})
    assert resp.status == 200
    assert (await resp.json())["model"] == REALTIME_MODEL
    listing = await (await client.get("/v1/models", headers=auth("realtime"))).json()
    assert {"short-name", "other", REALTIME_MODEL} <= {m["id"] for m in listing["data"]}


@pytest.mark.usefixtures("redis_backend")  # usage on one Redis and on a Redis Cluster
async def test_usage_counters_after_mixed_traffic(gateway: Any, test_redis: RedisBackend) -> None:
    api = sdk(gateway)
    for _ in range(3):
        await api.completions.create(model=REALTIME_MODEL, prompt="one two three", max_tokens=4)
    stream = await api.chat.completions.create(model=REALTIME_MODEL, messages=[{"role": "user", "content": "a b"}],
                                               max_tokens=5, stream=True)
    async for _ in stream:
        pass
    with pytest.raises(openai.BadRequestError):
        await api.completions.create(model=REALTIME_MODEL, prompt="word " * 5000, max_tokens=1)
    other = sdk(gateway, "all")
    await other.completions.create(model=REALTIME_MODEL, prompt="x", max_tokens=2)

    monitor = auth("monitor")
    accountant = gateway.app[ACCOUNTANT]
    await eventually(lambda: accountant.buffered == 0)
    resp = await gateway.get("/monitor/key_usage?limit=50", headers=monitor)
    assert resp.status == 200
    rows = {r["key_id"]: r for r in (await resp.json())["data"]}
    rt = rows[KEY_IDS["realtime"]]
    assert rt["requests"] == 5 and rt["successes"] == 4 and rt["errors"] == 1
    assert rt["completion_tokens"] == 3 * 4 + 5
    assert rt["prompt_tokens"] > 0
    assert rows[KEY_IDS["all"]]["requests"] == 1

    from datetime import UTC, datetime

    day = datetime.now(UTC).strftime("%Y%m%d")
    daily = await (await gateway.get(f"/monitor/key_usage?bucket={day}", headers=monitor)).json()
    assert {r["key_id"]: r["requests"] for r in daily["data"]}[KEY_IDS["realtime"]] == 5
    bad = await gateway.get("/monitor/key_usage?bucket=2026-11-27", headers=monitor)
    assert bad.status == 400

    # The raw Redis layout operators read with redis-cli: all-time hash and the daily bucket with a TTL.
    prefix = gateway.app[SETTINGS].redis_prefix
    r = test_redis.async_client(decode_responses=True)
    raw = await r.hgetall(RedisKeys(prefix).key_usage(KEY_IDS['realtime']))
    ttl = await r.ttl(RedisKeys(prefix).key_usage_day(KEY_IDS['realtime'], day))
    await r.aclose()
    assert raw["requests"] == "5" and float(raw["last_used_at"]) > 0
    assert 89 * 86400 < ttl <= 90 * 86400


@pytest.mark.slow
async def test_client_disconnect_cancels_upstream(aiohttp_client: Any, make_settings: Any) -> None:
    proc, url = start_simulator(REALTIME_MODEL, "--sim-itl", "0.05")
    try:
        client = await aiohttp_client(create_app(make_settings(runtime_url=url)))
        await wait_ready(client.app)
        resp = await client.post("/v1/completions", headers=auth("realtime"),
                                 json={"model": REALTIME_MODEL, "prompt": "x", "max_tokens": 400, "stream": True})
        assert resp.status == 200
        await resp.content.readline()
        resp.close()

        async def running() -> bool:
            async with client.session.get(url + "/metrics") as m:
                text = await m.text()
            line = next(x for x in text.splitlines() if x.startswith("vllm:num_requests_running"))
            return float(line.rsplit(" ", 1)[1]) == 0.0

        await eventually(running, timeout=10)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.slow
async def test_runtime_crash_mid_stream_ends_cleanly(aiohttp_client: Any, make_settings: Any) -> None:
    proc, url = start_simulator(REALTIME_MODEL, "--sim-itl", "0.01", "--sim-crash-after", "1")
    try:
        client = await aiohttp_client(create_app(make_settings(runtime_url=url)))
        await wait_ready(client.app)
        ok = await client.post("/v1/completions", headers=auth("realtime"),
                               json={"model": REALTIME_MODEL, "prompt": "x", "max_tokens": 3})
        assert ok.status == 200
        resp = await client.post("/v1/completions", headers=auth("realtime"),
                                 json={"model": REALTIME_MODEL, "prompt": "x", "max_tokens": 40, "stream": True})
        assert resp.status == 200
        events = [e for e in (await resp.read()).split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]"
        error = orjson.loads(events[-2][6:])
        assert error["error"]["type"] == "server_error"
        assert len(events) > 2  # some tokens arrived before the crash
        # After the crash, requests get a clean 502 or 503, never a hang or a 500.
        after = await client.post("/v1/completions", headers=auth("realtime"),
                                  json={"model": REALTIME_MODEL, "prompt": "x", "max_tokens": 3})
        assert after.status in (502, 503)
        assert "error" in await after.json()
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.slow
async def test_runtime_5xx_maps_to_502(aiohttp_client: Any, make_settings: Any) -> None:
    proc, url = start_simulator(REALTIME_MODEL, "--sim-fail-every", "1")
    try:
        client = await aiohttp_client(create_app(make_settings(runtime_url=url)))
        await wait_ready(client.app)
        resp = await client.post("/v1/completions", headers=auth("realtime"),
                                 json={"model": REALTIME_MODEL, "prompt": "x", "max_tokens": 3})
        assert resp.status == 502
        body = await resp.json()
        assert body["error"]["code"] == "upstream_error"
    finally:
        proc.terminate()
        proc.wait(10)


async def test_metrics_exposition(gateway: Any) -> None:
    await gateway.post("/v1/completions", headers=auth("realtime"),
                       json={"model": REALTIME_MODEL, "prompt": "x", "max_tokens": 2})
    resp = await gateway.get("/metrics", headers=auth("monitor"))
    assert resp.status == 200
    text = await resp.text()
    for name in ("llm_gateway_http_requests_total", "llm_gateway_http_request_duration_seconds",
                 "llm_gateway_upstream_time_to_first_token_seconds", "llm_gateway_tokens_total",
                 "llm_gateway_runtime_state", "llm_gateway_runtime_restarts_total", "process_resident_memory_bytes"):
        assert name in text
    assert 'route="/v1/completions"' in text
    assert TOKENS["realtime"] not in text


async def test_health_and_ready(gateway: Any) -> None:
    assert (await gateway.get("/health")).status == 200
    ready = await gateway.get("/ready")
    assert ready.status == 200
    assert (await ready.json())["redis"] == "up"


async def test_ready_reports_redis_down(aiohttp_client: Any, make_settings: Any) -> None:
    client = await aiohttp_client(create_app(make_settings(redis_url="redis://127.0.0.1:1/0")))
    await wait_ready(client.app)
    resp = await client.get("/ready")
    assert resp.status == 503
    assert (await resp.json())["redis"] == "down"
    # Realtime keeps working without Redis.
    ok = await client.post("/v1/completions", headers=auth("realtime"),
                           json={"model": REALTIME_MODEL, "prompt": "x", "max_tokens": 2})
    assert ok.status == 200
    await asyncio.sleep(0)


@pytest.mark.parametrize(("body", "message"), [
    (b'{"object": "error", "message": "Input is too long", "type": "BadRequestError", "param": null, "code": 400}',
     "Input is too long"),  # SGLang's shape
    (b"plain text from a proxy", "plain text from a proxy"),
    (b'{"error": {"message": "vLLM says no", "type": "BadRequestError", "param": "n", "code": 400}}', "vLLM says no"),
])
def test_runtime_4xx_bodies_get_the_openai_shape(body: bytes, message: str) -> None:
    from gateway.http.realtime import openai_error_payload

    error = orjson.loads(openai_error_payload(400, body))["error"]
    assert error["message"] == message
    assert set(error) == {"message", "type", "code", "param"}
