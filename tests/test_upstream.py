"""The realtime hot path's HTTP/1.1 client (gateway/upstream.py) against small raw servers: keep-alive
reuse, a stale idle connection, bodies with Content-Length and chunked, every failure kind, and (through
the gateway) reading from the runtime pausing while a client does not read."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from gateway.upstream import UpstreamError, UpstreamPool
from tests.conftest import REALTIME_MODEL, auth, wait_ready

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    return head + await reader.readexactly(length)


class RawServer:
    """A TCP server running `handler` per connection; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    p = UpstreamPool(limit=8, connect_timeout=2, read_timeout=1)
    yield p
    p.close()


async def test_content_length_bodies_reuse_one_connection(pool: UpstreamPool) -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            seen.append(await _read_request(reader))
            writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n'
                         b'{"ok": true}')
            await writer.drain()

    server = RawServer(handler)
    async with server as url:
        for i in range(3):
            exchange = await pool.request(url, "/v1/completions", b'{"n": %d}' % i, {"X-Request-ID": f"r{i}"},
                                          until="body")
            assert exchange.status == 200 and exchange.content_type == "application/json"
            assert await exchange.read() == b'{"ok": true}'
    assert server.connections == 1
    assert seen[2].startswith(b"POST /v1/completions HTTP/1.1\r\n")
    assert b"\r\nX-Request-ID: r2\r\n" in seen[2] and seen[2].endswith(b'\r\n\r\n{"n": 2}')


async def test_chunked_body_is_relayed_chunk_by_chunk(pool: UpstreamPool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(5):
            data = b"data: %d\n\n" % i
            writer.write(b"%x\r\n%b\r\n" % (len(data), data))
            await writer.drain()
            await asyncio.sleep(0.02)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with RawServer(handler) as url:
        exchange = await pool.request(url, "/v1/completions", b"{}", {})
        assert exchange.status == 200 and exchange.content_type == "text/event-stream"
        got: list[bytes] = []
        await exchange.relay(got.append)
    assert b"".join(got) == b"".join(b"data: %d\n\n" % i for i in range(5))
    assert len(got) >= 3  # relayed as it came, not at the end


async def test_idle_connection_closed_by_the_runtime_is_replaced(pool: UpstreamPool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        # Keep-alive is announced, but the server closes the connection right after (as an idle timeout does).
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    server = RawServer(handler)
    async with server as url:
        for _ in range(3):
            exchange = await pool.request(url, "/x", b"{}", {}, until="body")
            assert await exchange.read() == b"ok"
            await asyncio.sleep(0.05)  # the close reaches the pool first, or (raced) the retry covers it
    assert server.connections == 3


async def test_stale_connection_retry_when_the_close_is_not_seen_yet(pool: UpstreamPool) -> None:
    """The server drops the idle connection without the pool noticing before the next request is written:
    the request is sent again on a new connection, once."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read(1)  # the next request arrives: close without answering

    server = RawServer(handler)
    async with server as url:
        assert await (await pool.request(url, "/x", b"{}", {}, until="body")).read() == b"ok"
        assert await (await pool.request(url, "/x", b"{}", {}, until="body")).read() == b"ok"
    assert server.connections == 2


async def test_connection_refused_is_a_connection_error(pool: UpstreamPool) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(UpstreamError) as info:
        await pool.request(f"http://127.0.0.1:{port}", "/x", b"{}", {})
    assert info.value.kind == "connection" and "cannot connect" in str(info.value)


async def test_silent_runtime_is_a_timeout(pool: UpstreamPool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await asyncio.sleep(30)

    async with RawServer(handler) as url:
        started = asyncio.get_running_loop().time()
        with pytest.raises(UpstreamError) as info:
            await pool.request(url, "/x", b"{}", {}, until="body")
        assert info.value.kind == "timeout"
        assert asyncio.get_running_loop().time() - started < 5


@pytest.mark.parametrize("answer", [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial",
                                    b"NOT HTTP AT ALL\r\n\r\n",
                                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"])
async def test_broken_answers_are_connection_errors(pool: UpstreamPool, answer: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(answer)
        await writer.drain()

    async with RawServer(handler) as url:
        with pytest.raises(UpstreamError) as info:
            await pool.request(url, "/x", b"{}", {}, until="body")
        assert info.value.kind == "connection"


async def test_limit_bounds_requests_in_flight() -> None:
    pool = UpstreamPool(limit=2, connect_timeout=2, read_timeout=5)
    in_flight = peak = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal in_flight, peak
        while True:
            await _read_request(reader)
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.05)
            in_flight -= 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    try:
        async with RawServer(handler) as url:
            results = await asyncio.gather(*(pool.request(url, "/x", b"{}", {}, until="body") for _ in range(6)))
        assert [await r.read() for r in results] == [b"ok"] * 6
        assert peak == 2
    finally:
        pool.close()


@pytest.mark.slow
async def test_slow_client_pauses_reading_from_the_runtime(aiohttp_client: Any, make_settings: Any) -> None:
    """A client that stops reading a fast stream: the gateway stops reading from the runtime (it does not
    buffer the stream), and every event still arrives, in order, once the client reads again."""
    from gateway.bootstrap import create_app

    event_payload = b"x" * (256 * 1024)
    total_events = 200  # 50 MiB in all
    written = 0

    async def completions(request: web.Request) -> web.StreamResponse:
        nonlocal written
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(total_events):
            await resp.write(b'data: {"i": %d, "p": "%b"}\n\n' % (i, event_payload))
            written += 1
        await resp.write(b'data: {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}\n\n'
                         b"data: [DONE]\n\n")
        return resp

    runtime = web.Application()
    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": REALTIME_MODEL}]})

    runtime.router.add_get("/health", health)
    runtime.router.add_get("/v1/models", models)
    runtime.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(runtime)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        client = await aiohttp_client(create_app(make_settings(runtime_url=f"http://127.0.0.1:{port}")))
        await wait_ready(client.app)
        resp = await client.post("/v1/completions", headers=auth("realtime"),
                                 json={"model": REALTIME_MODEL, "prompt": "x", "stream": True})
        assert resp.status == 200
        await asyncio.sleep(2)  # the client reads nothing for 2 s
        stalled_at = written
        # Socket buffers on loopback hold several MiB; without flow control the runtime would be done by now.
        assert stalled_at * len(event_payload) < 32 * 1024 * 1024, stalled_at
        body = await resp.read()
        events = [e for e in body.split(b"\n\n") if e]
        assert len(events) == total_events + 1 and events[-1] == b"data: [DONE]"
        assert all(e.startswith(b'data: {"i": %d,' % i) for i, e in enumerate(events[:-1]))
    finally:
        await runner.cleanup()


async def test_idle_connections_are_closed_after_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway import upstream

    monkeypatch.setattr(upstream, "IDLE_REUSE_SECONDS", 0.2)
    pool = UpstreamPool(limit=8, connect_timeout=2, read_timeout=5)
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read(1)  # b"" once the pool closes the idle connection
        closed.set()

    try:
        async with RawServer(handler) as url:
            await pool.request(url, "/x", b"{}", {}, until="body")
            await asyncio.wait_for(closed.wait(), 5)
        assert pool.idle_connections == 0
    finally:
        pool.close()
