"""Batch jobs and OpenAI Batches on /v1/embeddings and /v1/responses, with token accounting.

The runtime here is a small aiohttp app in vLLM's shapes for the two endpoints (plus /health and
/v1/models), so each test can see exactly which path and body the dispatcher forwarded.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from gateway.bootstrap import create_app
from gateway.http.appkeys import ACCOUNTANT
from gateway.tokens import response_tokens, usage_tokens
from tests.conftest import KEY_IDS, REALTIME_MODEL, TOKENS, auth, eventually, sdk, wait_ready

DIM = 8


def _words(value: Any) -> int:
    if isinstance(value, str):
        return max(1, len(value.split()))
    if isinstance(value, list):
        return sum(_words(v) if not isinstance(v, int) else 1 for v in value)
    if isinstance(value, dict):
        return _words(value.get("content", ""))
    return 1


def _vector(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round(b / 255, 6) for b in digest[:DIM]]


class FakeRuntime:
    """vLLM-shaped answers for embeddings and responses; `seen` records (path, body) of each call."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self.app = web.Application()
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_post("/v1/embeddings", self.embeddings)
        self.app.router.add_post("/v1/responses", self.responses)

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": REALTIME_MODEL, "object": "model", "owned_by": "vllm", "root": REALTIME_MODEL}]})

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.seen.append(("/v1/embeddings", body))
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"object": "embedding", "index": i, "embedding": _vector(str(x))} for i, x in enumerate(inputs)]
        tokens = sum(_words(x) for x in inputs)
        return web.json_response({"id": "embd-1", "object": "list", "created": 1, "model": body["model"],
                                  "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens,
                                                          "completion_tokens": 0}})

    async def responses(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.seen.append(("/v1/responses", body))
        words = _words(body["input"])
        out = min(int(body.get("max_output_tokens") or 5), 5)
        text = " ".join(["ok"] * out)
        return web.json_response({
            "id": "resp_1", "object": "response", "created_at": 1, "status": "completed", "model": body["model"],
            "output": [{"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
                        "content": [{"type": "output_text", "text": text, "annotations": []}]}],
            "usage": {"input_tokens": words, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": out, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": words + out}})


@pytest.fixture
async def runtime(aiohttp_server: Any) -> AsyncIterator[FakeRuntime]:
    fake = FakeRuntime()
    server = await aiohttp_server(fake.app)
    fake.url = str(server.make_url("")).rstrip("/")  # type: ignore[attr-defined]
    yield fake


@pytest.fixture
async def gw(aiohttp_client: Any, make_settings: Any, runtime: FakeRuntime) -> Any:
    client = await aiohttp_client(create_app(make_settings(runtime_url=runtime.url)))  # type: ignore[attr-defined]
    await wait_ready(client.app)
    return client


async def _job(client: Any, job_id: str) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        resp = await client.get(f"/v1/jobs/{job_id}", headers=auth("batch"))
        job: dict[str, Any] = await resp.json()
        return job if job["status"] in ("completed", "failed") else None

    return await eventually(done, timeout=20)


async def _usage_row(client: Any, key_id: str) -> dict[str, Any]:
    await eventually(lambda: client.app[ACCOUNTANT].buffered == 0)
    resp = await client.get("/monitor/key_usage?limit=50", headers=auth("monitor"))
    rows = {r["key_id"]: r for r in (await resp.json())["data"]}
    return rows.get(key_id, {})


def test_tokens_of_every_endpoint() -> None:
    assert response_tokens({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}) == (3, 4)
    assert response_tokens({"usage": {"prompt_tokens": 6, "total_tokens": 6}}) == (6, 0)  # embeddings
    assert response_tokens({"usage": {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7}}) == (5, 2)
    # A Responses stream's response.completed event carries the usage under "response".
    assert response_tokens({"type": "response.completed",
                            "response": {"usage": {"input_tokens": 1, "output_tokens": 9}}}) == (1, 9)
    assert response_tokens({"usage": None}) == (0, 0)
    assert response_tokens([1, 2]) == (0, 0)
    assert usage_tokens({"prompt_tokens": True, "completion_tokens": -3}) == (0, 0)
    assert usage_tokens({"input_tokens": 2.0}) == (2, 0)


async def test_embeddings_job_forwarded_and_accounted(gw: Any, runtime: FakeRuntime) -> None:
    resp = await gw.post("/v1/batch/embeddings", headers=auth("batch"),
                         json={"model": REALTIME_MODEL, "input": ["one two three", "four"], "priority": 3,
                               "metadata": {"k": "v"}})
    assert resp.status == 202, await resp.text()
    created = await resp.json()
    assert created["endpoint"] == "/v1/embeddings"
    job = await _job(gw, created["id"])
    assert job["status"] == "completed", job
    assert [d["embedding"] for d in job["response"]["data"]] == [_vector("one two three"), _vector("four")]
    assert job["usage"]["prompt_tokens"] == 4
    path, body = runtime.seen[-1]
    # Forwarded to the path the job names, without the batch-only fields.
    assert path == "/v1/embeddings" and body["input"] == ["one two three", "four"]
    assert "metadata" not in body
    row = await _usage_row(gw, KEY_IDS["batch"])
    assert (row["prompt_tokens"], row["completion_tokens"], row["successes"]) == (4, 0, 1)


async def test_responses_job_forwarded_and_accounted(gw: Any, runtime: FakeRuntime) -> None:
    resp = await gw.post("/v1/batch/responses", headers=auth("batch"),
                         json={"model": REALTIME_MODEL, "input": "a b c", "max_output_tokens": 3})
    assert resp.status == 202, await resp.text()
    job = await _job(gw, (await resp.json())["id"])
    assert job["status"] == "completed", job
    assert job["response"]["object"] == "response"
    assert job["response"]["output"][0]["content"][0]["text"] == "ok ok ok"
    assert job["usage"]["input_tokens"] == 3 and job["usage"]["output_tokens"] == 3
    assert runtime.seen[-1][0] == "/v1/responses"
    row = await _usage_row(gw, KEY_IDS["batch"])
    assert (row["prompt_tokens"], row["completion_tokens"]) == (3, 3)


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/batch/embeddings", {"model": REALTIME_MODEL}, "input"),
    ("/v1/batch/embeddings", {"model": REALTIME_MODEL, "input": []}, "input"),
    ("/v1/batch/embeddings", {"model": REALTIME_MODEL, "input": {"text": "x"}}, "input"),
    ("/v1/batch/responses", {"model": REALTIME_MODEL, "input": ""}, "input"),
    ("/v1/batch/responses", {"model": REALTIME_MODEL, "input": 3}, "input"),
    ("/v1/batch/responses", {"model": REALTIME_MODEL, "input": "x", "stream": True}, "stream"),
    ("/v1/batch/responses", {"model": REALTIME_MODEL, "input": "x", "background": True}, "background"),
])
async def test_bad_bodies_are_clear_400s(gw: Any, path: str, body: dict[str, Any], param: str) -> None:
    resp = await gw.post(path, headers=auth("batch"), json=body)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == param and error["message"]


async def test_sdk_batches_with_embeddings_end_to_end(gw: Any, runtime: FakeRuntime) -> None:
    api = sdk(gw)
    rows = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
             "body": {"model": REALTIME_MODEL, "input": f"text number {i}"}} for i in range(12)]
    rows.append({"custom_id": "wrong", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": REALTIME_MODEL, "messages": [{"role": "user", "content": "hi"}]}})
    data = b"".join(orjson.dumps(r) + b"\n" for r in rows)
    f = await api.files.create(file=("emb.jsonl", data), purpose="batch")
    batch = await api.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    assert batch.endpoint == "/v1/embeddings"

    async def finished() -> Any:
        b = await api.batches.retrieve(batch.id)
        return b if b.status in ("completed", "failed") else None

    done = await eventually(finished, timeout=30, interval=0.1)
    assert (done.status, done.request_counts.completed, done.request_counts.failed) == ("completed", 12, 1)
    assert done.usage is not None
    assert (done.usage.input_tokens, done.usage.output_tokens) == (36, 0)
    content = await api.files.content(done.output_file_id)
    out = {o["custom_id"]: o for o in map(orjson.loads, content.content.splitlines())}
    assert set(out) == {f"e{i}" for i in range(12)}
    assert out["e5"]["response"]["status_code"] == 200
    assert out["e5"]["response"]["body"]["data"][0]["embedding"] == _vector("text number 5")
    errors = [orjson.loads(x) for x in (await api.files.content(done.error_file_id)).content.splitlines()]
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [("wrong", "invalid_url")]
    assert {p for p, _ in runtime.seen} == {"/v1/embeddings"}


async def test_sdk_batches_with_responses(gw: Any, runtime: FakeRuntime) -> None:
    api = sdk(gw)
    rows = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses",
             "body": {"model": REALTIME_MODEL, "input": [{"role": "user", "content": "say ok twice"}],
                      "max_output_tokens": 2}} for i in range(4)]
    rows.append({"custom_id": "streamed", "method": "POST", "url": "/v1/responses",
                 "body": {"model": REALTIME_MODEL, "input": "x", "stream": True}})
    f = await api.files.create(file=("resp.jsonl", b"".join(orjson.dumps(r) + b"\n" for r in rows)),
                               purpose="batch")
    batch = await api.batches.create(input_file_id=f.id, endpoint="/v1/responses", completion_window="24h")

    async def finished() -> Any:
        b = await api.batches.retrieve(batch.id)
        return b if b.status in ("completed", "failed") else None

    done = await eventually(finished, timeout=30, interval=0.1)
    assert (done.status, done.request_counts.completed, done.request_counts.failed) == ("completed", 4, 1)
    assert done.usage is not None
    assert (done.usage.input_tokens, done.usage.output_tokens, done.usage.total_tokens) == (12, 8, 20)
    out = [orjson.loads(x) for x in (await api.files.content(done.output_file_id)).content.splitlines()]
    assert {o["response"]["body"]["object"] for o in out} == {"response"}
    [error] = [orjson.loads(x) for x in (await api.files.content(done.error_file_id)).content.splitlines()]
    assert error["custom_id"] == "streamed" and error["error"]["param"] == "body.stream"


async def test_batches_refuse_an_unknown_endpoint(gw: Any) -> None:
    api = sdk(gw)
    f = await api.files.create(file=("x.jsonl", b'{"custom_id":"a"}\n'), purpose="batch")
    with pytest.raises(openai.BadRequestError) as info:
        await api.batches.create(input_file_id=f.id, endpoint="/v1/moderations",  # type: ignore[arg-type]
                                 completion_window="24h")
    assert "/v1/embeddings" in info.value.message and "/v1/responses" in info.value.message


@pytest.fixture
def litellm(monkeypatch: pytest.MonkeyPatch) -> Any:
    """LiteLLM as a library, offline: its model cost map from the package, not fetched at import."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm as module

    return module


async def test_litellm_batch_functions_with_embeddings(gw: Any, runtime: FakeRuntime, litellm: Any,
                                                       tmp_path: Any) -> None:
    common = {"custom_llm_provider": "openai", "api_base": str(gw.make_url("/v1")), "api_key": TOKENS["batch"]}
    rows = [{"custom_id": f"l{i}", "method": "POST", "url": "/v1/embeddings",
             "body": {"model": REALTIME_MODEL, "input": f"lite {i}"}} for i in range(3)]
    path = tmp_path / "lite.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    with path.open("rb") as handle:
        created = await litellm.acreate_file(file=handle, purpose="batch", **common)
    batch = await litellm.acreate_batch(completion_window="24h", endpoint="/v1/embeddings",
                                        input_file_id=created.id, **common)

    async def finished() -> Any:
        b = await litellm.aretrieve_batch(batch_id=batch.id, **common)
        return b if b.status in ("completed", "failed") else None

    done = await eventually(finished, timeout=30, interval=0.2)
    assert done.status == "completed" and done.request_counts.completed == 3
    content = await litellm.afile_content(file_id=done.output_file_id, **common)
    out = {o["custom_id"]: o for o in map(orjson.loads, content.content.splitlines())}
    assert out["l2"]["response"]["body"]["data"][0]["embedding"] == _vector("lite 2")
