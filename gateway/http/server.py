"""The runner `llm-gateway serve` uses: aiohttp's, except for the answer to a request it cannot parse.

aiohttp answers a malformed request line or header itself, before any route or middleware, with a text
body quoting the offending bytes (a bearer token, say) and a Server header naming its version. Here that
answer is an OpenAI-shaped JSON error that quotes nothing, and the connection is closed as before.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.web_log import AccessLogger
from aiohttp.web_protocol import RequestHandler

from gateway.http.errors import error_response

SERVER_NAME = "llm-gateway"

_MESSAGES = {
    400: "The request is malformed (its request line or a header cannot be parsed); it was not read further.",
    413: "The request head is too large.",
    431: "The request's header fields are too large.",
    500: "Internal error.",
    504: "The request took too long.",
}


class _QuietRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering parse errors without echoing the request."""

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's handling (logging, no answer once one has started), with a body that quotes nothing."""
        super().handle_error(request, status, exc, None)  # logs; raises when a response was already sent
        response = error_response(status, _MESSAGES.get(status, "The request cannot be served."),
                                  type="server_error" if status >= 500 else "invalid_request_error",
                                  code="malformed_request" if status < 500 else "internal_error",
                                  headers={"Server": SERVER_NAME})
        response.force_close()
        return response


class _QuietServer(web.Server):
    def __init__(self, handler: Any, *, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any) -> None:
        handler_kwargs = {k: v for k, v in kwargs.items() if k not in ("request_factory", "handler_cancellation")}
        super().__init__(handler, loop=loop, **kwargs)
        self.handler_kwargs = handler_kwargs
        self.handler_loop = loop or asyncio.get_running_loop()

    def __call__(self) -> RequestHandler:
        return _QuietRequestHandler(self, loop=self.handler_loop, **self.handler_kwargs)


class GatewayRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer unparseable requests with a JSON error quoting nothing."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.server_kwargs = {"access_log_class": AccessLogger,
                              **{k: v for k, v in kwargs.items() if k not in ("handle_signals", "shutdown_timeout")}}

    async def _make_server(self) -> web.Server:
        built = await super()._make_server()  # starts the app (on_startup, cleanup contexts)
        return _QuietServer(built.request_handler, request_factory=built.request_factory, **self.server_kwargs)
