"""Batch job API against a full gateway (shared simulator as an external runtime, real Redis)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aredis

from tests.api_helpers import submit, wait_status
from tests.conftest import KEY_IDS, REALTIME_MODEL, REDIS_URL, auth


async def test_seed_curl_flow_completes(gateway: Any) -> None:
    """The README's curl: submit with priority, poll status_url until completed, with the runtime's body."""
    created = await submit(gateway, {"model": REALTIME_MODEL, "prompt": "Write a haiku", "max_tokens": 32,
                                     "priority": 1})
    assert created["status"] == "queued"
    assert created["status_url"] == f"/v1/jobs/{created['id']}"
    assert created["priority"] == 1 and isinstance(created["created_at"], int)
    job = await wait_status(gateway, created["id"], {"completed"})
    assert job["attempts"] == 1
    assert job["response"]["object"] == "text_completion"
    assert job["response"]["model"] == REALTIME_MODEL
    assert job["usage"]["completion_tokens"] > 0
    assert job["timings"]["running_seconds"] is not None and job["error"] is None

    # The operator's record in Redis holds everything; the event stream has the whole history.
    settings = gateway.app[__import__("gateway.http.appkeys", fromlist=["SETTINGS"]).SETTINGS]
    r = aredis.Redis.from_url(REDIS_URL)
    try:
        raw = await r.hgetall(f"{settings.redis_prefix}job:{created['id']}")
        assert raw[b"status"] == b"completed" and raw[b"key_id"] == KEY_IDS["batch"].encode()
        assert 0 < await r.ttl(f"{settings.redis_prefix}job:{created['id']}") <= settings.batch_job_ttl_seconds
        events = await r.xrange(f"{settings.redis_prefix}job_events")
        mine = [e for _, e in events if e[b"job_id"] == created["id"].encode()]
        assert [e[b"event"] for e in mine] == [b"enqueued", b"started", b"completed"]
        assert mine[-1][b"status"] == b"completed" and mine[-1][b"attempt"] == b"1"
    finally:
        await r.aclose()


async def test_chat_job_completes(gateway: Any) -> None:
    created = await submit(gateway, {"model": REALTIME_MODEL, "messages": [{"role": "user", "content": "hi"}],
                                     "max_tokens": 4, "metadata": {"run": "r1"}}, "/v1/batch/chat/completions")
    job = await wait_status(gateway, created["id"], {"completed"})
    assert job["response"]["object"] == "chat.completion"
    assert job["metadata"] == {"run": "r1"} and job["endpoint"] == "/v1/chat/completions"


@pytest.mark.parametrize(("body", "param"), [
    ({"model": REALTIME_MODEL, "prompt": "x", "stream": True}, "stream"),
    ({"prompt": "x"}, "model"),
    ({"model": "", "prompt": "x"}, "model"),
    ({"model": REALTIME_MODEL}, "prompt"),
    ({"model": REALTIME_MODEL, "prompt": 12}, "prompt"),
    ({"model": REALTIME_MODEL, "prompt": "x", "priority": 10}, "priority"),
    ({"model": REALTIME_MODEL, "prompt": "x", "priority": -1}, "priority"),
    ({"model": REALTIME_MODEL, "prompt": "x", "priority": "high"}, "priority"),
    ({"model": REALTIME_MODEL, "prompt": "x", "priority": True}, "priority"),
    ({"model": REALTIME_MODEL, "prompt": "x", "priority": 1.5}, "priority"),
    ({"model": REALTIME_MODEL, "prompt": "x", "metadata": ["a"]}, "metadata"),
    ({"model": REALTIME_MODEL, "prompt": "x", "metadata": {"a": 1}}, "metadata"),
])
async def test_malformed_bodies_answer_400(gateway: Any, body: dict[str, Any], param: str) -> None:
    resp = await gateway.post("/v1/batch/completions", json=body, headers=auth("batch"))
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize("raw", [b"", b"{not json", b"[1, 2]", b'"text"'])
async def test_non_object_bodies_answer_400(gateway: Any, raw: bytes) -> None:
    resp = await gateway.post("/v1/batch/chat/completions", data=raw, headers={**auth("batch"),
                                                                              "Content-Type": "application/json"})
    assert resp.status == 400
    assert (await resp.json())["error"]["message"]


async def test_chat_messages_validated(gateway: Any) -> None:
    for messages in (None, [], "hi", [{"content": "no role"}], ["hi"]):
        resp = await gateway.post("/v1/batch/chat/completions", json={"model": REALTIME_MODEL, "messages": messages},
                                  headers=auth("batch"))
        assert resp.status == 400, messages
        assert (await resp.json())["error"]["param"].startswith("messages")


async def test_scope_required(gateway: Any) -> None:
    body = {"model": REALTIME_MODEL, "prompt": "x"}
    assert (await gateway.post("/v1/batch/completions", json=body)).status == 401
    for resp in (await gateway.post("/v1/batch/completions", json=body, headers=auth("realtime")),
                 await gateway.get("/v1/jobs", headers=auth("realtime"))):
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "missing_scope"


async def test_another_keys_job_is_not_found(gateway: Any) -> None:
    created = await submit(gateway, {"model": REALTIME_MODEL, "prompt": "mine"})
    for method in ("get", "delete"):
        resp = await getattr(gateway, method)(f"/v1/jobs/{created['id']}", headers=auth("batch2"))
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "job_not_found"
    resp = await gateway.get("/v1/jobs/job_doesnotexist", headers=auth("batch"))
    assert resp.status == 404
    listing = await (await gateway.get("/v1/jobs", headers=auth("batch2"))).json()
    assert created["id"] not in [j["id"] for j in listing["data"]]
    # The owner still sees it, untouched by the other key's DELETE.
    job = await wait_status(gateway, created["id"], {"completed"})
    assert job["status"] == "completed"


async def test_runtime_4xx_fails_at_once_with_its_message(gateway: Any) -> None:
    created = await submit(gateway, {"model": REALTIME_MODEL, "prompt": "x", "max_tokens": "lots"})
    job = await wait_status(gateway, created["id"], {"failed"})
    assert job["attempts"] == 1
    assert job["error"]["runtime_status"] == 400 and "runtime_4xx" in job["error"]["flags"]
    assert "rejected" in job["error"]["message"]


async def test_list_filters_and_cursor(aiohttp_client: Any, make_settings: Callable[..., Any]) -> None:
    from gateway.bootstrap import create_app

    client = await aiohttp_client(create_app(make_settings(batch_dispatcher_enabled=False)))
    ids = []
    for i in range(7):
        model = REALTIME_MODEL if i % 2 == 0 else "other/model"
        ids.append((await submit(client, {"model": model, "prompt": f"p{i}"}))["id"])
    await submit(client, {"model": REALTIME_MODEL, "prompt": "not mine"}, role="batch2")
    seen: list[str] = []
    cursor = None
    while True:
        url = "/v1/jobs?limit=3" + (f"&after={cursor}" if cursor else "")
        page = await (await client.get(url, headers=auth("batch"))).json()
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        cursor = page["next_cursor"]
    assert seen == list(reversed(ids))
    by_model = await (await client.get("/v1/jobs?model=other/model&limit=100", headers=auth("batch"))).json()
    assert [j["id"] for j in by_model["data"]] == [ids[5], ids[3], ids[1]]
    queued = await (await client.get("/v1/jobs?status=queued", headers=auth("batch"))).json()
    assert len(queued["data"]) == 7
    assert (await client.get("/v1/jobs?status=completed", headers=auth("batch"))).status == 200
    for bad in ("status=done", "limit=0", "limit=abc", "limit=101", "after=xyz"):
        resp = await client.get(f"/v1/jobs?{bad}", headers=auth("batch"))
        assert resp.status == 400, bad


async def test_cancel_queued_job(aiohttp_client: Any, make_settings: Callable[..., Any]) -> None:
    from gateway.bootstrap import create_app
    from gateway.http.appkeys import REDIS, REDIS_KEYS

    client = await aiohttp_client(create_app(make_settings(batch_dispatcher_enabled=False)))
    created = await submit(client, {"model": REALTIME_MODEL, "prompt": "x"})
    resp = await client.delete(f"/v1/jobs/{created['id']}", headers=auth("batch"))
    assert resp.status == 200
    assert (await resp.json())["status"] == "cancelled"
    keys = client.app[REDIS_KEYS]
    assert await client.app[REDIS].zcard(keys.batch_ready(REALTIME_MODEL)) == 0
    again = await client.delete(f"/v1/jobs/{created['id']}", headers=auth("batch"))
    assert again.status == 409
    events = await client.app[REDIS].xrange(keys.job_events)
    assert [e[b"event"] for _, e in events] == [b"enqueued", b"cancelled"]
    assert orjson.loads(await (await client.get(f"/v1/jobs/{created['id']}", headers=auth("batch"))).read())[
        "status"] == "cancelled"
