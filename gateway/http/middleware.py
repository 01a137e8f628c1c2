"""Middleware: request id + metrics + error shaping (outermost), then the scope check."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable

import structlog
from aiohttp import hdrs, web
from aiohttp.web_urldispatcher import MatchInfoError

from gateway import metrics, redis_client
from gateway.errors import ApiError, DomainError
from gateway.http import session
from gateway.http.appkeys import API_KEY, AUTH_THROTTLE, KEYRING, REQUEST_ID, SETTINGS
from gateway.http.auth import accepted_scopes
from gateway.http.errors import domain_error_response, error_response
from gateway.http.throttle import client_address
from gateway.keys import ApiKey, Scope

log = structlog.get_logger(component="http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_MISSING = object()
_TOKEN_MAX = 512  # no real token is longer: longer ones are refused without hashing them
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# Bodies that handlers stream piece by piece (uploads, multipart files) are not read ahead here.
_STREAMED_BODIES = ("multipart/", "application/offset+octet-stream")

_STATUS_TEXT = {
    404: ("not_found", "No route matches {method} {path}."),
    405: ("method_not_allowed", "{method} is not allowed on {path}."),
    413: ("request_too_large", "The request body is larger than the limit of {limit} bytes (MAX_BODY_BYTES)."),
}


async def _no_expect_yet(request: web.Request) -> None:
    """aiohttp's hook for `Expect` runs before any middleware: do nothing there (body_deadline answers it)."""
    return None


class _DeferredExpect(web.UrlMappingMatchInfo):
    @property
    def expect_handler(self) -> Callable[[web.Request], Awaitable[None]]:
        return _no_expect_yet


class _DeferredExpectError(MatchInfoError):
    @property
    def expect_handler(self) -> Callable[[web.Request], Awaitable[None]]:
        return _no_expect_yet


class GatewayRouter(web.UrlDispatcher):
    """aiohttp's router, except that `Expect: 100-continue` is not answered at routing time.

    aiohttp sends `100 Continue` as soon as a route matches (or fails to match), before any middleware;
    that would invite an unauthenticated client to send its body. Here `body_deadline` sends it, only once
    the route is matched and the request authorised.
    """

    async def resolve(self, request: web.Request) -> web.UrlMappingMatchInfo:
        """Match as aiohttp does, deferring the Expect hook."""
        info = await super().resolve(request)
        if hdrs.EXPECT not in request.headers:
            return info
        if isinstance(info, MatchInfoError):
            return _DeferredExpectError(info.http_exception)
        return _DeferredExpect(dict(info), info.route)


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
    except redis_client.REDIS_ERRORS as exc:
        # Jobs, batches, evals and usage live in Redis: unreachable is a 503 to retry; an error Redis
        # answered with (a script error, WRONGTYPE, CROSSSLOT) is a 500 that names it.
        failure = redis_client.classify(exc)
        if failure.status == 503:
            log.warning("redis_unavailable", method=request.method, path=request.path, error=str(exc))
        else:
            log.error("redis_error", method=request.method, path=request.path, error=str(exc))
        headers = {"Retry-After": str(failure.retry_after)} if failure.retry_after else None
        response = error_response(failure.status, failure.message, type="server_error", code=failure.code,
                                  headers=headers)
    except Exception:
        log.exception("unhandled_error", method=request.method, path=request.path)
        response = error_response(500, f"Internal error; quote request id {request_id} when reporting it.",
                                  type="server_error", code="internal_error")
    finally:
        metrics.HTTP_IN_FLIGHT.dec()
    if response.status >= 400 and not response.prepared and _body_unread(request):
        # Answered without reading the announced body: close rather than drain it for the next request.
        response.force_close()
    route = route_label(request)
    metrics.HTTP_REQUESTS_BY(route, request.method, str(response.status)).inc()
    metrics.HTTP_LATENCY_BY(route).observe(time.perf_counter() - started)
    if not response.prepared:
        response.headers["X-Request-ID"] = request_id
    return response


def _body_unread(request: web.Request) -> bool:
    return request.body_exists and not request.content.is_eof()


def _http_exception_response(request: web.Request, exc: web.HTTPException) -> web.StreamResponse:
    if exc.status < 400:
        return exc  # redirects and the like pass through unchanged
    code, template = _STATUS_TEXT.get(exc.status, ("http_error", "{reason}"))
    limit = request.app[SETTINGS].max_body_bytes
    message = template.format(method=request.method, path=request.path, limit=limit, reason=exc.reason)
    headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
    return error_response(exc.status, message, code=code, headers=headers)


def _unauthorized(message: str, code: str, scopes: Iterable[Scope], bad_token: bool) -> ApiError:
    # RFC 6750: scope is a space-delimited list; any one of them lets the key in.
    challenge = f'Bearer realm="llm-gateway", scope="{" ".join(s.value for s in scopes)}"'
    if bad_token:
        challenge += ', error="invalid_token"'
    return ApiError(401, message, type="authentication_error", code=code,
                    headers={"WWW-Authenticate": challenge})


def check_token(request: web.Request, token: str) -> ApiKey | None:
    """The key a presented token belongs to, or None, counting failures against the client's address.

    Raises 429 (auth_throttled) while the address is throttled, without looking the token up.
    """
    settings = request.app[SETTINGS]
    throttle = request.app[AUTH_THROTTLE]
    address = client_address(request, throttle.proxies)
    wait = throttle.retry_after(address)
    if wait:
        raise ApiError(429, f"Too many failed authentication attempts from this address; retry in {wait} s "
                       f"(AUTH_FAIL_MAX={settings.auth_fail_max} per AUTH_FAIL_WINDOW_SECONDS="
                       f"{settings.auth_fail_window_seconds:g}).", type="rate_limit_error",
                       code="auth_throttled", headers={"Retry-After": str(wait)})
    if len(token) > _TOKEN_MAX:
        key = None
    else:
        key = request.app[KEYRING].authenticate(token)
    if key is None:
        throttle.failed(address)
        log.info("auth_failed", client=address)
    return key


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
        session_key = await session.session_key(request)
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
    accepted = [scope, *sorted(accepted_scopes(request.match_info.handler) - {scope})]
    need = f"This route needs an API key with the '{scope.value}' scope"
    if len(accepted) > 1:
        need += " (or " + " or ".join(f"'{s.value}'" for s in accepted[1:]) + ")"
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized(f"{need}; send it as 'Authorization: Bearer <token>'.", "missing_api_key",
                            accepted, bad_token=False)
    key = check_token(request, token)
    if key is None:
        raise _unauthorized(f"{need}; the token given is not a known key.", "invalid_api_key", accepted,
                            bad_token=True)
    if not any(key.allows(s) for s in accepted):
        have = ", ".join(sorted(s.value for s in key.scopes))
        raise _unauthorized(f"{need}; key '{key.id}' has only: {have}.", "missing_scope", accepted,
                            bad_token=False)
    request[API_KEY] = key
    structlog.contextvars.bind_contextvars(key_id=key.id)
    return await handler(request)


def _too_large(limit: int, what: str) -> ApiError:
    return ApiError(413, f"{what} takes a body of at most {limit} bytes.", code="request_too_large",
                    headers={"Connection": "close"})


@web.middleware
async def body_deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bodies are read only here, after routing and authorisation, within CLIENT_BODY_TIMEOUT.

    - An unmatched route (404) or method (405) is answered without reading the body; the connection is then
      closed if a body was announced (request_context), and no `100 Continue` is sent.
    - A public route takes no body, except one marked with `public_form`, capped at its few KiB.
    - Otherwise `Expect: 100-continue` is answered now, and a buffered (JSON, form) body is read within
      CLIENT_BODY_TIMEOUT: a client trickling it is cut off. aiohttp caches what `read()` returns, so the
      handler's own `await request.read()` costs nothing more. Streamed bodies (uploads, multipart files)
      are left to their handlers.
    """
    info = request.match_info
    if info.http_exception is not None:
        raise info.http_exception
    expect = request.headers.get(hdrs.EXPECT)
    if expect is not None and expect.lower() != "100-continue":
        raise ApiError(417, "Only 'Expect: 100-continue' is understood.", code="expectation_failed")
    limit: int | None = None
    if getattr(info.handler, "required_scope", _MISSING) is None:
        limit = int(getattr(info.handler, "max_body_bytes", 0))
        length = request.content_length
        if request.body_exists and (limit == 0 or (length is not None and length > limit)):
            raise _too_large(limit, f"{request.method} {request.path}")
    if expect is not None and request.version >= (1, 1) and _body_unread(request):
        await request.writer.write(_CONTINUE)
        request.writer.output_size = 0  # the interim response is not part of the real one
    if limit is not None and request.body_exists:
        # Possibly chunked, so of unknown length: aiohttp's own cap stops reading at the limit.
        limited = request.clone(client_max_size=limit, scheme=request.scheme, host=request.host,
                                remote=request.remote or "")
        for name, value in request.items():
            limited[name] = value
        request = limited
    if request.body_exists and (limit is not None or not request.content.is_eof()) \
            and not request.content_type.startswith(_STREAMED_BODIES):
        timeout = request.app[SETTINGS].client_body_timeout
        try:
            async with asyncio.timeout(timeout):
                await request.read()
        except TimeoutError:
            raise ApiError(408, f"The request body did not arrive within {timeout:g} s (CLIENT_BODY_TIMEOUT).",
                           code="body_timeout", headers={"Connection": "close"}) from None
        except web.HTTPRequestEntityTooLarge:
            if limit is None:
                raise
            raise _too_large(limit, f"{request.method} {request.path}") from None
    return await handler(request)
