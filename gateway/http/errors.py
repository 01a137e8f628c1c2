"""HTTP shapes: OpenAI-shaped error responses, JSON responses, and the parsing shared by route handlers.

The errors themselves are domain errors (gateway/errors.py); `domain_error_response` is the one place one
becomes a response.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import orjson
from aiohttp import web

from gateway.errors import DomainError, bad_request


def error_body(message: str, *, type: str, code: str | None = None,  # noqa: A002
               param: str | None = None) -> bytes:
    """The JSON bytes of an OpenAI-shaped error."""
    return orjson.dumps({"error": {"message": message, "type": type, "code": code, "param": param}})


def error_response(status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                   code: str | None = None, param: str | None = None,
                   headers: Mapping[str, str] | None = None, reason: str | None = None) -> web.Response:
    """An OpenAI-shaped error response."""
    return web.Response(status=status, reason=reason, body=error_body(message, type=type, code=code, param=param),
                        content_type="application/json", headers=headers)


def domain_error_response(exc: DomainError) -> web.Response:
    """The response for a domain error raised anywhere below the handler."""
    return error_response(exc.status, exc.message, type=exc.type, code=exc.code, param=exc.param,
                          headers=exc.headers, reason=exc.reason)


SHOULD_RETRY = "x-should-retry"
# 4xx answers a retry of the same request can fix: a timeout, rate limiting, and TUS's 423 (another
# request holds the upload). Every other 4xx needs a change by the caller first.
_RETRYABLE_4XX = frozenset({408, 423, 429})


async def retry_hint(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """Tell SDK clients whether retrying helps (`on_response_prepare`, so every response gets it).

    The openai SDK (and the Stainless SDKs like it) retries 408, 409, 429 and 5xx unless `x-should-retry`
    says otherwise: a permanent 4xx, 409s included (`batch_not_cancellable`, `file_in_use`, `job_finished`),
    gets `false` so the client fails at once; a 503 with Retry-After (the runtime is starting, swapping or
    asleep; Redis is unreachable) gets `true`. A handler that set the header itself is left alone.
    """
    status = response.status
    if status < 400 or SHOULD_RETRY in response.headers:
        return
    if status < 500:
        if status not in _RETRYABLE_4XX:
            response.headers[SHOULD_RETRY] = "false"
    elif status == 503 and "Retry-After" in response.headers:
        response.headers[SHOULD_RETRY] = "true"


def json_response(data: object, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """A JSON response serialised with orjson."""
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json",
                        headers=headers)


def parse_json_object(body: bytes) -> dict[str, object]:
    """Parse a request body that must be one JSON object, or raise a clear 400."""
    if not body:
        raise bad_request("The request body is empty; send a JSON object.")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise bad_request(f"The request body must be a JSON object, not {type(data).__name__}.")
    return data


LIST_LIMIT_DEFAULT = 20
LIST_LIMIT_MAX = 100


def parse_limit(query: Mapping[str, str], default: int = LIST_LIMIT_DEFAULT, maximum: int = LIST_LIMIT_MAX) -> int:
    """The `limit` query parameter: an integer from 1 to `maximum` (400 naming it otherwise)."""
    try:
        limit = int(query.get("limit", default))
    except ValueError:
        limit = 0
    if not 1 <= limit <= maximum:
        raise bad_request(f"'limit' must be an integer from 1 to {maximum}.", param="limit")
    return limit


def list_params(query: Mapping[str, str], *, cursor_prefix: str, cursor_what: str,
                statuses: Iterable[str] | None = None) -> tuple[str | None, int, str | None]:
    """Parse the `status`, `limit` and `after` query parameters shared by the list routes.

    Returns (status, limit, after); anything malformed is a 400 naming the parameter.
    """
    status = query.get("status") or None
    if statuses is not None:
        allowed = list(statuses)
        if status is not None and status not in allowed:
            raise bad_request(f"'status' must be one of {', '.join(allowed)}.", param="status")
    limit = parse_limit(query)
    after = query.get("after") or None
    if after is not None and not after.startswith(cursor_prefix):
        raise bad_request(f"'after' must be {cursor_what}.", param="after")
    return status, limit, after
