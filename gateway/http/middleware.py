"""Middleware: request id + metrics + error shaping (outermost), then the scope check."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from redis.exceptions import RedisError

from gateway import metrics
from gateway.errors import ApiError, DomainError
from gateway.http import session
from gateway.http.appkeys import API_KEY, KEYRING, REQUEST_ID, SETTINGS
from gateway.http.errors import domain_error_response, error_response
from gateway.keys import Scope

log = structlog.get_logger(component="http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_MISSING = object()

# Bodies that handlers stream piece by piece (uploads, multipart files) are not read ahead here.
_STREAMED_BODIES = ("multipart/", "application/offset+octet-stream")

_STATUS_TEXT = {
    404: ("not_found", "No route matches {method} {path}."),
    405: ("method_not_allowed", "{method} is not allowed on {path}."),
    413: ("request_too_large", "The request body is larger than the limit of {limit} bytes (MAX_BODY_BYTES)."),
}


def route_label(request: web.Request) -> str:
    """The route template (bounded label set); 'unmatched' for 404s."""
    info = request.match_info
    if info.http_exception is not None or info.route.resource is None:
        return "unmatched"
    return info.route.resource.canonical


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind a request id, time the request, and turn every error into an OpenAI-shaped response."""
    incoming = request.headers.get("X-Request-ID", "")
    request_id = incoming if incoming and _REQUEST_ID.match(incoming) else secrets.token_hex(16)
    request[REQUEST_ID] = request_id
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.perf_counter()
    metrics.HTTP_IN_FLIGHT.inc()
    response: web.StreamResponse
    try:
        response = await handler(request)
    except DomainError as exc:
        response = domain_error_response(exc)
    except web.HTTPException as exc:
        response = _http_exception_response(request, exc)
    except RedisError as exc:
        # Jobs, batches, evals and usage live in Redis: while it is unreachable that is a 503 to retry,
        # not an internal error.
        log.warning("redis_unavailable", method=request.method, path=request.path, error=str(exc))
        response = error_response(503, "Redis, where the gateway keeps jobs, batches and evaluations, is "
                                  "unreachable right now; retry shortly.", type="server_error",
                                  code="redis_unavailable", headers={"Retry-After": "5"})
    except Exception:
        log.exception("unhandled_error", method=request.method, path=request.path)
        response = error_response(500, f"Internal error; quote request id {request_id} when reporting it.",
                                  type="server_error", code="internal_error")
    finally:
        metrics.HTTP_IN_FLIGHT.dec()
    route = route_label(request)
    metrics.HTTP_REQUESTS_BY(route, request.method, str(response.status)).inc()
    metrics.HTTP_LATENCY_BY(route).observe(time.perf_counter() - started)
    if not response.prepared:
        response.headers["X-Request-ID"] = request_id
    return response


def _http_exception_response(request: web.Request, exc: web.HTTPException) -> web.StreamResponse:
    if exc.status < 400:
        return exc  # redirects and the like pass through unchanged
    code, template = _STATUS_TEXT.get(exc.status, ("http_error", "{reason}"))
    limit = request.app[SETTINGS].max_body_bytes
    message = template.format(method=request.method, path=request.path, limit=limit, reason=exc.reason)
    headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
    return error_response(exc.status, message, code=code, headers=headers)


def _unauthorized(message: str, code: str, scope: Scope, bad_token: bool) -> ApiError:
    challenge = f'Bearer realm="llm-gateway", scope="{scope.value}"'
    if bad_token:
        challenge += ', error="invalid_token"'
    return ApiError(401, message, type="authentication_error", code=code,
                    headers={"WWW-Authenticate": challenge})


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Enforce the scope a handler declares with `requires_scope`; routes without one are 404/405."""
    scope = getattr(request.match_info.handler, "required_scope", _MISSING)
    if not isinstance(scope, Scope) or request.match_info.http_exception is not None:
        return await handler(request)
    header = request.headers.get("Authorization", "")
    if not header and scope is Scope.MONITOR:
        # Browsers cannot send a bearer header: a valid dashboard session cookie stands in for it, on
        # monitor routes only; a browser without one is sent to the login form instead of a 401.
        session_key = session.session_key(request)
        if session_key is not None:
            request[API_KEY] = session_key
            structlog.contextvars.bind_contextvars(key_id=session_key.id)
            await session.require_csrf(request)
            return await handler(request)
        redirect = session.login_redirect(request)
        if redirect is not None:
            return redirect
    scheme, _, token = header.partition(" ")
    token = token.strip()
    need = f"This route needs an API key with the '{scope.value}' scope"
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized(f"{need}; send it as 'Authorization: Bearer <token>'.", "missing_api_key",
                            scope, bad_token=False)
    key = request.app[KEYRING].authenticate(token)
    if key is None:
        raise _unauthorized(f"{need}; the token given is not a known key.", "invalid_api_key", scope,
                            bad_token=True)
    if not key.allows(scope):
        have = ", ".join(sorted(s.value for s in key.scopes))
        raise _unauthorized(f"{need}; key '{key.id}' has only: {have}.", "missing_scope", scope,
                            bad_token=False)
    request[API_KEY] = key
    structlog.contextvars.bind_contextvars(key_id=key.id)
    return await handler(request)


@web.middleware
async def body_deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Read a buffered (JSON, form) body within CLIENT_BODY_TIMEOUT: a client trickling it is cut off.

    aiohttp caches what `read()` returns, so the handler's own `await request.read()` costs nothing more.
    """
    # A body already received in full (the common case: small JSON in one packet) needs no timer.
    if request.body_exists and not request.content.is_eof() \
            and not request.content_type.startswith(_STREAMED_BODIES):
        timeout = request.app[SETTINGS].client_body_timeout
        try:
            async with asyncio.timeout(timeout):
                await request.read()
        except TimeoutError:
            raise ApiError(408, f"The request body did not arrive within {timeout:g} s (CLIENT_BODY_TIMEOUT).",
                           code="body_timeout", headers={"Connection": "close"}) from None
    return await handler(request)
