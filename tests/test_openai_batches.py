"""OpenAI Batches API end to end: the official `openai` SDK, the batch queue and the simulator runtime."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest
from openai import AsyncOpenAI

from gateway.bootstrap import create_app
from gateway.http.appkeys import SETTINGS, UPLOADS
from gateway.openai_batches.lines import YIELD_LINES, read_lines
from tests.conftest import (
    KEY_IDS,
    REALTIME_MODEL,
    REDIS_URL,
    RedisBackend,
    auth,
    eventually,
    free_port,
    sdk,
    sdk_at,
    start_simulator,
    wait_http,
    wait_ready,
)

pytestmark = pytest.mark.slow  # whole OpenAI batches, gateway restarts and SIGKILL

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def slow_sim() -> Iterator[str]:
    """A simulator taking ~50 ms per request (16 tokens at 3 ms), so a batch is caught mid-way."""
    proc, url = start_simulator(REALTIME_MODEL, "--served-model-name", REALTIME_MODEL, "--sim-itl", "0.003")
    yield url
    proc.terminate()
    proc.wait(10)


def line(custom_id: str, content: str = "hi", **body: Any) -> dict[str, Any]:
    """One valid input line for the chat endpoint."""
    return {"custom_id": custom_id, "method": "POST", "url": CHAT,
            "body": {"model": REALTIME_MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 16,
                     **body}}


def jsonl(rows: list[Any]) -> bytes:
    """Rows as JSONL (a str row is written as it is: a malformed line)."""
    return b"".join((r.encode() if isinstance(r, str) else orjson.dumps(r)) + b"\n" for r in rows)


async def run_batch(api: AsyncOpenAI, data: bytes, **extra: Any) -> Any:
    """Upload `data` and create a chat batch on it."""
    f = await api.files.create(file=("input.jsonl", data), purpose="batch")
    return await api.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h", **extra)


async def wait_batch(api: AsyncOpenAI, batch_id: str, statuses: set[str], timeout: float = 60.0) -> Any:
    """Poll like an SDK user until the batch reaches one of `statuses`."""

    async def check() -> Any:
        b = await api.batches.retrieve(batch_id)
        return b if b.status in statuses else None

    return await eventually(check, timeout=timeout, interval=0.1)


async def file_lines(api: AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    """The JSON lines of a file, read with files.content."""
    assert file_id is not None
    content = await api.files.content(file_id)
    return [orjson.loads(x) for x in content.content.splitlines() if x.strip()]


@pytest.mark.usefixtures("redis_backend")  # on one Redis and on a Redis Cluster
async def test_sdk_end_to_end_1000_lines(gateway: Any) -> None:
    api = sdk(gateway)
    n = 1000
    batch = await run_batch(api, jsonl([line(f"req-{i}", f"prompt {i}") for i in range(n)]),
                            metadata={"project": "e2e"})
    assert batch.status == "validating" and batch.endpoint == CHAT and batch.metadata == {"project": "e2e"}
    assert batch.expires_at is not None and batch.expires_at - batch.created_at == 24 * 3600
    done = await wait_batch(api, batch.id, {"completed", "failed"}, timeout=120)
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (n, n, 0)
    assert done.error_file_id is None and done.model == REALTIME_MODEL
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert done.in_progress_at <= done.finalizing_at <= done.completed_at
    assert done.usage is not None and done.usage.output_tokens > 0

    out = await file_lines(api, done.output_file_id)
    assert len(out) == n
    assert sorted(o["custom_id"] for o in out) == sorted(f"req-{i}" for i in range(n))
    first = out[0]
    assert set(first) == {"id", "custom_id", "response", "error"} and first["error"] is None
    assert first["response"]["status_code"] == 200 and first["response"]["request_id"] == first["id"]
    assert first["response"]["body"]["object"] == "chat.completion"
    output_file = await api.files.retrieve(done.output_file_id)
    assert output_file.purpose == "batch_output" and output_file.filename == f"{batch.id}_output.jsonl"

    listed = await api.batches.list()
    assert [b.id for b in listed.data] == [batch.id]
    # Each line ran as a job of the batch queue, visible to its key.
    resp = await gateway.get(f"/v1/jobs/{first['id']}", headers=auth("batch"))
    job = await resp.json()
    assert job["status"] == "completed" and job["metadata"]["custom_id"] == first["custom_id"]
    assert job["metadata"]["openai_batch_id"] == batch.id


@pytest.mark.usefixtures("redis_backend")  # on one Redis and on a Redis Cluster
async def test_bad_lines_go_to_the_error_file(gateway: Any) -> None:
    api = sdk(gateway)
    rows: list[Any] = [
        line("ok-1"),
        "this is not json",                                                   # line 2
        line("ok-1"),                                                         # 3: duplicate custom_id
        {**line("get"), "method": "GET"},                                     # 4
        {**line("url"), "url": "/v1/completions"},                            # 5
        {"custom_id": "nomsg", "method": "POST", "url": CHAT, "body": {"model": REALTIME_MODEL}},  # 6
        line("stream", stream=True),                                          # 7
        [1, 2, 3],                                                            # 8: JSON, not an object
        {"method": "POST", "url": CHAT, "body": {}},                          # 9: no custom_id
        "",                                                                   # blank: skipped
        line("ok-2", priority=9, metadata={"x": "y"}),                        # 11: batch fields ignored
        line("too-long", max_tokens=10_000_000),                              # 12: past REQUEST_MAX_TOKENS
    ]
    batch = await run_batch(api, jsonl(rows))
    done = await wait_batch(api, batch.id, {"completed", "failed"})
    assert done.status == "completed"
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (11, 2, 9)
    assert sorted(o["custom_id"] for o in await file_lines(api, done.output_file_id)) == ["ok-1", "ok-2"]
    errors = await file_lines(api, done.error_file_id)
    rejected = [e for e in errors if e["custom_id"] == "too-long"]
    assert len(rejected) == 1 and rejected[0]["response"] is None
    assert rejected[0]["error"]["code"] == "invalid_body" and "REQUEST_MAX_TOKENS" in rejected[0]["error"]["message"]
    by_line = {e["error"]["line"]: e for e in errors if e["error"]}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8, 9, 12]
    assert {n: by_line[n]["error"]["code"] for n in by_line} == {
        2: "invalid_json", 3: "duplicate_custom_id", 4: "invalid_method", 5: "invalid_url", 6: "invalid_body",
        7: "invalid_body", 8: "invalid_json", 9: "invalid_custom_id", 12: "invalid_body"}
    assert by_line[3]["custom_id"] == "ok-1" and by_line[2]["custom_id"] is None
    assert all(e["response"] is None for e in by_line.values())
    assert by_line[6]["error"]["param"] == "body.messages" and "Line 6" in by_line[6]["error"]["message"]


async def test_completions_endpoint(gateway: Any) -> None:
    api = sdk(gateway)
    rows = [{"custom_id": f"p{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": REALTIME_MODEL, "prompt": f"Say {i}", "max_tokens": 4}} for i in range(20)]
    rows.append(line("chat-in-a-completions-batch"))  # url /v1/chat/completions: a bad line here
    f = await api.files.create(file=("c.jsonl", jsonl(rows)), purpose="batch")
    batch = await api.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    done = await wait_batch(api, batch.id, {"completed", "failed"})
    assert (done.status, done.request_counts.completed, done.request_counts.failed) == ("completed", 20, 1)
    out = await file_lines(api, done.output_file_id)
    assert {o["response"]["body"]["object"] for o in out} == {"text_completion"}
    [error] = await file_lines(api, done.error_file_id)
    assert error["error"]["code"] == "invalid_url" and error["error"]["line"] == 21


@pytest.mark.parametrize(("data", "overrides", "code"), [
    (b"name,prompt\nalice,hello\nbob,hi\n", {}, "invalid_file_format"),
    (b"\n\n  \n", {}, "empty_file"),
    (jsonl([line(str(i)) for i in range(6)]), {"openai_batch_max_lines": 5}, "too_many_lines"),
    (jsonl([line(str(i)) for i in range(6)]), {"openai_batch_max_file_bytes": 100}, "file_too_large"),
])
async def test_unusable_file_fails_the_batch(aiohttp_client: Any, make_settings: Any, data: bytes,
                                             overrides: dict[str, Any], code: str) -> None:
    client = await aiohttp_client(create_app(make_settings(**overrides)))
    await wait_ready(client.app)
    api = sdk(client)
    batch = await run_batch(api, data)
    done = await wait_batch(api, batch.id, {"failed", "completed"})
    assert done.status == "failed" and done.failed_at is not None
    assert done.errors is not None and done.errors.data and done.errors.data[0].code == code
    assert done.output_file_id is None and done.error_file_id is None
    if code == "invalid_file_format":
        assert [e.line for e in done.errors.data[1:]] == [1, 2, 3]
    # Nothing was enqueued.
    resp = await client.get("/v1/jobs", headers=auth("batch"))
    assert (await resp.json())["data"] == []


@pytest.mark.usefixtures("redis_backend")  # on one Redis and on a Redis Cluster
async def test_cancel_mid_way(aiohttp_client: Any, make_settings: Any, slow_sim: str,
                              test_redis: RedisBackend) -> None:
    client = await aiohttp_client(create_app(make_settings(runtime_url=slow_sim, max_concurrent_batch=2)))
    await wait_ready(client.app)
    api = sdk(client)
    n = 200
    batch = await run_batch(api, jsonl([line(f"c{i}") for i in range(n)]))

    async def some_done() -> bool:
        b = await api.batches.retrieve(batch.id)
        return b.request_counts is not None and b.request_counts.completed >= 3

    await eventually(some_done, timeout=30)
    cancelling = await api.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at is not None
    done = await wait_batch(api, batch.id, {"cancelled"})
    assert done.cancelled_at is not None
    completed = done.request_counts.completed
    assert 3 <= completed < n
    out = await file_lines(api, done.output_file_id)
    errors = await file_lines(api, done.error_file_id)
    assert len(out) == completed
    assert {e["error"]["code"] for e in errors} <= {"batch_cancelled"} and len(out) + len(errors) == n
    assert sorted(x["custom_id"] for x in out + errors) == sorted(f"c{i}" for i in range(n))
    # The queue holds nothing of the batch any more; a second cancel is a 409.
    settings = client.app[SETTINGS]
    r = test_redis.async_client()
    try:
        assert await r.zcard(f"{settings.redis_prefix}{{batch}}:ready:{REALTIME_MODEL}") == 0
    finally:
        await r.aclose()
    resp = await client.post(f"/v1/batches/{batch.id}/cancel", headers=auth("batch"))
    assert resp.status == 200 and (await resp.json())["status"] == "cancelled"
    with pytest.raises(openai.NotFoundError):
        await sdk(client, "batch2").batches.cancel(batch.id)


@pytest.mark.parametrize("when", ["while_running", "right_after_create"])
@pytest.mark.usefixtures("redis_backend")  # on one Redis and on a Redis Cluster
async def test_restart_mid_batch_loses_no_line(aiohttp_client: Any, make_settings: Any, slow_sim: str,
                                               when: str) -> None:
    settings = make_settings(runtime_url=slow_sim, max_concurrent_batch=4, shutdown_timeout=2.0,
                             openai_batch_enqueue_chunk=7, batch_lease_seconds=2.0)
    first = await aiohttp_client(create_app(settings))
    await wait_ready(first.app)
    n = 300
    batch = await run_batch(sdk(first), jsonl([line(f"r{i}") for i in range(n)]))

    async def mid_way() -> Any:
        b = await sdk(first).batches.retrieve(batch.id)
        return b if b.request_counts is not None and 0 < b.request_counts.completed < n * 0.5 else None

    if when == "while_running":
        before = await eventually(mid_way, timeout=30)
        assert before.status == "in_progress"
    # The gateway stops mid-batch (validating, enqueuing or running): manager and dispatcher stop with it.
    await first.close()

    second = await aiohttp_client(create_app(settings))
    await wait_ready(second.app)
    api = sdk(second)
    done = await wait_batch(api, batch.id, {"completed", "failed"}, timeout=90)
    assert done.status == "completed"
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (n, n, 0)
    out = await file_lines(api, done.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(f"r{i}" for i in range(n))  # each exactly once
    assert done.error_file_id is None


async def test_window_expiry(aiohttp_client: Any, make_settings: Any, slow_sim: str) -> None:
    client = await aiohttp_client(create_app(make_settings(runtime_url=slow_sim, max_concurrent_batch=1,
                                                           openai_batch_window_seconds=1.5)))
    await wait_ready(client.app)
    api = sdk(client)
    n = 200
    batch = await run_batch(api, jsonl([line(f"e{i}") for i in range(n)]))
    done = await wait_batch(api, batch.id, {"expired", "completed"}, timeout=30)
    assert done.status == "expired" and done.expired_at is not None
    completed = done.request_counts.completed
    assert completed < n
    errors = await file_lines(api, done.error_file_id)
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    out = await file_lines(api, done.output_file_id) if completed else []
    assert len(out) + len(errors) == n


async def test_create_validation_ownership_and_scope(gateway: Any) -> None:
    api = sdk(gateway)
    f = await api.files.create(file=("in.jsonl", jsonl([line("a")])), purpose="batch")
    bad = [
        ({"endpoint": "/v1/moderations"}, "endpoint"),
        ({"completion_window": "1h"}, "completion_window"),
        ({"priority": 10}, "priority"),
        ({"priority": True}, "priority"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"input_file_id": "file-doesnotexist"}, "input_file_id"),
        ({"input_file_id": None}, "input_file_id"),
    ]
    for change, param in bad:
        body = {"input_file_id": f.id, "endpoint": CHAT, "completion_window": "24h", **change}
        resp = await gateway.post("/v1/batches", json=body, headers=auth("batch"))
        assert resp.status in (400, 404), (change, resp.status)
        assert (await resp.json())["error"]["param"] == param, change

    # Another key's file is a 404; another key's batch too.
    other = sdk(gateway, "batch2")
    with pytest.raises(openai.NotFoundError):
        await other.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    batch = await api.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h",
                                     extra_body={"priority": 7})
    assert batch.model_extra is not None and batch.model_extra["priority"] == 7
    with pytest.raises(openai.NotFoundError):
        await other.batches.retrieve(batch.id)
    assert (await other.batches.list()).data == []
    done = await wait_batch(api, batch.id, {"completed"})
    # The jobs ran with the batch's priority.
    out = await file_lines(api, done.output_file_id)
    resp = await gateway.get(f"/v1/jobs/{out[0]['id']}", headers=auth("batch"))
    assert (await resp.json())["priority"] == 7
    # An output file cannot be the input of a batch.
    resp = await gateway.post("/v1/batches", json={"input_file_id": done.output_file_id, "endpoint": CHAT,
                                                   "completion_window": "24h"}, headers=auth("batch"))
    assert resp.status == 400 and "batch_output" in (await resp.json())["error"]["message"]
    # Scopes: the upload-only key cannot use the Batches API.
    for path in ("/v1/batches", f"/v1/batches/{batch.id}"):
        resp = await gateway.get(path, headers=auth("upload"))
        assert resp.status == 401 and (await resp.json())["error"]["code"] == "missing_scope"


@pytest.mark.usefixtures("redis_backend")  # on one Redis and on a Redis Cluster
async def test_list_pagination(gateway: Any) -> None:
    api = sdk(gateway)
    f = await api.files.create(file=("in.jsonl", jsonl([line("a")])), purpose="batch")
    ids = [(await api.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")).id
           for _ in range(3)]
    page = await api.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    rest = await api.batches.list(limit=2, after=page.data[-1].id)
    assert [b.id for b in rest.data] == [ids[0]] and not rest.has_more
    seen = [b.id async for b in api.batches.list(limit=1)]
    assert seen == ids[::-1]


@pytest.mark.usefixtures("redis_backend")  # on one Redis and on a Redis Cluster
async def test_input_file_of_an_active_batch_cannot_be_deleted(aiohttp_client: Any, make_settings: Any,
                                                               slow_sim: str) -> None:
    client = await aiohttp_client(create_app(make_settings(runtime_url=slow_sim, max_concurrent_batch=1)))
    await wait_ready(client.app)
    api = sdk(client, "all")  # batch and upload scopes: the file can be deleted through both APIs
    batch = await run_batch(api, jsonl([line(f"d{i}") for i in range(100)]))
    with pytest.raises(openai.ConflictError) as info:
        await api.files.delete(batch.input_file_id)
    # A permanent answer: the SDK is told not to retry it (it retries a bare 409).
    assert info.value.code == "file_in_use" and info.value.response.headers["x-should-retry"] == "false"
    # TUS termination of the same bytes is refused too.
    upload_url = "/v1/upload/" + batch.input_file_id.removeprefix("file-")
    resp = await client.delete(upload_url, headers={**auth("all"), "Tus-Resumable": "1.0.0"})
    assert resp.status == 409, await resp.text()
    assert resp.headers["Tus-Resumable"] == "1.0.0" and b"file_in_use" in await resp.read()
    await api.batches.cancel(batch.id)
    await wait_batch(api, batch.id, {"cancelled"})
    assert (await api.files.delete(batch.input_file_id)).deleted
    assert client.app[UPLOADS].get(batch.input_file_id.removeprefix("file-")) is None
    assert batch.input_file_id not in {f.id for f in (await api.files.list()).data}


async def test_read_lines_bounds_memory_and_numbers_lines(tmp_path: Any) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"a\n\n" + b"x" * 50 + b"\nb\r\n" + b"y" * 3000 + b"\nlast")
    got = [(r.number, r.data) async for r in read_lines(path, path.stat().st_size, max_line_bytes=40)]
    assert got == [(1, b"a"), (3, None), (4, b"b\r"), (5, None), (6, b"last")]


@pytest.mark.parametrize("read_size", [1, 2, 3, 7, 64, 256 * 1024])
async def test_read_lines_numbers_lines_across_block_boundaries(tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                                                read_size: int) -> None:
    import gateway.openai_batches.lines as lines_module

    monkeypatch.setattr(lines_module, "READ_SIZE", read_size)
    pieces = [b"", b"", b"a", b"", b" ", b"", b"", b"", b"bc" * 9, b"", b"\r", b"d", b"x" * 30, b"", b"", b"e"]
    data = b"\n".join(pieces * 3) + b"\n\n\nlast"
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(data)
    want = []
    for number, piece in enumerate(data.split(b"\n"), start=1):
        if len(piece) > 20:
            want.append((number, None))
        elif piece.strip():
            want.append((number, piece))
    got = [(r.number, r.data) async for r in read_lines(path, len(data), max_line_bytes=20)]
    assert got == want


async def test_read_lines_yields_to_the_loop_through_blank_lines(tmp_path: Any) -> None:
    """Blank lines are never handed to the consumer, so the reader itself must let the loop run."""
    path = tmp_path / "blank.jsonl"
    # Runs of empty lines are counted at C speed; lines of whitespace take a Python turn each.
    empty, spaces = 2 * 1024 * 1024, 1024 * 1024
    blank = empty + spaces
    path.write_bytes(b"\n" * empty + b" \n" * spaces + b'{"custom_id": "x"}\n' + b" \r\n" * 1000)
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    try:
        got = [(r.number, r.data) async for r in read_lines(path, path.stat().st_size, max_line_bytes=1024)]
    finally:
        done = True
        await task
    assert got == [(blank + 1, b'{"custom_id": "x"}')]
    # One yield per block only would give the ticker ~16 turns; one per YIELD_LINES lines gives ~500 more.
    assert ticks >= (spaces + 1000) // YIELD_LINES


async def test_sigkill_mid_batch_loses_no_line(tmp_path: Any, keys_file: Any, redis_prefix: str,
                                               slow_sim: str) -> None:
    """A gateway process killed with SIGKILL mid-batch: a new one finishes it, every line exactly once."""
    env = {**os.environ, "LISTEN_HOST": "127.0.0.1", "REDIS_URL": REDIS_URL, "REDIS_PREFIX": redis_prefix,
           "AUTH_KEYS_FILE": str(keys_file), "RUNTIME_BACKEND": "external", "RUNTIME_URL": slow_sim,
           "REALTIME_MODEL": REALTIME_MODEL, "UPLOAD_DIR": str(tmp_path / "uploads"), "MAX_CONCURRENT_BATCH": "4",
           "BATCH_MODELS": "*",
           "BATCH_LEASE_SECONDS": "1", "OPENAI_BATCH_ENQUEUE_CHUNK": "7", "LOG_LEVEL": "warning",
           "RUNTIME_FAILURE_DIR": str(tmp_path / "failures")}

    def serve() -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], cwd=tmp_path,
                                env={**env, "LISTEN_PORT": str(port)}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/ready", timeout=30, proc=proc)
        return proc, base

    proc, base = serve()
    try:
        n = 300
        api = sdk_at(base + "/v1", "batch")
        batch = await run_batch(api, jsonl([line(f"k{i}") for i in range(n)]))

        async def mid_way() -> bool:
            b = await api.batches.retrieve(batch.id)
            return b.request_counts is not None and 0 < b.request_counts.completed < n * 0.5

        await eventually(mid_way, timeout=30)
        proc.kill()
        proc.wait(10)

        proc, base = serve()
        api = sdk_at(base + "/v1", "batch")
        done = await wait_batch(api, batch.id, {"completed", "failed"}, timeout=90)
        assert done.status == "completed"
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (n, n, 0)
        out = await file_lines(api, done.output_file_id)
        assert sorted(o["custom_id"] for o in out) == sorted(f"k{i}" for i in range(n))
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.usefixtures("redis_backend")  # on one Redis and on a Redis Cluster
async def test_resume_in_finalizing_rewrites_the_files(gateway: Any, test_redis: RedisBackend) -> None:
    """A gateway that stopped after writing the files but before the final status writes them again, once."""
    from gateway.http.appkeys import BATCH_MANAGER

    api = sdk(gateway)
    batch = await run_batch(api, jsonl([line(f"f{i}") for i in range(5)] + ["not json"]))
    done = await wait_batch(api, batch.id, {"completed"})
    old_out, old_err = await file_lines(api, done.output_file_id), await file_lines(api, done.error_file_id)
    prefix = gateway.app[SETTINGS].redis_prefix
    r = test_redis.async_client()
    try:
        await r.hset(f"{prefix}{{batch}}:openai_batch:{batch.id}", "status", "finalizing")
        await r.sadd(f"{prefix}{{batch}}:openai_batches_active", batch.id)
    finally:
        await r.aclose()
    gateway.app[BATCH_MANAGER].wake(batch.id)

    async def rewritten() -> Any:
        b = await api.batches.retrieve(batch.id)
        return b if b.status == "completed" and b.output_file_id != done.output_file_id else None

    again = await eventually(rewritten)
    assert await file_lines(api, again.output_file_id) == old_out
    assert await file_lines(api, again.error_file_id) == old_err
    outputs = {f.id for f in (await api.files.list(purpose="batch_output")).data}
    assert outputs == {again.output_file_id, again.error_file_id}  # the first attempt's files were removed
    assert (again.request_counts.completed, again.request_counts.failed) == (5, 1)


async def test_job_cancelled_on_its_own_counts_as_failed(aiohttp_client: Any, make_settings: Any,
                                                         slow_sim: str) -> None:
    client = await aiohttp_client(create_app(make_settings(runtime_url=slow_sim, max_concurrent_batch=1)))
    await wait_ready(client.app)
    api = sdk(client)
    n = 30
    batch = await run_batch(api, jsonl([line(f"j{i}") for i in range(n)]))

    async def last_job() -> Any:
        resp = await client.get("/v1/jobs?status=queued&limit=100", headers=auth("batch"))
        jobs = (await resp.json())["data"]
        return next((j for j in jobs if j["metadata"].get("custom_id") == f"j{n - 1}"), None)

    job = await eventually(last_job)
    resp = await client.delete(f"/v1/jobs/{job['id']}", headers=auth("batch"))
    assert resp.status == 200
    done = await wait_batch(api, batch.id, {"completed"})
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (n, n - 1, 1)
    [error] = await file_lines(api, done.error_file_id)
    assert error["custom_id"] == f"j{n - 1}" and error["error"]["code"] == "job_cancelled"


@pytest.mark.usefixtures("redis_backend")  # on one Redis and on a Redis Cluster
async def test_resume_enqueue_after_the_last_committed_chunk(aiohttp_client: Any, make_settings: Any,
                                                            test_redis: RedisBackend) -> None:
    """The state a crash between two enqueue transactions leaves: the next gateway continues at the cursor."""
    n = 60
    rows: list[Any] = [line(f"q{i}") for i in range(n)]
    rows.insert(50, "not json")  # line 51: a bad line after the crash point
    rows.append(line("q3"))      # line 62: duplicates a custom_id from before the crash point
    parked = make_settings(batch_dispatcher_enabled=False, openai_batch_enqueue_chunk=10)
    first = await aiohttp_client(create_app(parked))
    api = sdk(first)
    batch = await run_batch(api, jsonl(rows))
    prefix = parked.redis_prefix
    r = test_redis.async_client()
    try:
        async def enqueued() -> bool:
            return await r.hget(f"{prefix}{{batch}}:openai_batch:{batch.id}", "enqueue_done") == b"1"

        await eventually(enqueued)
        await first.close()
        # Undo everything after line 40, as if the gateway died right after the chunk ending there.
        jobs_key = f"{prefix}{{batch}}:openai_batch_jobs:{batch.id}"
        ids = [x.decode() for x in await r.lrange(jobs_key, 0, -1)]
        assert len(ids) == n
        for job_id in ids[40:]:
            await r.delete(f"{prefix}{{batch}}:job:{job_id}")
            await r.zrem(f"{prefix}{{batch}}:ready:{REALTIME_MODEL}", job_id)
            await r.zrem(f"{prefix}{{batch}}:job_index:{KEY_IDS['batch']}", job_id)
        await r.ltrim(jobs_key, 0, 39)
        errors_key = f"{prefix}{{batch}}:openai_batch_errors:{batch.id}"
        assert await r.llen(errors_key) == 2
        await r.delete(errors_key)
        await r.hset(f"{prefix}{{batch}}:openai_batch:{batch.id}", mapping={"enqueued_line": "40", "invalid": "0"})
        await r.hdel(f"{prefix}{{batch}}:openai_batch:{batch.id}", "enqueue_done")
    finally:
        await r.aclose()

    second = await aiohttp_client(create_app(make_settings(openai_batch_enqueue_chunk=10)))
    await wait_ready(second.app)
    api = sdk(second)
    done = await wait_batch(api, batch.id, {"completed", "failed"})
    assert (done.status, done.request_counts.total, done.request_counts.completed,
            done.request_counts.failed) == ("completed", n + 2, n, 2)
    out = await file_lines(api, done.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(f"q{i}" for i in range(n))
    errors = await file_lines(api, done.error_file_id)
    assert sorted((e["error"]["line"], e["error"]["code"]) for e in errors) == [
        (51, "invalid_json"), (62, "duplicate_custom_id")]
