"""The realtime OpenAI proxy: completions, chat, responses, embeddings, vLLM's extra endpoints, models.

Every proxied POST is a row of ENDPOINTS and goes through one path (`_proxy`): it parses the body once
with orjson, checks the model, reads the supervisor's snapshot (no I/O), forwards the bytes over the
pooled upstream session, relays the answer (SSE event by event), and hands one usage event to the
accountant without awaiting it.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import aiohttp
import orjson
import structlog
from aiohttp import web

from gateway import metrics
from gateway.actors.supervisor import RuntimeSnapshot, RuntimeState
from gateway.actors.usage import UsageEvent
from gateway.batch.coserve import REALTIME_PRIORITY
from gateway.errors import ApiError, bad_request
from gateway.flavours import flavour_for
from gateway.http.appkeys import (
    ACCOUNTANT,
    ACTIVITY,
    API_KEY,
    REQUEST_ID,
    SETTINGS,
    SUPERVISOR,
    UPSTREAM,
    UPSTREAM_POOL,
)
from gateway.http.auth import reads_models, requires_scope
from gateway.http.errors import error_body, parse_json_object
from gateway.keys import Scope
from gateway.policy import check_generation, shown
from gateway.settings import Settings
from gateway.tokens import response_tokens
from gateway.upstream import Exchange, UpstreamError

log = structlog.get_logger(component="realtime")

_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"}
_USAGE_MARKERS = (b'"usage":{', b'"usage": {')
_RESPONSES_ENDS = frozenset({b"response.completed", b"response.incomplete", b"response.failed"})
# One SSE event is held until its end ("\n\n") so usage can be read from it; a runtime that never ends
# an event must not make the gateway buffer without limit (real events are a few KiB, logprobs included).
SSE_EVENT_MAX = 1024 * 1024
# Above this many bytes waiting in the client's send buffer, reading from the runtime pauses until the client
# has taken them down to the low mark (checked every _DRAIN_POLL seconds while paused).
_CLIENT_BUFFER_HIGH = 256 * 1024
_CLIENT_BUFFER_LOW = 64 * 1024
_DRAIN_POLL = 0.005


class Kind(enum.Enum):
    """What a proxied endpoint takes and answers: it selects the input check and the stream format."""

    COMPLETION = "completion"
    CHAT = "chat"
    RESPONSES = "responses"  # OpenAI's Responses API: named SSE events, no [DONE], usage in response.completed
    EMBEDDINGS = "embeddings"
    POOLING = "pooling"
    SCORE = "score"
    RERANK = "rerank"
    TOKENIZE = "tokenize"
    DETOKENIZE = "detokenize"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One proxied POST route: the same path on the gateway and on the runtime."""

    path: str
    kind: Kind
    summary: str
    streams: bool = False  # the request may ask for an SSE stream
    priority: bool = True  # the runtime's request model has vLLM's `priority` field
    model_required: bool = True  # the runtime takes a request without `model` (its default model)


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("/v1/completions", Kind.COMPLETION, "Completion (OpenAI)", streams=True),
    Endpoint("/v1/chat/completions", Kind.CHAT, "Chat completion (OpenAI)", streams=True),
    Endpoint("/v1/responses", Kind.RESPONSES, "Response (OpenAI Responses API)", streams=True),
    Endpoint("/v1/embeddings", Kind.EMBEDDINGS, "Embeddings (OpenAI)"),
    Endpoint("/pooling", Kind.POOLING, "Pooling (vLLM)"),
    Endpoint("/score", Kind.SCORE, "Score (vLLM)"),
    Endpoint("/v1/score", Kind.SCORE, "Score (vLLM)"),
    Endpoint("/rerank", Kind.RERANK, "Rerank (Jina/Cohere style, vLLM)"),
    Endpoint("/v1/rerank", Kind.RERANK, "Rerank (Jina/Cohere style, vLLM)"),
    Endpoint("/v2/rerank", Kind.RERANK, "Rerank (Cohere v2 style, vLLM)"),
    Endpoint("/tokenize", Kind.TOKENIZE, "Tokenize (vLLM)", priority=False, model_required=False),
    Endpoint("/detokenize", Kind.DETOKENIZE, "Detokenize (vLLM)", priority=False, model_required=False),
)
"""Every proxied POST route. http/openapi.py describes each one from this table."""


class _EventTooLarge(Exception):
    """The runtime sent more than SSE_EVENT_MAX bytes without ending an event."""


def _check_int(data: dict[str, Any], name: str, minimum: int) -> None:
    value = data.get(name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
        raise bad_request(f"'{name}' must be an integer >= {minimum}, got {orjson.dumps(value).decode()}.",
                          param=name)


def _served_model(model: str, settings: Settings) -> bool:
    """Whether `model` names the realtime model (an alias counts); the 404 otherwise."""
    if model == settings.realtime_model:
        return False
    if model not in settings.aliases:
        served = ", ".join([settings.realtime_model, *sorted(settings.aliases)])
        raise ApiError(404, f"The model {shown(model)} is not served here; use one of: {served}.",
                       code="model_not_found", param="model")
    return True


def _non_empty(data: dict[str, Any], names: tuple[str, ...], what: str) -> None:
    """At least one of `names` holds a non-empty string or array (else a 400 naming the first)."""
    for name in names:
        value = data.get(name)
        if (isinstance(value, str) and value) or (isinstance(value, list) and value):
            return
    raise bad_request(f"'{names[0]}' is required: {what}.", param=names[0])


# The input each non-generating kind cannot do without; the runtime checks the details.
_INPUTS: dict[Kind, tuple[tuple[str, ...], str]] = {
    Kind.RESPONSES: (("input",), "a string, or a non-empty array of input items"),
    Kind.EMBEDDINGS: (("input", "messages"), "a string, or a non-empty array of strings or token ids"),
    Kind.POOLING: (("input", "messages"), "a string, or a non-empty array of strings or token ids"),
    # vLLM's score takes queries/documents (or items), data_1/data_2 or text_1/text_2; SGLang's query/items.
    Kind.SCORE: (("queries", "text_1", "data_1", "query"), "the queries to score against 'documents'"),
    Kind.RERANK: (("documents",), "a non-empty array of documents to rank against 'query'"),
    Kind.TOKENIZE: (("prompt", "messages"), "a string, or a non-empty array of chat messages"),
    Kind.DETOKENIZE: (("tokens",), "a non-empty array of token ids"),
}


def validate_endpoint_request(data: dict[str, Any], endpoint: Endpoint,
                              settings: Settings) -> tuple[bool, bool]:
    """validate_request for any row of ENDPOINTS; return (changed, stream)."""
    if endpoint.kind in (Kind.CHAT, Kind.COMPLETION):
        return validate_request(data, chat=endpoint.kind is Kind.CHAT, settings=settings)
    changed = False
    if "model" in data or endpoint.model_required:
        model = data.get("model")
        if not isinstance(model, str) or not model:
            raise bad_request("'model' is required and must be a string.", param="model")
        if _served_model(model, settings):
            data["model"] = settings.realtime_model
            changed = True
    names, what = _INPUTS[endpoint.kind]
    _non_empty(data, names, what)
    if endpoint.kind is Kind.RERANK and not isinstance(data.get("query"), str):
        raise bad_request("'query' is required: the text the documents are ranked against.", param="query")
    stream = data.get("stream", False) if endpoint.streams else False
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be true or false.", param="stream")
    return changed, stream


def validate_request(data: dict[str, Any], *, chat: bool, settings: Settings) -> tuple[bool, bool]:
    """Check what the gateway itself relies on; return (changed, stream). The runtime checks the rest."""
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a string.", param="model")
    changed = False
    if _served_model(model, settings):
        data["model"] = settings.realtime_model
        changed = True
    if chat:
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("'messages' must be a non-empty array of chat messages.", param="messages")
        if not all(isinstance(m, dict) for m in messages):
            raise bad_request("Each entry of 'messages' must be an object with 'role' and 'content'.",
                              param="messages")
    else:
        prompt = data.get("prompt")
        if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and not prompt):
            raise bad_request("'prompt' is required: a string, or a non-empty array of strings or token ids.",
                              param="prompt")
    for name in ("max_tokens", "max_completion_tokens", "n"):
        _check_int(data, name, 1)
    check_generation(data, settings.request_max_n, settings.request_max_tokens)
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be true or false.", param="stream")
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object.", param="stream_options")
    return changed, stream


def unavailable(request: web.Request, snap: RuntimeSnapshot) -> ApiError:
    """A 503 with Retry-After that says why the runtime cannot take the request now."""
    settings = request.app[SETTINGS]
    wait = snap.retry_after()
    if snap.state is RuntimeState.STOPPED:
        request.app[SUPERVISOR].request_start()
        what, code = "is stopped and is being started", "runtime_stopped"
    elif snap.model and snap.model != settings.realtime_model:
        request.app[ACTIVITY].want_realtime()
        what, code = f"is serving batch model '{snap.model}'; the realtime model is being brought back", \
            "runtime_swapping"
        wait = max(wait, 1)
    elif snap.state is RuntimeState.SLEEPING:
        # Asleep while a batch model runs (RUNTIME_SLEEP_MODE): ask the dispatcher to wake it.
        request.app[ACTIVITY].want_realtime()
        what, code = "is asleep while a batch model runs; it is being woken", "runtime_sleeping"
    elif snap.state is RuntimeState.FAILED:
        what, code = f"failed ({snap.last_error or 'unknown error'}) and is being restarted", "runtime_failed"
    else:
        what, code = f"is {snap.state.value}", f"runtime_{snap.state.value}"
    return ApiError(503, f"The runtime for '{settings.realtime_model}' {what}; retry in {wait} s.",
                    type="server_error", code=code, headers={"Retry-After": str(wait)})


def _upstream_error(kind: str, exc: BaseException | None = None) -> ApiError:
    metrics.UPSTREAM_ERRORS.labels(kind).inc()
    if kind == "timeout":
        return ApiError(504, "The runtime did not answer in time.", type="server_error", code="upstream_timeout")
    detail = f" ({exc})" if isinstance(exc, UpstreamError) else f": {exc.__class__.__name__}" if exc else ""
    return ApiError(502, f"The runtime could not be reached or broke the connection{detail}.",
                    type="server_error", code="upstream_unavailable")


def _not_supported(settings: Settings, path: str) -> ApiError:
    return ApiError(404, f"The {settings.runtime_type} runtime (RUNTIME_TYPE) has no {path} endpoint; "
                    "this gateway cannot serve it.", code="endpoint_not_supported")


async def _proxy(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    path = endpoint.path
    if not flavour_for(settings.runtime_type).serves(path):
        raise _not_supported(settings, path)
    body = await request.read()
    data = parse_json_object(body)
    changed, stream = validate_endpoint_request(data, endpoint, settings)
    kind = endpoint.kind
    client_wants_usage = False
    if stream and kind is not Kind.RESPONSES:  # a responses stream always ends with its usage
        options = cast("dict[str, object]", data.get("stream_options") or {})  # an object: validate_request
        client_wants_usage = bool(options.get("include_usage"))
        if not client_wants_usage:
            data["stream_options"] = {**options, "include_usage": True}
            changed = True
    splice_priority = False
    if endpoint.priority and settings.priority_scheduling:
        # The runtime's priority scheduler puts realtime first; a client cannot choose its own priority.
        if "priority" in data:
            data["priority"] = REALTIME_PRIORITY
            changed = True
        else:
            splice_priority = True
    elif endpoint.priority and "priority" in data:
        del data["priority"]  # without priority scheduling the runtime would refuse a non-zero value
        changed = True
    if changed:
        if splice_priority:
            data["priority"] = REALTIME_PRIORITY
        body = orjson.dumps(data)
    elif splice_priority:
        # The body is a JSON object with a 'model' (validated above) and no 'priority': adding the field
        # in front costs a copy, not a second serialisation.
        body = b'{"priority":%d,' % REALTIME_PRIORITY + body[body.index(b"{") + 1:]
    snap = app[SUPERVISOR].snapshot
    if not snap.ready or snap.base_url is None or snap.model != settings.realtime_model:
        raise unavailable(request, snap)

    key_id = request[API_KEY].id
    activity = app[ACTIVITY]
    accountant = app[ACCOUNTANT]
    activity.begin()
    awaiting = activity.await_first_token() if stream else 0
    ok, prompt_tokens, completion_tokens = False, 0, 0
    try:
        started = time.perf_counter()
        headers = {"Content-Type": "application/json", "X-Request-ID": request[REQUEST_ID]}
        upstream = await app[UPSTREAM_POOL].request(snap.base_url, path, body, headers,
                                                    until="headers" if stream else "body")
        if stream and upstream.status == 200:
            response, ok, prompt_tokens, completion_tokens = await _relay_stream(
                request, upstream, started, path, client_wants_usage, awaiting, responses=kind is Kind.RESPONSES)
            return response
        payload = await upstream.read()
        metrics.UPSTREAM_TTFT_BY(path).observe(time.perf_counter() - started)
        if upstream.status >= 500:
            log.warning("upstream_5xx", status=upstream.status, body=payload[:500].decode(errors="replace"))
            raise ApiError(502, f"The runtime answered {upstream.status}: "
                           f"{_upstream_message(payload)}", type="server_error", code="upstream_error")
        if upstream.status == 200:
            ok = True
            try:
                prompt_tokens, completion_tokens = response_tokens(orjson.loads(payload))
            except orjson.JSONDecodeError:
                pass
        elif upstream.status == 404 and _route_missing(payload):
            raise ApiError(404, f"The {settings.runtime_type} runtime does not serve {path} for the model "
                           f"'{settings.realtime_model}' (vLLM serves embeddings, pooling, score and rerank only "
                           "for a pooling model, and generation only for a generating one).",
                           code="endpoint_not_supported")
        else:
            payload = openai_error_payload(upstream.status, payload)
        return web.Response(status=upstream.status, body=payload,
                            content_type=(upstream.content_type.partition(";")[0].strip()
                                          or "application/json"),
                            headers={"X-Request-ID": request[REQUEST_ID]})
    except UpstreamError as exc:
        now = app[SUPERVISOR].snapshot
        if exc.kind == "connection" and (now is not snap and not (now.ready and now.base_url == snap.base_url)):
            # The runtime went away under this request because a swap or a restart began: that is a 503
            # with Retry-After, as for a request that arrives a moment later, not a broken runtime.
            raise unavailable(request, now) from None
        raise _upstream_error(exc.kind, exc) from None
    finally:
        if awaiting:
            activity.stream_ended(awaiting)
        activity.end()
        accountant.record(UsageEvent(key_id, ok, prompt_tokens, completion_tokens))


def openai_error_payload(status: int, payload: bytes) -> bytes:
    """A runtime's 4xx body in OpenAI's error shape.

    vLLM already answers `{"error": {...}}`; SGLang answers `{"object": "error", "message": ...}` at the top
    level, and a proxy in between may answer plain text. Clients get one shape whatever the runtime.
    """
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        return payload
    message = _upstream_message(payload)
    param = obj.get("param") if isinstance(obj, dict) and isinstance(obj.get("param"), str) else None
    kind: str = obj["type"] if isinstance(obj, dict) and isinstance(obj.get("type"), str) else "invalid_request_error"
    return error_body(message, type=kind, code=str(status), param=param)


def _route_missing(payload: bytes) -> bool:
    """A runtime's 404 for a route it does not have (FastAPI's), not one for a missing model."""
    try:
        return bool(orjson.loads(payload) == {"detail": "Not Found"})
    except orjson.JSONDecodeError:
        return False


def _upstream_message(payload: bytes) -> str:
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return payload[:200].decode(errors="replace") or "no body"
    err = obj.get("error", obj) if isinstance(obj, dict) else obj
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return str(err["message"])[:500]
    return str(err)[:200]


class _ClientGone(Exception):
    """The client closed its connection in the middle of the stream."""


class _SseRelay:
    """The sink of a streamed answer, called with each body chunk straight from the upstream connection.

    Whole events are written to the client's transport as they come, in HTTP chunked framing (the response
    headers are already sent); an unfinished event waits for its end, so usage can be read from it. The
    usage chunk is dropped if the client did not ask for it. When the client reads slower than the runtime
    writes, reading from the runtime pauses until the client has caught up.
    """

    __slots__ = ("protocol", "transport", "upstream", "chunked", "wants_usage", "started", "path", "buffer", "first",
                 "done", "prompt_tokens", "completion_tokens", "paused", "first_at", "last_at", "chunks", "responses",
                 "activity", "awaiting")

    def __init__(self, request: web.Request, transport: asyncio.Transport, upstream: Exchange, *, chunked: bool,
                 wants_usage: bool, started: float, path: str, responses: bool = False, awaiting: int = 0) -> None:
        self.protocol = request.protocol  # its transport becomes None when the client connection is lost
        self.transport, self.upstream, self.chunked = transport, upstream, chunked
        self.wants_usage, self.started, self.path = wants_usage, started, path
        self.buffer = b""
        self.first = True
        self.done = False
        self.prompt_tokens = self.completion_tokens = 0
        self.paused = False
        self.first_at = self.last_at = 0.0
        self.chunks = 0
        self.responses = responses
        self.activity = request.app[ACTIVITY]
        self.awaiting = awaiting

    def __call__(self, chunk: bytes) -> None:
        now = time.perf_counter()
        if self.responses:
            self._responses_chunk(chunk, now)
            return
        if self.first:
            self._first_token(now)
        self.last_at = now
        self.chunks += 1
        chunk = self._whole_events(chunk)
        if not chunk:
            return
        # Fast path: whole events with neither usage nor [DONE] are relayed as they came.
        if b"data: [DONE]" in chunk or _USAGE_MARKERS[0] in chunk or _USAGE_MARKERS[1] in chunk:
            out: list[bytes] = []
            for event in chunk.split(b"\n\n"):
                if not event:
                    continue
                if event.startswith(b"data: [DONE]"):
                    self.done = True
                elif any(m in event for m in _USAGE_MARKERS) and event.startswith(b"data: "):
                    obj = orjson.loads(event[6:])
                    self.prompt_tokens, self.completion_tokens = response_tokens(obj)
                    if not self.wants_usage and not obj.get("choices"):
                        continue
                out.append(event + b"\n\n")
            chunk = b"".join(out)
            if not chunk:
                return
        self._write(chunk)

    def _responses_chunk(self, chunk: bytes, now: float) -> None:
        """A Responses API stream: named events (`event: NAME` then `data: JSON`), no [DONE].

        It ends with response.completed (which carries the usage), response.incomplete or response.failed.
        The first output delta is the first token (response.created comes before any generation).
        """
        chunk = self._whole_events(chunk)
        if not chunk:
            return
        for event in chunk.split(b"\n\n"):
            name = event[7:event.find(b"\n")] if event.startswith(b"event: ") else b""
            if name.endswith(b".delta"):
                if self.first:
                    self._first_token(now)
                self.last_at = now
                self.chunks += 1
            elif name in _RESPONSES_ENDS:
                self.done = True
                at = event.find(b"\ndata: ")
                if at >= 0 and any(m in event for m in _USAGE_MARKERS):
                    # response.completed carries its usage under `response`, which response_tokens reads.
                    self.prompt_tokens, self.completion_tokens = response_tokens(orjson.loads(event[at + 7:]))
        self._write(chunk)

    def _first_token(self, now: float) -> None:
        self.first_at = now
        metrics.UPSTREAM_TTFT_BY(self.path).observe(now - self.started)
        self.activity.first_token(self.awaiting, now - self.started)  # co-serving's signal, at once
        self.first = False

    def _whole_events(self, chunk: bytes) -> bytes:
        """The buffered start of an event plus `chunk`, up to the end of its last whole event (the rest is
        kept for the next chunk); b"" while no event is complete."""
        if self.buffer:
            chunk, self.buffer = self.buffer + chunk, b""
        if chunk.endswith(b"\n\n"):
            return chunk
        cut = chunk.rfind(b"\n\n")
        if cut < 0:
            if len(chunk) > SSE_EVENT_MAX:
                raise _EventTooLarge(f"{len(chunk)} bytes without an event end")
            self.buffer = chunk
            return b""
        self.buffer = chunk[cut + 2:]
        return chunk[: cut + 2]

    def token_times(self) -> tuple[float, float | None]:
        """Time to first token and, with two tokens or more, the mean gap between tokens after it."""
        # Chat and completion streams: the usage and [DONE] chunks are not tokens.
        tokens = self.chunks - 1 if self.responses else self.chunks - 2
        return self.first_at - self.started, ((self.last_at - self.first_at) / tokens if tokens >= 2 else None)

    def _write(self, chunk: bytes) -> None:
        transport = self.transport
        if self.protocol.transport is None or transport.is_closing():
            raise _ClientGone
        transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if self.chunked else chunk)
        if not self.paused and transport.get_write_buffer_size() > _CLIENT_BUFFER_HIGH:
            self.paused = True
            self.upstream.pause()
            asyncio.get_running_loop().call_later(_DRAIN_POLL, self._drained)

    def _drained(self) -> None:
        if self.upstream.done:
            return
        if (self.protocol.transport is None or self.transport.is_closing()
                or self.transport.get_write_buffer_size() <= _CLIENT_BUFFER_LOW):
            self.paused = False
            self.upstream.resume()
        else:
            asyncio.get_running_loop().call_later(_DRAIN_POLL, self._drained)


async def _relay_stream(request: web.Request, upstream: Exchange, started: float, path: str,
                        client_wants_usage: bool, awaiting: int = 0, *, responses: bool = False,
                        ) -> tuple[web.StreamResponse, bool, int, int]:
    """Relay SSE events as they come (see _SseRelay).

    Returns the (already sent) response, whether the stream completed, and the token counts.
    """
    response = web.StreamResponse(status=200, headers={**_SSE_HEADERS, "X-Request-ID": request[REQUEST_ID]})
    chunked = request.version >= aiohttp.HttpVersion11
    if chunked:
        response.enable_chunked_encoding()
    try:
        await response.prepare(request)
    except ConnectionResetError:
        upstream.abort()
        return response, False, 0, 0
    transport = request.transport
    if transport is None:  # the client left before the headers were sent
        upstream.abort()
        return response, False, 0, 0
    relay = _SseRelay(request, transport, upstream, chunked=chunked, wants_usage=client_wants_usage, started=started,
                      path=path, responses=responses, awaiting=awaiting)
    try:
        await upstream.relay(relay)
    except _ClientGone:
        # Failing the exchange closed the runtime connection, which makes the runtime abort the generation.
        return response, False, relay.prompt_tokens, relay.completion_tokens
    except (UpstreamError, orjson.JSONDecodeError, _EventTooLarge) as exc:
        kind = "timeout" if isinstance(exc, UpstreamError) and exc.kind == "timeout" else "stream_broken"
        metrics.UPSTREAM_ERRORS.labels(kind).inc()
        log.warning("upstream_stream_failed", error=repr(exc))
        message = ("The runtime stopped answering in the middle of the stream." if kind == "timeout"
                   else f"The runtime sent an event over {SSE_EVENT_MAX} bytes; the stream was cut."
                   if isinstance(exc, _EventTooLarge)
                   else "The runtime broke off the stream (it may have crashed); the answer is incomplete.")
        await _end_with_error(response, message, f"upstream_{kind}", responses=responses)
        return response, False, relay.prompt_tokens, relay.completion_tokens
    if not relay.done:
        # The runtime closed the stream cleanly but without [DONE]: tell the client it is incomplete.
        metrics.UPSTREAM_ERRORS.labels("stream_truncated").inc()
        await _end_with_error(response, "The runtime ended the stream early; the answer is incomplete.",
                              "upstream_stream_broken", responses=responses)
        return response, False, relay.prompt_tokens, relay.completion_tokens
    try:
        await response.write_eof()
    except ConnectionResetError:
        pass
    # What co-serving is judged by: time to first token, and the mean gap between the chunks after it
    # (the usage and [DONE] chunks excluded).
    # (the TTFT was recorded when the first token came).
    _, itl = relay.token_times()
    if itl is not None:
        request.app[ACTIVITY].record_itl(itl)
    return response, True, relay.prompt_tokens, relay.completion_tokens


async def _end_with_error(response: web.StreamResponse, message: str, code: str, *, responses: bool = False) -> None:
    """End a stream with an OpenAI-shaped error event and [DONE] (unless the client has left).

    A Responses API stream has no [DONE]: it ends with an `error` event, which the SDKs raise.
    """
    error = error_body(message, type="server_error", code=code)
    try:
        await response.write(b"event: error\ndata: " + error + b"\n\n" if responses
                             else b"data: " + error + b"\n\ndata: [DONE]\n\n")
        await response.write_eof()
    except (ConnectionResetError, RuntimeError):
        pass


def _proxy_handler(endpoint: Endpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The realtime-scoped handler of one row of ENDPOINTS."""

    @requires_scope(Scope.REALTIME)
    async def handler(request: web.Request) -> web.StreamResponse:
        return await _proxy(request, endpoint)

    handler.__doc__ = f"POST {endpoint.path}: {endpoint.summary}, proxied to the runtime."
    handler.__name__ = handler.__qualname__ = "proxy_" + endpoint.path.strip("/").replace("/", "_")
    return handler


async def _model_listing(request: web.Request) -> dict[str, Any]:
    """The runtime's /v1/models listing plus the configured aliases of the realtime model."""
    app = request.app
    settings = app[SETTINGS]
    snap = app[SUPERVISOR].snapshot
    if not snap.ready or snap.base_url is None or snap.model != settings.realtime_model:
        if snap.state is RuntimeState.STOPPED:
            app[SUPERVISOR].request_start()
        wait = snap.retry_after()
        raise ApiError(503, f"The runtime for '{settings.realtime_model}' is {snap.state.value}; retry in "
                       f"{wait} s.", type="server_error", code=f"runtime_{snap.state.value}",
                       headers={"Retry-After": str(wait)})
    try:
        async with app[UPSTREAM].get(snap.base_url + "/v1/models") as upstream:
            payload = await upstream.read()
            if upstream.status != 200:
                raise ApiError(502, f"The runtime answered {upstream.status} to /v1/models: "
                               f"{_upstream_message(payload)}", type="server_error", code="upstream_error")
    except TimeoutError:
        raise _upstream_error("timeout") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise _upstream_error("connection", exc) from None
    listing = orjson.loads(payload)
    if not isinstance(listing, dict):
        raise ApiError(502, "The runtime answered /v1/models with something other than a listing.",
                       type="server_error", code="upstream_error")
    entries = [m for m in listing.get("data") or [] if isinstance(m, dict)]
    base = next((m for m in entries if m.get("id") == settings.realtime_model), None)
    for alias in sorted(settings.aliases):
        if not any(m.get("id") == alias for m in entries):
            entries.append({**(base or {"object": "model", "owned_by": "llm-gateway"}), "id": alias,
                            "root": settings.realtime_model})
    listing["data"] = entries
    return listing


@reads_models
async def models(request: web.Request) -> web.StreamResponse:
    """GET /v1/models: the runtime's list, plus the configured aliases of the realtime model."""
    return web.Response(body=orjson.dumps(await _model_listing(request)), content_type="application/json")


@reads_models
async def model(request: web.Request) -> web.StreamResponse:
    """GET /v1/models/{id}: one model card; ids may contain '/' (e.g. org/name), aliases included.

    Neither vLLM nor SGLang is asked for the one model (vLLM has no such route): the card is the one
    GET /v1/models lists.
    """
    model_id = request.match_info["model"]
    for entry in (await _model_listing(request))["data"]:
        if entry.get("id") == model_id:
            return web.Response(body=orjson.dumps(entry), content_type="application/json")
    settings = request.app[SETTINGS]
    served = ", ".join([settings.realtime_model, *sorted(settings.aliases)])
    raise ApiError(404, f"The model '{model_id}' is not served here; use one of: {served}.",
                   code="model_not_found", param="model")


def setup(app: web.Application) -> None:
    """Add the realtime routes: every row of ENDPOINTS, and the model listing and cards."""
    for endpoint in ENDPOINTS:
        app.router.add_post(endpoint.path, _proxy_handler(endpoint))
    app.router.add_get("/v1/models", models)
    # {model:.+} lets an id contain '/'.
    app.router.add_get("/v1/models/{model:.+}", model)
