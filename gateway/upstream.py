"""A lean HTTP/1.1 client for the realtime hot path: pooled keep-alive connections to the runtime.

aiohttp's client costs about as much CPU per request as everything else the gateway does, and it hands a
streamed body to a task chunk by chunk. The realtime proxy needs far less: POST a JSON body, read a status,
a content type and a body, or relay a streamed body as it arrives. Here each connection is an asyncio
`Protocol` with httptools' (llhttp) response parser; a request is one `write`, a non-streamed answer wakes
the handler once, and a streamed body is handed to a *sink* called straight from `data_received`, so the
SSE relay writes each chunk to the client without a task switch.

Failures come out as `UpstreamError` with a kind: "connection" (connect failed, connection lost, bad
HTTP) or "timeout" (no byte for UPSTREAM_READ_TIMEOUT seconds, or no connection within
UPSTREAM_CONNECT_TIMEOUT). A request that fails on a reused keep-alive connection before any byte of the
answer came back is sent once more on a new connection: the runtime closed the idle connection (uvicorn
does after 5 s) and never read the request.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

import httptools

# Reuse a keep-alive connection only if it was idle for less than this: uvicorn (vLLM, SGLang) closes idle
# connections after 5 s, and a request written as the server closes is lost.
IDLE_REUSE_SECONDS = 4.0


class UpstreamError(Exception):
    """The runtime could not be reached, broke the connection, sent bad HTTP or went silent."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind  # "connection" or "timeout"


Sink = Callable[[bytes], None]


class Exchange:
    """One request and its answer on one connection."""

    __slots__ = ("status", "content_type", "received", "complete", "_conn", "_headers", "_done", "_parts",
                 "_sink", "_timer", "_last", "_loop", "_timeout", "_released", "_failed")

    def __init__(self, conn: _Connection, loop: asyncio.AbstractEventLoop, read_timeout: float) -> None:
        self.status = 0
        self.content_type = ""
        self.received = False  # any byte of the answer arrived
        self.complete = False
        self._conn = conn
        self._loop = loop
        self._headers: asyncio.Future[None] = loop.create_future()
        self._done: asyncio.Future[None] = loop.create_future()
        self._parts: list[bytes] = []
        self._sink: Sink | None = None
        self._timeout = read_timeout
        self._last = loop.time()
        self._timer: asyncio.TimerHandle | None = loop.call_later(read_timeout, self._check_timeout)
        self._released = False
        self._failed = False

    # --- used by the proxy ---

    async def read(self) -> bytes:
        """The whole body (waits for its end)."""
        await self._wait(self._done)
        return b"".join(self._parts)

    async def relay(self, sink: Sink) -> None:
        """Hand every body chunk to `sink` (first what came already) until the body ends; raises
        UpstreamError if it does not end well, or what `sink` raised."""
        parts, self._parts = self._parts, []
        for part in parts:
            sink(part)
        self._sink = sink
        await self._wait(self._done)

    async def _wait(self, future: asyncio.Future[None]) -> None:
        try:
            await future
        except asyncio.CancelledError:  # the handler was cancelled (the client left): drop the request
            self.abort()
            raise

    def pause(self) -> None:
        """Stop reading from the runtime (the client is slower than the runtime)."""
        transport = self._conn.transport
        if transport is not None and not self.complete:
            transport.pause_reading()

    def resume(self) -> None:
        """Read from the runtime again."""
        transport = self._conn.transport
        if transport is not None and not self.complete:
            transport.resume_reading()

    def abort(self) -> None:
        """Give up on the answer: the connection is closed, which makes the runtime abort the request."""
        if not self.complete:
            self._fail(UpstreamError("connection", "aborted by the gateway"))

    @property
    def done(self) -> bool:
        """The body ended or the exchange failed."""
        return self._done.done()

    # --- called by the connection ---

    def _data(self) -> None:
        self.received = True
        self._last = self._loop.time()

    def _headers_complete(self, status: int) -> None:
        self.status = status
        if not self._headers.done():
            self._headers.set_result(None)

    def _body(self, data: bytes) -> None:
        sink = self._sink
        if sink is None:
            self._parts.append(data)
            return
        try:
            sink(data)
        except Exception as exc:  # the sink refused the data (e.g. an endless SSE event)
            self._fail(exc)

    def _complete(self) -> None:
        self.complete = True
        self._finish()
        if not self._headers.done():
            self._headers.set_result(None)
        if not self._done.done():
            self._done.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self.complete or self._failed:
            return
        self._failed = True
        self._finish()
        for future in (self._headers, self._done):
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: nobody may be waiting on it any more
        self._conn.close()

    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._sink = None
        if not self._released:
            self._released = True
            self._conn.pool._slots.release()

    def _check_timeout(self) -> None:
        idle = self._loop.time() - self._last
        if idle >= self._timeout:
            self._timer = None
            self._fail(UpstreamError("timeout", f"the runtime sent nothing for {self._timeout:g} s"))
        else:
            self._timer = self._loop.call_later(self._timeout - idle, self._check_timeout)


class _Connection(asyncio.Protocol):
    """One keep-alive connection to the runtime; runs one exchange at a time."""

    def __init__(self, pool: UpstreamPool, key: str) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.closed = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # bytes nobody asked for: the connection cannot be trusted any more
            self.close()
            return
        exchange._data()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            exchange._fail(UpstreamError("connection", f"the runtime sent malformed HTTP: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        # An answer delimited by the end of the connection (neither Content-Length nor chunked) is not
        # supported: vLLM, SGLang (uvicorn) and the simulator always send one or the other.
        self.closed = True
        self.transport = None
        exchange, self.exchange = self.exchange, None
        if exchange is not None and not exchange.complete:
            reason = f"{exc.__class__.__name__}: {exc}" if exc else "the runtime closed the connection"
            exchange._fail(UpstreamError("connection", reason))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # --- httptools callbacks ---

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type" and self.exchange is not None:
            self.exchange.content_type = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self.exchange is not None:
            self.exchange._headers_complete(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self.exchange._body(body)

    def on_message_complete(self) -> None:
        exchange, self.exchange = self.exchange, None
        keep = self.parser.should_keep_alive()
        if exchange is not None:
            exchange._complete()
        if keep and not self.closed:
            self.pool._release(self)
        else:
            self.close()


class UpstreamPool:
    """Keep-alive connections to runtimes, keyed by base URL, at most `limit` requests at once."""

    def __init__(self, *, limit: int, connect_timeout: float, read_timeout: float, max_idle: int = 64) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        """Idle connections kept per runtime (the batch path keeps one per slot)."""
        self._slots = asyncio.Semaphore(limit)
        self._idle: dict[str, list[_Connection]] = {}
        self._targets: dict[str, tuple[str, int, ssl.SSLContext | None, bytes]] = {}
        self._closed = False
        self._sweeper: asyncio.TimerHandle | None = None

    async def request(self, base_url: str, path: str, body: bytes, headers: dict[str, str],
                      *, until: str = "headers", method: bytes = b"POST") -> Exchange:
        """POST (or `method`) `body` to base_url + path; return once the status is known
        (`until="headers"`) or the whole body has arrived (`until="body"`)."""
        if self._closed:
            raise UpstreamError("connection", "the gateway is shutting down")
        host, port, tls, host_header = self._target(base_url)
        head = [method, b" ", path.encode(), b" HTTP/1.1\r\nHost: ", host_header,
                b"\r\nContent-Length: ", str(len(body)).encode(), b"\r\n"]
        for name, value in headers.items():
            head += [name.encode(), b": ", value.encode(), b"\r\n"]
        head.append(b"\r\n")
        message = b"".join(head) + body
        loop = asyncio.get_running_loop()
        for attempt in (1, 2):
            await self._slots.acquire()
            try:
                conn = self._idle_connection(base_url, loop) if attempt == 1 else None
                reused = conn is not None
                if conn is None:
                    conn = await self._connect(base_url, host, port, tls)
            except BaseException:
                self._slots.release()
                raise
            exchange = Exchange(conn, loop, self.read_timeout)  # it releases the slot when it ends
            conn.exchange = exchange
            conn.transport.write(message)  # type: ignore[union-attr]
            try:
                await exchange._wait(exchange._headers if until == "headers" else exchange._done)
            except UpstreamError as exc:
                if reused and attempt == 1 and exc.kind == "connection" and not exchange.received:
                    continue
                raise
            return exchange
        raise AssertionError("unreachable")

    @property
    def idle_connections(self) -> int:
        """Keep-alive connections waiting to be reused, over every runtime."""
        return sum(len(conns) for conns in self._idle.values())

    def close(self) -> None:
        """Close every idle connection; later requests fail."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    def _target(self, base_url: str) -> tuple[str, int, ssl.SSLContext | None, bytes]:
        target = self._targets.get(base_url)
        if target is None:
            url = urlsplit(base_url)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise UpstreamError("connection", f"unsupported runtime URL {base_url!r}")
            tls = ssl.create_default_context() if url.scheme == "https" else None
            port = url.port or (443 if tls else 80)
            target = self._targets[base_url] = (url.hostname, port, tls, url.netloc.encode("idna"))
        return target

    def _idle_connection(self, key: str, loop: asyncio.AbstractEventLoop) -> _Connection | None:
        conns = self._idle.get(key)
        if conns is None:
            return None
        oldest = loop.time() - IDLE_REUSE_SECONDS
        while conns:
            conn = conns.pop()
            if not conn.closed and conn.transport is not None and conn.idle_since > oldest:
                return conn
            conn.close()
        del self._idle[key]  # runtimes come back on new ports: drop what served an old one
        return None

    def _release(self, conn: _Connection) -> None:
        if self._closed:
            conn.close()
            return
        loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        conns = self._idle.setdefault(conn.key, [])
        conns.append(conn)
        if len(conns) > self.max_idle:  # connections beyond what the load needs now are closed, oldest first
            conns.pop(0).close()
        if self._sweeper is None:
            self._sweeper = loop.call_later(IDLE_REUSE_SECONDS, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle too long to be reused (they would hold the runtime's sockets)."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        oldest = loop.time() - IDLE_REUSE_SECONDS
        for key in list(self._idle):
            keep = [conn for conn in self._idle[key] if not conn.closed]
            for conn in keep:
                if conn.idle_since <= oldest:
                    conn.close()
            keep = [conn for conn in keep if not conn.closed]
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if self._idle:
            self._sweeper = loop.call_later(IDLE_REUSE_SECONDS / 2, self._sweep)

    async def _connect(self, key: str, host: str, port: int, tls: ssl.SSLContext | None) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(lambda: _Connection(self, key), host, port, ssl=tls,
                                                       server_hostname=host if tls else None)
        except TimeoutError:
            raise UpstreamError("timeout", f"no connection to {host}:{port} within "
                                f"{self.connect_timeout:g} s (UPSTREAM_CONNECT_TIMEOUT)") from None
        except OSError as exc:
            raise UpstreamError("connection", f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
        return conn
