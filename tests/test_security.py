"""Hostile input: secrets in logs and Redis, path traversal, header injection, oversize, slow clients and
hostile upstreams. The scope matrix is tests/test_scopes.py; cookie flags and CSRF are tests/test_dashboard.py."""

from __future__ import annotations

import asyncio
import base64
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aredis
from aiohttp import web

from gateway.http.appkeys import SETTINGS
from gateway.http.realtime import SSE_EVENT_MAX
from tests.conftest import REALTIME_MODEL, REDIS_URL, TOKENS, auth, wait_ready
from tests.liveproc import gateway_env, start_gateway, stop_gateway

BAD_TOKEN = "sk-not-a-real-key-but-secret-7f3a"
TRAVERSALS = ["..%2F..%2Fetc%2Fpasswd", "..%2F..%2F..%2F..%2Fetc%2Fpasswd", "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
              "....%2F%2F....%2F%2Fetc%2Fpasswd", "%252E%252E%252Fetc%252Fpasswd", "..%5C..%5Cetc%5Cpasswd",
              "foo%00bar", "file-..%2F..%2Fauth.keys.json"]


async def _raw(host: str, port: int, data: bytes, *, read_timeout: float = 10.0, one_response: bool = False) -> bytes:
    """Send raw bytes on a fresh connection; return all that comes back until the server closes (or timeout),
    or, with `one_response`, as soon as one whole response (head + Content-Length body) has arrived."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        chunks = []
        try:
            async with asyncio.timeout(read_timeout):
                while piece := await reader.read(65536):
                    chunks.append(piece)
                    data = b"".join(chunks)
                    if one_response and b"\r\n\r\n" in data:
                        head, body = data.split(b"\r\n\r\n", 1)
                        length = re.search(rb"(?im)^content-length: *(\d+)", head)
                        if length and len(body) >= int(length.group(1)):
                            break
        except TimeoutError:
            pass
        return b"".join(chunks)
    finally:
        writer.close()


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.") else 0


# --- secrets never logged, never stored
async def _traffic(base: str) -> None:
    """Requests on every route family, with good, wrong-scope and unknown tokens, successes and errors."""
    bearer = {name: {"Authorization": f"Bearer {token}"} for name, token in TOKENS.items()}
    bad = {"Authorization": f"Bearer {BAD_TOKEN}"}
    async with aiohttp.ClientSession(base) as http:
        async def go(method: str, path: str, headers: dict[str, str], **kw: Any) -> None:
            async with http.request(method, path, headers=headers, **kw) as resp:
                await resp.read()

        body = {"model": REALTIME_MODEL, "prompt": "hi", "max_tokens": 3}
        chat = {"model": REALTIME_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        for headers in (bearer["realtime"], bearer["batch"], bad, {}):
            await go("POST", "/v1/completions", headers, json=body)
            await go("POST", "/v1/chat/completions", headers, json={**chat, "stream": True})
            await go("GET", "/v1/models", headers)
            await go("POST", "/v1/batch/completions", headers, json=body)
            await go("GET", "/v1/jobs", headers)
            await go("GET", "/eval/runs", headers)
            await go("GET", "/v1/files", headers)
            await go("GET", "/v1/batches", headers)
            await go("GET", "/monitor/overview", headers)
            await go("GET", "/metrics", headers)
            await go("GET", "/dashboard/keys", headers)
        await go("POST", "/v1/batch/completions", bearer["batch"], json={**body, "metadata": {"k": "v"}})
        await go("POST", "/v1/batch/chat/completions", bearer["batch"], json=chat)
        await go("POST", "/v1/completions", bearer["realtime"], json={**body, "model": TOKENS["all"]})
        await go("POST", "/v1/completions", bearer["realtime"], data=b"{not json " + TOKENS["batch"].encode())
        await go("GET", "/eval/evals", bearer["eval"])
        await go("POST", "/eval/runs", bearer["eval"], json={"harness": "eval-repo", "eval": "nope"})
        tus = {**bearer["upload"], "Tus-Resumable": "1.0.0", "Upload-Length": "5",
               "Upload-Metadata": "filename " + base64.b64encode(b"a.jsonl").decode()}
        async with http.post("/v1/upload", headers=tus) as resp:
            location = resp.headers["Location"]
        await go("PATCH", location, {**bearer["upload"], "Tus-Resumable": "1.0.0", "Upload-Offset": "0",
                                     "Content-Type": "application/offset+octet-stream"}, data=b"hello")
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", b'{"custom_id":"a","method":"POST","url":"/v1/completions","body":{}}\n',
                       filename="in.jsonl")
        await go("POST", "/v1/files", bearer["batch"], data=form)
        await go("POST", "/dashboard/login", {}, data={"token": BAD_TOKEN})
        await go("POST", "/dashboard/login", {}, data={"token": TOKENS["monitor"]})
        await go("GET", "/monitor/keys", bearer["monitor"])
        await go("GET", "/v1/jobs/" + TOKENS["batch"], bearer["batch"])
    # Malformed requests: aiohttp's parser error quotes the offending header line, token included.
    host, port = base.removeprefix("http://").split(":")
    for bad_line in (b"Authorization: Bearer " + TOKENS["realtime"].encode() + b"\x00",
                     b"Authorization: Bearer " + TOKENS["monitor"].encode() + b"\nX-Evil: 1"):
        await _raw(host, int(port), b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + bad_line + b"\r\n\r\n",
                   read_timeout=3)


async def _redis_dump(prefix: str) -> bytes:
    """Every key name and value under the prefix, as one blob."""
    r = aredis.Redis.from_url(REDIS_URL)
    out: list[bytes] = []
    try:
        async for key in r.scan_iter(match=f"{prefix}*", count=1000):
            out.append(key)
            kind = (await r.type(key)).decode()
            if kind == "string":
                out.append(await r.get(key) or b"")
            elif kind == "hash":
                out += [b for kv in (await r.hgetall(key)).items() for b in kv]
            elif kind == "list":
                out += await r.lrange(key, 0, -1)
            elif kind == "set":
                out += list(await r.smembers(key))
            elif kind == "zset":
                out += [m for m, _ in await r.zrange(key, 0, -1, withscores=True)]
            elif kind == "stream":
                out += [b for _, e in await r.xrange(key) for kv in e.items() for b in kv]
    finally:
        await r.aclose()
    return b"\n".join(out)


async def test_tokens_never_in_logs_or_redis(tmp_path: Path, sim_url: str, redis_prefix: str, keys_file: Path) -> None:
    env = gateway_env(tmp_path, redis_prefix, keys_file, sim_url, LOG_LEVEL="debug")
    proc, base, log_path = start_gateway(tmp_path, "secrets", env)
    try:
        await _traffic(base)
        await asyncio.sleep(0.5)  # usage flush
        dump = await _redis_dump(redis_prefix)
    finally:
        assert stop_gateway(proc) == 0
    log = log_path.read_bytes()
    assert len(log) > 1000 and b'"request_id"' in log  # debug JSON logs were really written
    assert b"k-batch" in dump  # usage and jobs were really stored, by key id
    for secret in [*TOKENS.values(), BAD_TOKEN]:
        assert secret.encode() not in log, f"token {secret[:8]}... appears in the log"
        assert secret.encode() not in dump, f"token {secret[:8]}... appears in Redis"


# --- path traversal and injection on ids
async def test_path_traversal_on_every_id(gateway: Any, tmp_path: Path) -> None:
    (tmp_path / "runtime_failures").mkdir(exist_ok=True)
    routes = [("GET", "/v1/jobs/{}", "batch"), ("DELETE", "/v1/jobs/{}", "batch"),
              ("GET", "/v1/files/{}", "batch"), ("GET", "/v1/files/{}/content", "batch"),
              ("DELETE", "/v1/files/{}", "batch"), ("GET", "/v1/batches/{}", "batch"),
              ("GET", "/eval/runs/{}", "eval"), ("POST", "/eval/runs/{}/cancel", "eval"),
              ("HEAD", "/v1/upload/{}", "upload"), ("PATCH", "/v1/upload/{}", "upload"),
              ("DELETE", "/v1/upload/{}", "upload"), ("GET", "/monitor/jobs/{}", "monitor"),
              ("GET", "/monitor/runtime/crash_logs/{}", "monitor"),
              ("GET", "/dashboard/runtime/crash_logs/{}", "monitor"), ("GET", "/dashboard/static/{}", "monitor")]
    for method, template, role in routes:
        for evil in TRAVERSALS:
            path = template.format(evil)
            headers = {**auth(role), "Tus-Resumable": "1.0.0", "Upload-Offset": "0",
                       "Content-Type": "application/offset+octet-stream"}
            resp = await gateway.request(method, path, headers=headers, data=b"x" if method == "PATCH" else None,
                                         allow_redirects=False)
            body = await resp.read()
            assert 400 <= resp.status < 500, f"{method} {path}: {resp.status} {body[:200]!r}"
            assert b"root:" not in body and TOKENS["all"].encode() not in body, f"{method} {path} leaked a file"
    # Nothing was created outside the upload directory by the PATCH/DELETE attempts.
    assert not (tmp_path.parent / "passwd").exists()


async def test_header_injection_is_refused_or_neutralised(gateway: Any) -> None:
    host, port = gateway.server.host, gateway.server.port
    token = TOKENS["all"]
    # A valid-looking id is echoed; anything else is replaced by a fresh one (never reflected).
    resp = await gateway.get("/health", headers={"X-Request-ID": "abc<script>"})
    assert resp.headers["X-Request-ID"] != "abc<script>" and len(resp.headers["X-Request-ID"]) == 32
    for evil in (b"abc\r\nSet-Cookie: pwned=1", b"abc\nSet-Cookie: pwned=1", b"abc\rSet-Cookie: pwned=1",
                 b"abc\x00def"):
        raw = await _raw(host, port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Request-ID: " + evil +
                         b"\r\nConnection: close\r\n\r\n", read_timeout=5)
        lines = raw.split(b"\r\n\r\n", 1)[0].lower().split(b"\r\n")
        assert _status(raw) in (200, 400), raw[:300]
        assert not any(line.startswith(b"set-cookie") for line in lines), lines
        # Either refused, or the id echoed is a clean token (the CR/LF never reaches the response head).
        assert all(re.fullmatch(rb"x-request-id: [a-z0-9._:-]{1,64}", line)
                   for line in lines if line.startswith(b"x-request-id")), lines
    # Upload metadata with newlines cannot smuggle a header into the HEAD answer (base64 values only).
    resp = await gateway.post("/v1/upload", headers={"Authorization": f"Bearer {token}", "Tus-Resumable": "1.0.0",
                                                     "Upload-Length": "3", "Upload-Metadata": "filename a%0D%0Ab"})
    assert resp.status == 400
    raw = await _raw(host, port, b"POST /v1/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token.encode() +
                     b"\r\nTus-Resumable: 1.0.0\r\nUpload-Length: 3\r\nUpload-Metadata: filename YQ==\nX-Evil: 1"
                     b"\r\nConnection: close\r\n\r\n", read_timeout=5)
    assert _status(raw) in (201, 400), raw[:300]
    assert b"x-evil" not in raw.split(b"\r\n\r\n", 1)[0].lower()


async def test_oversized_headers_bodies_and_urls_get_4xx(gateway: Any) -> None:
    host, port = gateway.server.host, gateway.server.port
    big = b"a" * 20000
    many = b"".join(b"X-H%d: 1\r\n" % i for i in range(500))
    for request in (b"GET /health?" + big + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + big + b"\r\n\r\n",
                    b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n",
                    b"GET /health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + big + b"\r\n\r\n"):
        raw = await _raw(host, port, request, read_timeout=5)
        assert 400 <= _status(raw) < 500, raw[:300]
    limit = gateway.app[SETTINGS].max_body_bytes
    for path, role in (("/v1/completions", "realtime"), ("/v1/batch/completions", "batch"), ("/eval/runs", "eval"),
                       ("/v1/batches", "batch"), ("/dashboard/login", "monitor")):
        resp = await gateway.post(path, data=b"{" + b" " * (limit + 10) + b"}",
                                  headers={**auth(role), "Content-Type": "application/json"})
        assert resp.status == 413, (path, resp.status)
        assert (await resp.json())["error"]["code"] == "request_too_large"
    # A body bigger than the limit announced by chunks (no Content-Length) is cut the same way.
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(limit // 65536 + 4):
            yield b" " * 65536

    resp = await gateway.post("/v1/completions", data=chunks(), headers={**auth("realtime"),
                                                                          "Content-Type": "application/json"})
    assert resp.status == 413


# --- slow clients
@pytest.mark.slow
async def test_slow_clients_are_cut_off(tmp_path: Path, sim_url: str, redis_prefix: str, keys_file: Path) -> None:
    env = gateway_env(tmp_path, redis_prefix, keys_file, sim_url, CLIENT_HEADER_TIMEOUT="1",
                      CLIENT_BODY_TIMEOUT="1")
    proc, base, _ = start_gateway(tmp_path, "slow", env)
    host, port = "127.0.0.1", int(base.rsplit(":", 1)[1])
    token = TOKENS["all"].encode()
    try:
        # Headers trickled one byte at a time, never finished: the connection is closed.
        reader, writer = await asyncio.open_connection(host, port)
        started = time.monotonic()
        closed = False
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
            writer.write(bytes([byte]))
            try:
                await writer.drain()
                got = await asyncio.wait_for(reader.read(1024), timeout=0.1)
            except (TimeoutError, ConnectionError):
                if time.monotonic() - started > 30:
                    break
                continue
            if got == b"" or got.startswith(b"HTTP/1.1 4"):
                closed = True
                break
        writer.close()
        assert closed, "a client trickling its headers was never cut off"

        # A JSON body that stops halfway: 408 and the connection closed.
        raw = await _raw(host, port, b"POST /v1/batch/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
                         token + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":",
                         read_timeout=30, one_response=True)
        assert _status(raw) == 408, raw[:300]
        assert b"body_timeout" in raw and b"\r\nconnection: close\r\n" in raw.lower()

        # A multipart file that stalls mid-part: 408, and no file is left behind.
        boundary = b"xyzBOUNDARY"
        raw = await _raw(host, port, b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token +
                         b"\r\nContent-Type: multipart/form-data; boundary=" + boundary +
                         b"\r\nContent-Length: 100000\r\n\r\n--" + boundary +
                         b'\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n{"custom_id":',
                         read_timeout=30, one_response=True)
        assert _status(raw) == 408 and b"body_timeout" in raw, raw[:300]
        assert b"\r\nconnection: close\r\n" in raw.lower()
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/v1/files", headers={"Authorization": f"Bearer {TOKENS['all']}"}) as r:
                assert (await r.json())["data"] == []

        # An upload PATCH that stalls: the bytes received are kept, the offset says so, the slot is freed.
        async with aiohttp.ClientSession() as http:
            create = {"Authorization": f"Bearer {TOKENS['all']}", "Tus-Resumable": "1.0.0", "Upload-Length": "100"}
            async with http.post(base + "/v1/upload", headers=create) as r:
                assert r.status == 201
                location = r.headers["Location"]
            path = location if location.startswith("/") else "/" + location.split("/", 3)[3]
            raw = await _raw(host, port, b"PATCH " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                             + token + b"\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\nContent-Type: "
                             b"application/offset+octet-stream\r\nContent-Length: 100\r\n\r\n" + b"z" * 10,
                             read_timeout=30, one_response=True)
            assert _status(raw) == 400 and b"incomplete_body" in raw, raw[:300]

            async def offset() -> str | None:
                async with http.head(base + path, headers={"Authorization": f"Bearer {TOKENS['all']}",
                                                           "Tus-Resumable": "1.0.0"}) as r:
                    return r.headers.get("Upload-Offset") if r.status == 200 else None

            for _ in range(100):
                if await offset() == "10":
                    break
                await asyncio.sleep(0.1)
            assert await offset() == "10"
    finally:
        assert stop_gateway(proc) == 0


# --- hostile upstreams
class HostileRuntime:
    """A tiny raw runtime: healthy, lists the model, and streams what the test asks for."""

    def __init__(self) -> None:
        self.mode = "huge"
        self.stream_closed = asyncio.Event()
        self.sent = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/health":
            return web.Response(text="ok")
        if request.path == "/v1/models":
            return web.json_response({"object": "list", "data": [{"id": REALTIME_MODEL, "object": "model"}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            if self.mode == "huge":
                await resp.write(b"data: {\"choices\":[{\"text\":\"")
                while self.sent < 20 * SSE_EVENT_MAX:  # one event that never ends, far past the bound
                    await resp.write(b"x" * 65536)
                    self.sent += 65536
                    await asyncio.sleep(0)
            else:  # never ends: a well-formed event every 50 ms, forever
                while True:
                    await resp.write(b'data: {"choices":[{"text":"x","index":0}]}\n\n')
                    await asyncio.sleep(0.05)
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            self.stream_closed.set()
        return resp


@pytest.fixture
async def hostile(aiohttp_server: Any) -> tuple[HostileRuntime, str]:
    runtime = HostileRuntime()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", runtime.handle)
    server = await aiohttp_server(app)
    return runtime, str(server.make_url("")).rstrip("/")


async def test_upstream_enormous_sse_line_fails_cleanly(aiohttp_client: Any, make_settings: Any,
                                                         hostile: tuple[HostileRuntime, str]) -> None:
    from gateway.bootstrap import create_app

    runtime, url = hostile
    client = await aiohttp_client(create_app(make_settings(runtime_url=url)))
    await wait_ready(client.app)
    resp = await client.post("/v1/completions", headers=auth("realtime"),
                             json={"model": REALTIME_MODEL, "prompt": "x", "stream": True})
    assert resp.status == 200
    body = await resp.read()
    assert len(body) < 64 * 1024  # the giant event was not relayed or held: a short error event instead
    assert b"upstream_stream_broken" in body and body.endswith(b"data: [DONE]\n\n")
    await asyncio.wait_for(runtime.stream_closed.wait(), 10)
    assert runtime.sent < 20 * SSE_EVENT_MAX  # the gateway hung up instead of reading it all


async def test_upstream_never_ending_stream_is_closed_when_client_leaves(
        aiohttp_client: Any, make_settings: Any, hostile: tuple[HostileRuntime, str]) -> None:
    from gateway.bootstrap import create_app

    runtime, url = hostile
    runtime.mode = "forever"
    client = await aiohttp_client(create_app(make_settings(runtime_url=url)))
    await wait_ready(client.app)
    resp = await client.post("/v1/completions", headers=auth("realtime"),
                             json={"model": REALTIME_MODEL, "prompt": "x", "stream": True})
    assert resp.status == 200
    for _ in range(3):
        assert (await resp.content.readuntil(b"\n\n")).startswith(b"data: ")
    resp.close()  # the client disconnects mid-stream
    await asyncio.wait_for(runtime.stream_closed.wait(), 15)
