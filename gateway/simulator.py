"""A vLLM-compatible simulator runtime: a test double of vLLM's OpenAI server at the HTTP boundary.

It answers what the gateway asks a real runtime (``/health``, ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions`` with SSE and ``include_usage``, vLLM-named ``/metrics``, ``/sleep``,
``/wake_up``, ``/is_sleeping``) with deterministic text, configurable latency and injected faults.

This file is copied alone into a Docker image whose Python has only the standard library and
Debian bookworm's aiohttp 3.8, so it imports nothing else (orjson is used when present) and uses
only aiohttp APIs common to 3.8 and current releases.

Run: ``python -m gateway.simulator --model NAME [--served-model-name NAME ...] [--port 8000]``.
Unknown options and positional words (real vLLM/SGLang arguments) are ignored with one log line.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import inspect
import json
import math
import os
import random
import re
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

try:
    from gateway import sim_engine
except ImportError:  # pragma: no cover - the Docker image runs /app/simulator.py beside sim_engine.py
    import sim_engine  # type: ignore[no-redef, import-not-found]

try:  # orjson is much faster, but the Docker image has only the standard library.
    import orjson  # type: ignore[import-not-found,unused-ignore]

    def _dumps(obj: Any) -> bytes:
        return bytes(orjson.dumps(obj))

except ImportError:  # pragma: no cover - exercised in the Docker image
    _json_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))

    def _dumps(obj: Any) -> bytes:
        return _json_encoder.encode(obj).encode()


VERSION = "0.0.0+simulator"
SYSTEM_FINGERPRINT = f"vllm-{VERSION}"

# Every word is one token; output text is these words joined by single spaces.
VOCABULARY: tuple[str, ...] = (
    "the", "model", "answer", "is", "a", "simple", "token", "of", "text", "and",
    "gateway", "runtime", "queue", "batch", "request", "stream", "fast", "slow", "node", "gpu",
    "hello", "world", "data", "value", "result", "test", "sample", "output", "input", "prompt",
    "green", "blue", "red", "small", "large", "quick", "brown", "fox", "jumps", "over",
    "lazy", "dog", "river", "mountain", "cloud", "rain", "sun", "moon", "star", "sky",
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "yes", "no", "maybe", "done",
)
_VOCAB_SIZE = len(VOCABULARY)
# Longest text one token can stand for (a word and its leading space): vLLM's max_chars_per_token.
_MAX_CHARS_PER_TOKEN = max(len(word) for word in VOCABULARY) + 1
_PIECE_RE = re.compile(r"\s*\S+")
# Tokens a chat message costs beyond its words (role markers), and the assistant prefix.
CHAT_TOKENS_PER_MESSAGE = 4
CHAT_TOKENS_REPLY_PRIMER = 3

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


def log(message: str) -> None:
    """Write one vLLM-style log line to stdout and flush it, so crash logs keep their content."""
    stamp = time.strftime("%m-%d %H:%M:%S")
    sys.stdout.write(f"INFO {stamp} [simulator] {message}\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class SimConfig:
    """Everything the simulator was started with."""

    model: str
    served_model_names: list[str]
    host: str = "0.0.0.0"
    port: int = 8000
    start_delay: float = 0.0
    ttft: float = 0.0
    itl: float = 0.0
    output_tokens: int = 16
    crash_after: int | None = None
    exit_at_start: int | None = None
    hang_after: int | None = None
    fail_every: int | None = None
    sleep_delay: float = 0.0
    wake_delay: float = 0.0
    max_model_len: int = 2048
    engine: sim_engine.EngineProfile | None = None  # the contention model, when switched on
    ignored: list[str] = field(default_factory=list)


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line: vLLM's and SGLang's spellings of the options that matter, plus --sim-*."""
    parser = argparse.ArgumentParser(
        prog="simulator",
        description="vLLM-compatible simulator runtime (a test double of vLLM's OpenAI server).",
        # Abbreviations would let real runtime options (e.g. --model-loader-extra-config) be
        # mistaken for ours.
        allow_abbrev=False,
    )
    parser.add_argument("--model", default=None, help="model name or path (vLLM spelling)")
    parser.add_argument("--model-path", dest="model_path", default=None,
                        help="model name or path (SGLang spelling)")
    parser.add_argument("--served-model-name", dest="served_model_name", nargs="+", default=None,
                        help="names the API accepts and reports (default: the model)")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-model-len", "--context-length", dest="max_model_len_alias",
                        type=sim_engine.positive_int, default=None,
                        help="vLLM/SGLang spelling of --sim-max-model-len")
    sim = parser.add_argument_group("simulation")
    sim.add_argument("--sim-start-delay", type=_non_negative_float, default=0.0,
                     help="seconds before the port listens (as loading weights)")
    sim.add_argument("--sim-ttft", type=_non_negative_float, default=0.0,
                     help="time to first token, seconds")
    sim.add_argument("--sim-itl", type=_non_negative_float, default=0.0,
                     help="inter-token latency, seconds (on an absolute schedule from the first token)")
    sim.add_argument("--sim-output-tokens", type=_non_negative_int, default=16,
                     help="output length when max_tokens is absent")
    sim.add_argument("--sim-crash-after", type=_non_negative_int, default=None,
                     help="after N generation requests, the next one kills the process")
    sim.add_argument("--sim-exit-at-start", type=int, default=None,
                     help="exit with this code right away")
    sim.add_argument("--sim-hang-after", type=_non_negative_int, default=None,
                     help="generation requests after the N-th never answer")
    sim.add_argument("--sim-fail-every", type=sim_engine.positive_int, default=None,
                     help="every N-th generation request answers 500")
    sim.add_argument("--sim-sleep-delay", type=_non_negative_float, default=0.0)
    sim.add_argument("--sim-wake-delay", type=_non_negative_float, default=0.0)
    sim.add_argument("--sim-max-model-len", type=sim_engine.positive_int, default=None,
                     help="context length in tokens (default 2048)")
    sim_engine.add_engine_arguments(parser)
    return parser


def parse_config(argv: list[str]) -> SimConfig:
    """Parse argv, ignoring (and remembering) everything the simulator does not know."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    model = args.model or args.model_path
    if model is None:
        # `vllm serve MODEL` (the vllm/vllm-openai image's entrypoint is `vllm serve`, so its
        # arguments start with the model) passes the model as the first positional word.
        words = unknown[1:] if unknown[:1] == ["serve"] else unknown
        if words and not words[0].startswith("-"):
            model = words[0]
    if model is None:
        model = "simulator-model"
    served = args.served_model_name or [model]
    max_model_len = args.sim_max_model_len or args.max_model_len_alias or 2048
    try:
        engine = sim_engine.engine_profile_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    if engine is not None and engine.num_blocks * engine.block_size < max_model_len:
        # vLLM refuses to start when one sequence of max_model_len tokens cannot fit the KV cache.
        parser.error(f"the KV cache ({engine.num_blocks * engine.block_size} tokens) is smaller than "
                     f"max_model_len ({max_model_len})")
    return SimConfig(
        model=model,
        served_model_names=served,
        host=args.host,
        port=args.port,
        start_delay=args.sim_start_delay,
        ttft=args.sim_ttft,
        itl=args.sim_itl,
        output_tokens=args.sim_output_tokens,
        crash_after=args.sim_crash_after,
        exit_at_start=args.sim_exit_at_start,
        hang_after=args.sim_hang_after,
        fail_every=args.sim_fail_every,
        sleep_delay=args.sim_sleep_delay,
        wake_delay=args.sim_wake_delay,
        max_model_len=max_model_len,
        engine=engine,
        ignored=unknown,
    )


# --------------------------------------------------------------------------------------------
# Errors (vLLM's shape: {"error": {"message", "type", "param", "code"}})
# --------------------------------------------------------------------------------------------


class RequestError(Exception):
    """A client-facing error answered in vLLM's error shape."""

    def __init__(self, message: str, status: int = 400, err_type: str = "BadRequestError",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.err_type = err_type
        self.param = param

    def body(self) -> dict[str, Any]:
        """The JSON object vLLM answers with (file system paths in the message hidden, as vLLM does)."""
        return {"error": {"message": sanitize_message(self.message), "type": self.err_type,
                          "param": self.param, "code": self.status}}


    def response(self) -> web.Response:
        """The error as an HTTP response."""
        return web.Response(body=_dumps(self.body()), status=self.status,
                            content_type="application/json")


_PATH_RES = (re.compile(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+"),
             re.compile(r"(?:/[\w\-]+)+/[\w\-]+\.\w+"))


def sanitize_message(message: str) -> str:
    """vLLM replaces absolute paths in error messages with <path> (served model names included)."""
    for pattern in _PATH_RES:
        message = pattern.sub("<path>", message)
    return message.strip()


# --------------------------------------------------------------------------------------------
# Request parsing and deterministic generation
# --------------------------------------------------------------------------------------------


def validation_error(loc: str, kind: str, msg: str, value: Any,
                     ctx: dict[str, Any] | None = None) -> RequestError:
    """A request-model validation failure as vLLM answers it: type "Bad Request", param the location."""
    shown = f"<{type(value).__name__} of {len(value)} items>" if isinstance(value, (dict, list)) else str(value)
    context = f", 'ctx': {ctx!r}" if ctx else ""
    return RequestError(f"1 validation error:\n  {{'type': '{kind}', 'loc': '{loc}', 'msg': '{msg}', "
                        f"'input': {shown!r}{context}}}", err_type="Bad Request", param=loc)


def _lax_int(name: str, value: Any) -> int:
    # pydantic's lax mode, as in vLLM's request models: true/false, 2.0 and "7" are integers too.
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise validation_error(f"body.{name}", "int_from_float",
                               "Input should be a valid integer, got a number with a fractional part", value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise validation_error(f"body.{name}", "int_parsing",
                                   "Input should be a valid integer, unable to parse string as an integer",
                                   value) from None
    raise validation_error(f"body.{name}", "int_type", "Input should be a valid integer", value)


def _opt_int(body: dict[str, Any], name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    number = _lax_int(name, value)
    if number < minimum:
        if name == "n":  # vLLM's n check names no parameter
            raise RequestError(f"n must be at least {minimum}, got {number}.")
        raise RequestError(f"{name} must be at least {minimum}, got {number}. "
                           f"(parameter={name}, value={number})", param=name)
    return number


def _opt_number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, (bool, int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise validation_error(f"body.{name}", "float_parsing" if isinstance(value, str) else "float_type",
                           "Input should be a valid number", value)


_TRUE_WORDS = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE_WORDS = frozenset({"0", "off", "f", "false", "n", "no"})


def _opt_bool(body: dict[str, Any], name: str, loc: str = "body") -> bool:
    value = body.get(name)
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    # pydantic's lax mode: 0/1 and words such as "yes" or "off" are booleans too.
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
        return value.strip().lower() in _TRUE_WORDS
    raise validation_error(f"{loc}.{name}", "bool_parsing" if isinstance(value, str) else "bool_type",
                           "Input should be a valid boolean", value)


def _count_words(text: str) -> int:
    return len(text.split())


def _message_text(message: Any, index: int) -> str:
    if not isinstance(message, dict):
        raise RequestError(f"messages[{index}] must be an object", param="messages")
    role = message.get("role")
    if not isinstance(role, str):
        raise RequestError(f"messages[{index}].role must be a string", param="messages")
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if not isinstance(part, dict):
                raise RequestError(f"messages[{index}].content parts must be objects",
                                   param="messages")
            text = part.get("text")
            if isinstance(text, str):
                parts.append(text)
        return " ".join(parts)
    raise RequestError(f"messages[{index}].content must be a string or a list of parts",
                       param="messages")


@dataclass
class GenRequest:
    """A validated completion or chat request, reduced to what generation needs."""

    chat: bool
    model: str
    prompts: list[str]  # the canonical text of each prompt (one for chat)
    prompt_tokens: list[int]  # tokens of each prompt
    max_tokens: int | None
    n: int
    stream: bool
    include_usage: bool
    continuous_usage: bool
    stop: list[str]
    include_stop: bool
    seed: int | None
    temperature: float | None
    top_p: float | None
    logprobs: int | None  # completions: top-k; chat: top_logprobs when logprobs is true
    response_format: str | None  # None, "json_object" or "json_schema"
    json_schema: dict[str, Any] | None
    max_tokens_param: str = "max_tokens"  # the field that set max_tokens (named in vLLM's errors)


def parse_request(body: Any, chat: bool) -> GenRequest:
    """Validate a decoded JSON body the way vLLM's pydantic models would (400 on bad input)."""
    if not isinstance(body, dict):
        raise validation_error("body", "model_attributes_type",
                               "Input should be a valid dictionary or object to extract fields from", body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise validation_error("body.model", "string_type", "Input should be a valid string", model)
    prompts: list[str] = []
    prompt_tokens: list[int] = []
    if chat:
        messages = body.get("messages")
        if messages is None:
            raise validation_error("body.messages", "missing", "Field required", body)
        if not isinstance(messages, list):
            raise validation_error("body.messages", "list_type", "Input should be a valid list", messages)
        if not messages:
            raise RequestError("Cannot apply chat template to an empty conversation. "
                               "Provide at least one message.")
        texts: list[str] = []
        tokens = CHAT_TOKENS_REPLY_PRIMER
        for index, message in enumerate(messages):
            text = _message_text(message, index)
            texts.append(f"{message['role']}:{text}")
            tokens += CHAT_TOKENS_PER_MESSAGE + _count_words(text)
        prompts.append("\n".join(texts))
        prompt_tokens.append(tokens)
    else:
        prompt = body.get("prompt")
        if prompt is None or prompt == "" or prompt == []:
            raise RequestError("Either prompt or prompt_embeds must be provided and non-empty. "
                               "(parameter=prompt)", param="prompt")
        if isinstance(prompt, str):
            prompts.append(prompt)
            prompt_tokens.append(_count_words(prompt))
        elif isinstance(prompt, list) and prompt and all(
                isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            prompts.append(" ".join(map(str, prompt)))
            prompt_tokens.append(len(prompt))
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts.extend(prompt)
            prompt_tokens.extend(_count_words(p) for p in prompt)
        elif isinstance(prompt, list) and prompt and all(
                isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
            prompts.extend(" ".join(map(str, p)) for p in prompt)
            prompt_tokens.extend(len(p) for p in prompt)
        else:
            raise RequestError("'prompt' must be a string, a list of strings, a list of token "
                               "ids or a list of lists of token ids", param="prompt")
    max_tokens = _opt_int(body, "max_tokens", 1)
    max_tokens_param = "max_tokens"
    if chat:
        max_completion = _opt_int(body, "max_completion_tokens", 1)
        if max_completion is not None:
            max_tokens, max_tokens_param = max_completion, "max_completion_tokens"
    n = _opt_int(body, "n", 1)
    n = 1 if n is None else n
    stream = _opt_bool(body, "stream")
    include_usage = continuous_usage = False
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise RequestError("'stream_options' must be an object", param="stream_options")
        if not stream:
            raise RequestError("Stream options can only be defined when `stream=True`. "
                               "(parameter=stream_options)", param="stream_options")
        include_usage = _opt_bool(stream_options, "include_usage", "body.stream_options")
        continuous_usage = _opt_bool(stream_options, "continuous_usage_stats", "body.stream_options")
    stop_value = body.get("stop")
    if stop_value is None:
        stop: list[str] = []
    elif isinstance(stop_value, str):
        stop = [stop_value] if stop_value else []
    elif isinstance(stop_value, list) and all(isinstance(s, str) for s in stop_value):
        stop = [s for s in stop_value if s]
    else:
        raise RequestError("'stop' must be a string or a list of strings", param="stop")
    seed = _opt_int(body, "seed", -(2**63))
    temperature = _opt_number(body, "temperature")
    if temperature is not None and temperature < 0:
        raise RequestError(f"temperature must be non-negative, got {temperature}. "
                           f"(parameter=temperature, value={temperature})", param="temperature")
    top_p = _opt_number(body, "top_p")
    logprobs: int | None
    if chat:
        if _opt_bool(body, "logprobs"):
            top = _opt_int(body, "top_logprobs", 0)
            logprobs = 0 if top is None else top
        else:
            if body.get("top_logprobs") not in (None, 0):
                raise RequestError("when using `top_logprobs`, `logprobs` must be set to true. "
                                   "(parameter=top_logprobs)", param="top_logprobs")
            logprobs = None
    else:
        logprobs = _opt_int(body, "logprobs", 0)
    if logprobs is not None and logprobs > 20:
        raise RequestError(f"Requested sample logprobs of {logprobs}, which is greater than "
                           f"max allowed: 20 (parameter=logprobs, value={logprobs})", param="logprobs")
    response_format = None
    json_schema = None
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
            raise RequestError("'response_format' must be an object with a 'type'",
                               param="response_format")
        kind = fmt["type"]
        if kind not in ("text", "json_object", "json_schema", "structural_tag"):
            raise RequestError(f"Unsupported response_format type {kind!r}",
                               param="response_format")
        if kind in ("json_object", "json_schema"):
            response_format = kind
            if kind == "json_schema":
                wrapper = fmt.get("json_schema")
                schema = wrapper.get("schema") if isinstance(wrapper, dict) else None
                json_schema = schema if isinstance(schema, dict) else {}
    return GenRequest(
        chat=chat, model=model or "", prompts=prompts, prompt_tokens=prompt_tokens,
        max_tokens=max_tokens, n=n, stream=stream, include_usage=include_usage,
        continuous_usage=continuous_usage, stop=stop,
        include_stop=_opt_bool(body, "include_stop_str_in_output"), seed=seed,
        temperature=temperature, top_p=top_p, logprobs=logprobs,
        response_format=response_format, json_schema=json_schema, max_tokens_param=max_tokens_param)


@dataclass
class Choice:
    """One generated sequence: its token texts (as streamed), finish reason and logprobs."""

    index: int
    pieces: list[str]  # the text each streamed chunk carries, one token each
    finish_reason: str
    stop_reason: str | None
    logprobs: list[tuple[float, list[tuple[str, float]]]] | None  # per piece: (lp, top-k)

    @property
    def text(self) -> str:
        """The whole output text."""
        return "".join(self.pieces)


def _json_value(schema: Any, rng: random.Random) -> Any:
    kind = schema.get("type") if isinstance(schema, dict) else None
    if isinstance(schema, dict) and isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    if kind == "integer":
        return rng.randrange(100)
    if kind == "number":
        return rng.randrange(1000) / 10
    if kind == "boolean":
        return bool(rng.randrange(2))
    if kind == "array":
        return []
    if kind == "object":
        props = schema.get("properties") if isinstance(schema, dict) else None
        if isinstance(props, dict):
            return {key: _json_value(sub, rng) for key, sub in props.items()}
        return {}
    if kind == "null":
        return None
    return VOCABULARY[rng.randrange(_VOCAB_SIZE)]


def _json_pieces(req: GenRequest, rng: random.Random, words: int) -> list[str]:
    """A small valid JSON object split into token-sized pieces."""
    if req.response_format == "json_schema" and req.json_schema:
        value = _json_value(req.json_schema, rng)
        if not isinstance(value, dict):
            value = {"value": value}
    else:
        value = {"answer": " ".join(VOCABULARY[rng.randrange(_VOCAB_SIZE)]
                                    for _ in range(max(1, words)))}
    # A piece is optional leading whitespace plus a run of non-space characters: token-like.
    return _PIECE_RE.findall(json.dumps(value))


def _rng_for(req: GenRequest, prompt: str, index: int) -> random.Random:
    # Greedy sampling gives every choice the same text; sampled choices differ by index.
    greedy = req.temperature == 0
    key = f"{req.chat}\x00{prompt}\x00{req.seed}\x00{req.temperature}\x00{req.top_p}\x00" \
          f"{req.response_format}\x00{0 if greedy else index}"
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def generate(req: GenRequest, prompt: str, index: int, limit: int, natural_stop: bool) -> Choice:
    """The deterministic output for one choice: the same request always gives the same text."""
    rng = _rng_for(req, prompt, index)
    if req.response_format:
        # The whole object when it fits (a natural stop), else cut at the limit as vLLM would.
        state = rng.getstate()
        words = max(1, min(limit, 64) - 1)
        while True:
            rng.setstate(state)
            raw = _json_pieces(req, rng, words)
            if len(raw) <= limit or words == 1 or req.response_format == "json_schema":
                break
            words -= 1
        natural_stop = len(raw) <= limit
        raw = raw[:limit]
    else:
        raw = []
        for position in range(limit):
            word = VOCABULARY[rng.randrange(_VOCAB_SIZE)]
            raw.append(word if position == 0 and req.chat else " " + word)
    finish_reason = "stop" if natural_stop else "length"
    stop_reason: str | None = None
    pieces = raw
    if req.stop:
        pieces = []
        text = ""
        for piece in raw:
            scan_from = max(0, len(text) - max(len(s) for s in req.stop))
            text += piece
            hit_at = -1
            hit: str | None = None
            for candidate in req.stop:
                at = text.find(candidate, scan_from)
                if at != -1 and (hit_at == -1 or at < hit_at):
                    hit_at, hit = at, candidate
            if hit is None:
                pieces.append(piece)
                continue
            end = hit_at + len(hit) if req.include_stop else hit_at
            keep = end - (len(text) - len(piece))
            pieces.append(piece[:max(0, keep)])
            finish_reason, stop_reason = "stop", hit
            break
    logprobs = None
    if req.logprobs is not None:
        logprobs = []
        k = req.logprobs
        for piece in pieces:
            chosen = -round(rng.random() * 2.0, 4)
            # The sampled token ranks first; the rest are distinct, less likely words.
            top: list[tuple[str, float]] = [(piece, chosen)]
            lower = chosen
            offset = rng.randrange(_VOCAB_SIZE)
            spaced = piece != piece.lstrip()
            for rank in range(1, k):
                lower = round(lower - 0.1 - rng.random(), 4)
                word = VOCABULARY[(offset + rank) % _VOCAB_SIZE]
                if word == piece.strip():
                    offset += 1
                    word = VOCABULARY[(offset + rank) % _VOCAB_SIZE]
                top.append((" " + word if spaced else word, lower))
            logprobs.append((chosen, top))
    return Choice(index=index, pieces=pieces, finish_reason=finish_reason,
                  stop_reason=stop_reason, logprobs=logprobs)


# --------------------------------------------------------------------------------------------
# Metrics, written in Prometheus text format by hand (no prometheus_client in the image)
# --------------------------------------------------------------------------------------------


class Histogram:
    """A Prometheus histogram with fixed buckets."""

    __slots__ = ("buckets", "counts", "total", "count")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Record one observation."""
        self.total += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break

    def render(self, name: str, help_text: str, labels: str) -> list[str]:
        """The exposition lines of this histogram."""
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        cumulative = 0
        for bound, count in zip(self.buckets, self.counts, strict=False):
            cumulative += count
            lines.append(f'{name}_bucket{{{labels},le="{float(bound)}"}} {float(cumulative)}')
        lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {float(self.count)}')
        lines.append(f"{name}_count{{{labels}}} {float(self.count)}")
        lines.append(f"{name}_sum{{{labels}}} {self.total}")
        return lines


class Metrics:
    """The vLLM metrics the gateway and dashboards read."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        # vLLM 0.32 lists these five reasons; a request aborted by a client disconnect counts in none.
        self.success: dict[str, int] = {"stop": 0, "length": 0, "abort": 0, "error": 0, "repetition": 0}
        self.sleep_level = 0  # 0 awake, 1 weights offloaded, 2 weights discarded
        self.ttft = Histogram(_TTFT_BUCKETS)
        self.e2e = Histogram(_LATENCY_BUCKETS)
        self.itl = Histogram(_ITL_BUCKETS)
        self.prompt_hist = Histogram(_TOKEN_BUCKETS)
        self.gen_hist = Histogram(_TOKEN_BUCKETS)
        # With the contention model on, the gauges report the engine's own state.
        self.engine: sim_engine.Engine | None = None

    def gauges(self) -> tuple[int, int, float]:
        """Running and waiting requests and KV-cache usage (0 to 1)."""
        engine = self.engine
        if engine is None:
            return self.running, self.waiting, min(1.0, self.running / 256)
        # Requests held back while the engine sleeps count as waiting too, as in vLLM.
        return engine.num_running, engine.num_waiting + self.waiting, engine.kv_cache_usage

    def render(self, model_name: str) -> bytes:
        """The whole /metrics page."""
        name_label = model_name.replace("\\", "\\\\").replace('"', '\\"')
        labels = f'engine="0",model_name="{name_label}"'
        running, waiting, kv_usage = self.gauges()
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{labels}}} {float(running)}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{labels}}} {float(waiting)}",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{labels}}} {kv_usage}",
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{{{labels}}} {float(self.prompt_tokens)}",
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{{{labels}}} {float(self.generation_tokens)}",
            "# HELP vllm:request_success_total Count of successfully processed requests.",
            "# TYPE vllm:request_success_total counter",
        ]
        for reason, count in self.success.items():
            lines.append(f'vllm:request_success_total{{engine="0",finished_reason="{reason}",'
                         f'model_name="{name_label}"}} {float(count)}')
        if self.engine is not None:
            lines += ["# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.",
                      "# TYPE vllm:num_preemptions_total counter",
                      f"vllm:num_preemptions_total{{{labels}}} {float(self.engine.num_preemptions)}"]
        lines += [
            "# HELP vllm:engine_sleep_state Engine sleep state; awake = 0 means engine is sleeping; "
            "awake = 1 means engine is awake; weights_offloaded = 1 means sleep level 1; "
            "discard_all = 1 means sleep level 2.",
            "# TYPE vllm:engine_sleep_state gauge",
        ]
        for level, state in enumerate(("awake", "weights_offloaded", "discard_all")):
            lines.append(f'vllm:engine_sleep_state{{{labels},sleep_state="{state}"}} '
                         f"{1.0 if self.sleep_level == level else 0.0}")
        lines += self.ttft.render("vllm:time_to_first_token_seconds",
                                  "Histogram of time to first token in seconds.", labels)
        lines += self.itl.render("vllm:inter_token_latency_seconds",
                                 "Histogram of inter-token latency in seconds.", labels)
        lines += self.e2e.render("vllm:e2e_request_latency_seconds",
                                 "Histogram of e2e request latency in seconds.", labels)
        lines += self.prompt_hist.render("vllm:request_prompt_tokens",
                                         "Number of prefill tokens processed.", labels)
        lines += self.gen_hist.render("vllm:request_generation_tokens",
                                      "Number of generation tokens processed.", labels)
        return ("\n".join(lines) + "\n").encode()


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------

_SSE_DONE = b"data: [DONE]\n\n"
_SHUTDOWN_TIMEOUT = 1.0


class _FixedPacer:
    """The default timing: a fixed time to first token, then tokens on an absolute ITL schedule."""

    handler_observes = True  # the handler observes TTFT itself

    def __init__(self, ttft: float, itl: float) -> None:
        self.ttft = ttft
        self.itl = itl
        self._first_at = 0.0

    async def first_token(self) -> None:
        """Wait until the first token exists."""
        if self.ttft:
            await asyncio.sleep(self.ttft)

    async def token(self, position: int) -> None:
        """Wait until the token at `position` (0-based) exists in every choice that has one.

        Tokens follow an absolute schedule (first token + position x ITL), as an engine generates them
        whether or not the API process sends them promptly: a late wake-up on a busy machine is caught
        up instead of pushing every later token back.
        """
        loop = asyncio.get_running_loop()
        if position == 0:
            self._first_at = loop.time()
            return
        if self.itl:
            delay = self._first_at + position * self.itl - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)

    async def finished(self, longest: int) -> None:
        """Wait (after the first token) until every choice is complete."""
        if self.itl and longest > 1:
            await asyncio.sleep(self.itl * (longest - 1))

    def close(self) -> None:
        """Nothing to release."""


class _EnginePacer:
    """Timing from the contention model: one engine sequence per choice, tokens as steps produce them."""

    handler_observes = False  # the engine loop observes TTFT and ITL per token, as vLLM does

    def __init__(self, loop: sim_engine.EngineLoop, prompt_tokens: list[int], lengths: list[int],
                 priority: int) -> None:
        self._loop = loop
        self._changed = asyncio.Event()
        # vLLM generates at least one token even when the text ends up empty (a stop string at once).
        self.seqs = [sim_engine.Sequence(max(1, prompt), max(1, length), priority,
                                         on_update=self._updated)
                     for prompt, length in zip(prompt_tokens, lengths, strict=False)]
        submitted: list[sim_engine.Sequence] = []
        try:
            for seq in self.seqs:
                loop.submit(seq)
                submitted.append(seq)
        except ValueError:
            for seq in submitted:
                loop.abort(seq)
            raise

    def _updated(self, _seq: sim_engine.Sequence) -> None:
        self._changed.set()

    async def _until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self._changed.clear()
            await self._changed.wait()

    async def first_token(self) -> None:
        """Wait until every choice has its first token."""
        await self._until(lambda: all(s.output_tokens >= 1 for s in self.seqs))

    async def token(self, position: int) -> None:
        """Wait until the token at `position` exists in every choice that has one."""
        await self._until(lambda: all(s.output_tokens >= min(position + 1, s.max_tokens)
                                      for s in self.seqs))

    async def finished(self, _longest: int) -> None:
        """Wait until every choice is complete."""
        await self._until(lambda: all(s.finished for s in self.seqs))

    def close(self) -> None:
        """Abort what is unfinished (the client went away): its KV blocks are freed."""
        for seq in self.seqs:
            if not seq.finished:
                self._loop.abort(seq)


class Simulator:
    """The simulated runtime's state and request handlers."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.served = set(config.served_model_names)
        self.model_name = config.served_model_names[0]
        self.metrics = Metrics()
        self.generation_requests = 0
        self.sleeping = False
        self.awake = asyncio.Event()
        self.awake.set()
        self.created = int(time.time())
        self._hung: list[asyncio.Future[None]] = []
        self.engine_loop: sim_engine.EngineLoop | None = None
        if config.engine is not None:
            engine = sim_engine.Engine(config.engine, clock=time.monotonic)
            self.metrics.engine = engine
            self.engine_loop = sim_engine.EngineLoop(engine, on_step=self._engine_step_done)

    # -- app ---------------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """The aiohttp application with vLLM's routes."""
        app = web.Application(middlewares=[self._log_middleware], client_max_size=64 * 1024**2)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ping", self.health)
        app.router.add_get("/version", self.version)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_post("/sleep", self.sleep)
        app.router.add_post("/wake_up", self.wake_up)
        app.router.add_get("/is_sleeping", self.is_sleeping)
        app.on_shutdown.append(self._release_hung)
        if self.engine_loop is not None:
            app.on_startup.append(self._start_engine)
            app.on_cleanup.append(self._stop_engine)
        return app

    async def _start_engine(self, _app: web.Application) -> None:
        assert self.engine_loop is not None
        self.engine_loop.start()

    async def _stop_engine(self, _app: web.Application) -> None:
        assert self.engine_loop is not None
        await self.engine_loop.stop()

    def _engine_step_done(self, output: sim_engine.StepOutput) -> None:
        # vLLM observes TTFT and ITL in the engine's output processing, once per generated token.
        metrics = self.metrics
        for seq in output.emitted:
            if seq.output_tokens == 1:
                metrics.ttft.observe(output.ended - (seq.arrival_time or output.ended))
            else:
                metrics.itl.observe(seq.last_gap)

    async def _release_hung(self, _app: web.Application) -> None:
        for future in self._hung:
            if not future.done():
                future.cancel()

    @web.middleware
    async def _log_middleware(self, request: web.Request,
                              handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                              ) -> web.StreamResponse:
        started = time.monotonic()
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            # Unknown routes and methods: vLLM (FastAPI) answers {"detail": "Not Found"}.
            response = web.Response(body=_dumps({"detail": exc.reason}), status=exc.status,
                                    content_type="application/json")
        except asyncio.CancelledError:
            raise
        except ConnectionResetError:
            # Nothing can be sent to a client that has gone; keep the server quiet about it.
            raise
        except Exception as exc:
            log(f"internal error on {request.method} {request.path}: {exc!r}")
            response = RequestError(f"Internal server error: {exc}", status=500,
                                    err_type="InternalServerError").response()
        log(f'{request.remote} "{request.method} {request.path_qs}" {response.status} '
            f"{(time.monotonic() - started) * 1000:.1f}ms")
        return response

    # -- simple endpoints --------------------------------------------------------------------

    async def health(self, _request: web.Request) -> web.Response:
        """200 with an empty body once listening."""
        return web.Response(status=200)

    async def version(self, _request: web.Request) -> web.Response:
        """vLLM's /version."""
        return web.Response(body=_dumps({"version": VERSION}), content_type="application/json")

    async def models(self, _request: web.Request) -> web.Response:
        """vLLM's /v1/models: one card per served name."""
        data = [{"id": name, "object": "model", "created": self.created, "owned_by": "vllm",
                 "root": self.config.model, "parent": None,
                 "max_model_len": self.config.max_model_len,
                 "permission": [{"id": f"modelperm-{uuid.uuid4().hex}",
                                 "object": "model_permission", "created": self.created,
                                 "allow_create_engine": False, "allow_sampling": True,
                                 "allow_logprobs": True, "allow_search_indices": False,
                                 "allow_view": True, "allow_fine_tuning": False,
                                 "organization": "*", "group": None, "is_blocking": False}]}
                for name in self.config.served_model_names]
        return web.Response(body=_dumps({"object": "list", "data": data}),
                            content_type="application/json")

    async def metrics_page(self, _request: web.Request) -> web.Response:
        """Prometheus text with vLLM's metric names."""
        return web.Response(body=self.metrics.render(self.model_name),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def sleep(self, request: web.Request) -> web.Response:
        """Put the engine to sleep (level 0 to 2); generation waits until wake-up."""
        raw = request.query.get("level", "1")
        try:
            level = int(raw)
        except ValueError:
            return validation_error("query.level", "int_parsing", "Input should be a valid integer, "
                                    "unable to parse string as an integer", raw).response()
        if not 0 <= level <= 2:
            kind, msg, ctx = (("less_than_equal", "Input should be less than or equal to 2", {"le": 2})
                              if level > 2 else
                              ("greater_than_equal", "Input should be greater than or equal to 0", {"ge": 0}))
            return validation_error("query.level", kind, msg, raw, ctx).response()
        if self.config.sleep_delay:
            await asyncio.sleep(self.config.sleep_delay)
        self.sleeping = True
        self.awake.clear()
        self.metrics.sleep_level = max(level, 1)
        log(f"engine is sleeping (level {level})")
        return web.Response(body=_dumps({"status": "sleeping", "level": level}),
                            content_type="application/json")

    async def wake_up(self, request: web.Request) -> web.Response:
        """Wake the engine; requests that waited start running."""
        if self.sleeping and self.config.wake_delay:
            await asyncio.sleep(self.config.wake_delay)
        self.sleeping = False
        self.awake.set()
        self.metrics.sleep_level = 0
        log("engine is awake")
        tags = request.query.getall("tags", []) or None
        return web.Response(body=_dumps({"status": "awake", "tags": tags}),
                            content_type="application/json")

    async def is_sleeping(self, _request: web.Request) -> web.Response:
        """{"is_sleeping": bool}."""
        return web.Response(body=_dumps({"is_sleeping": self.sleeping}),
                            content_type="application/json")

    # -- generation --------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/completions."""
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions."""
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        raw = await request.read()
        try:
            try:
                body = json.loads(raw)
            except ValueError as exc:
                raise RequestError(
                    "1 validation error:\n  {'type': 'json_invalid', 'loc': 'body.0', 'msg': 'JSON decode "
                    f"error', 'input': '<dict of 0 items>', 'ctx': {{'error': '{getattr(exc, 'msg', exc)}'}}}}",
                    err_type="Bad Request", param="body.0") from None
            req = parse_request(body, chat)
            if req.model and req.model not in self.served:
                raise RequestError(f"The model `{req.model}` does not exist. Valid aliases: "
                                   f"{', '.join(self.config.served_model_names)}.", status=404,
                                   err_type="NotFoundError", param="model")
            req.model = req.model or self.model_name
            limits = self._output_limits(req)
            priority = self._priority(body, request) if self.engine_loop is not None else 0
        except RequestError as error:
            return error.response()
        config = self.config
        self.generation_requests += 1
        number = self.generation_requests
        crash = config.crash_after is not None and number > config.crash_after
        if config.hang_after is not None and number > config.hang_after:
            log(f"request {number} hangs (--sim-hang-after {config.hang_after})")
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._hung.append(future)
            await future
        if config.fail_every is not None and number % config.fail_every == 0:
            return RequestError(f"Simulated engine failure on request {number} "
                                f"(--sim-fail-every {config.fail_every})", status=500,
                                err_type="InternalServerError").response()
        metrics = self.metrics
        arrived = time.monotonic()
        if not self.awake.is_set():
            metrics.waiting += 1
            try:
                await self.awake.wait()
            finally:
                metrics.waiting -= 1
        metrics.running += 1
        try:
            choices = [generate(req, prompt, p * req.n + i, limit, natural)
                       for p, (prompt, (limit, natural)) in enumerate(zip(req.prompts, limits, strict=False))
                       for i in range(req.n)]
            # Choices are numbered prompt-major; each knows which prompt it belongs to.
            prompt_of = [p for p in range(len(req.prompts)) for _ in range(req.n)]
            prompt_total = sum(req.prompt_tokens)
            if crash and not req.stream:
                self._crash(number)
            pacer = self._pacer(req, choices, prompt_of, priority)
            try:
                if req.stream:
                    response = await self._stream(request, req, choices, prompt_of, arrived,
                                                  crash, number, pacer)
                else:
                    response = await self._complete(req, choices, arrived, pacer)
            except (asyncio.CancelledError, ConnectionResetError):
                # The client went away (aiohttp 3.8 cancels the handler; later versions fail
                # the write): vLLM aborts the request.
                log(f"request {number} aborted: client disconnected")
                raise
            finally:
                pacer.close()
            completion_total = sum(len(c.pieces) for c in choices)
            metrics.prompt_tokens += prompt_total
            metrics.generation_tokens += completion_total
            metrics.prompt_hist.observe(prompt_total)
            metrics.gen_hist.observe(completion_total)
            metrics.e2e.observe(time.monotonic() - arrived)
            for choice in choices:
                metrics.success[choice.finish_reason] = metrics.success.get(
                    choice.finish_reason, 0) + 1
            return response
        finally:
            metrics.running -= 1

    def _priority(self, body: dict[str, Any], request: web.Request) -> int:
        """The request's scheduling priority: vLLM's X-Vllm-Priority header, else the body field.

        vLLM 0.32 accepts a priority under either policy (it only orders by it under "priority").
        """
        header = request.headers.get("X-Vllm-Priority")
        if header is not None:
            try:
                return int(header)
            except ValueError:
                pass  # vLLM ignores a header that is not an integer
        value = body.get("priority")
        if value is None:
            return 0
        number = _lax_int("priority", value)
        if number >= 2**63:
            raise validation_error("body.priority", "less_than_equal",
                                   f"Input should be less than or equal to {2**63 - 1}", value, {"le": 2**63 - 1})
        if number < -(2**63):
            raise validation_error("body.priority", "greater_than_equal",
                                   f"Input should be greater than or equal to {-(2**63)}", value, {"ge": -(2**63)})
        return number

    def _pacer(self, req: GenRequest, choices: list[Choice], prompt_of: list[int],
               priority: int) -> _FixedPacer | _EnginePacer:
        if self.engine_loop is None:
            return _FixedPacer(self.config.ttft, self.config.itl)
        try:
            return _EnginePacer(self.engine_loop, [req.prompt_tokens[p] for p in prompt_of],
                                [len(c.pieces) for c in choices], priority)
        except ValueError as exc:
            raise RequestError(str(exc)) from None

    def _output_limits(self, req: GenRequest) -> list[tuple[int, bool]]:
        """Per prompt: how many tokens to generate and whether ending there is a natural stop."""
        max_len = self.config.max_model_len
        if req.max_tokens is not None and req.max_tokens > max_len:
            name = req.max_tokens_param
            raise RequestError(f"{name}={req.max_tokens} cannot be greater than max_model_len={max_len}. "
                               f"Please request fewer output tokens. (parameter={name}, value={req.max_tokens})",
                               param=name)
        limits: list[tuple[int, bool]] = []
        for text, tokens in zip(req.prompts, req.prompt_tokens, strict=False):
            # vLLM bounds the characters before tokenizing (its tokenizer's longest token times the
            # context length), then the tokens; it tokenizes at most max_len + 1 of them ("at least").
            max_chars = max_len * _MAX_CHARS_PER_TOKEN
            if len(text) > max_chars:
                raise RequestError(
                    f"This model's maximum context length is {max_len} tokens. However, your prompt "
                    f"contains {len(text)} characters (more than {max_chars} characters, which is the upper "
                    f"bound for {max_len} input tokens). Please reduce the length of the input prompt. "
                    f"(parameter=input_text, value={len(text)})", param="input_text")
            if tokens >= max_len:
                count = min(tokens, max_len + 1)
                qualifier = "at least " if count == max_len + 1 else ""
                raise RequestError(
                    f"This model's maximum context length is {max_len} tokens. However, your prompt "
                    f"contains {qualifier}{count} input tokens, which exceeds this limit even without any "
                    f"output tokens. Please reduce the length of the input prompt. "
                    f"(parameter=input_tokens, value={count})", param="input_tokens")
            room = max_len - tokens
            if req.max_tokens is None:
                limits.append((min(self.config.output_tokens, room),
                               self.config.output_tokens <= room))
                continue
            # A max_tokens beyond what the context has room for is cut short (finish_reason "length"),
            # not refused: vLLM 0.32 only refuses one larger than the whole context.
            limits.append((min(req.max_tokens, room), False))
        return limits

    def _crash(self, number: int) -> None:
        log(f"simulated crash on request {number} (--sim-crash-after {self.config.crash_after}); "
            "exiting with status 1")
        os._exit(1)

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
                "completion_tokens": completion_tokens, "prompt_tokens_details": None,
                "completion_tokens_details": None}

    @staticmethod
    def _stream_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        # In streams vLLM drops the None fields (prompt/completion_tokens_details) from usage.
        return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
                "completion_tokens": completion_tokens}

    @staticmethod
    def _completion_logprobs(choice: Choice, start: int = 0, stop: int | None = None,
                             offset: int = 0) -> dict[str, Any]:
        assert choice.logprobs is not None
        end = len(choice.pieces) if stop is None else stop
        tokens: list[str] = []
        token_logprobs: list[float] = []
        top_logprobs: list[dict[str, float]] = []
        text_offset: list[int] = []
        for piece, (lp, top) in zip(choice.pieces[start:end], choice.logprobs[start:end], strict=False):
            tokens.append(piece)
            token_logprobs.append(lp)
            top_logprobs.append(dict(top))  # sampled token + top-k, deduplicated
            text_offset.append(offset)
            offset += len(piece)
        return {"text_offset": text_offset, "token_logprobs": token_logprobs, "tokens": tokens,
                "top_logprobs": top_logprobs}

    @staticmethod
    def _chat_logprobs(choice: Choice, top_k: int, start: int = 0,
                       stop: int | None = None) -> dict[str, Any]:
        assert choice.logprobs is not None
        end = len(choice.pieces) if stop is None else stop
        content = []
        for piece, (lp, top) in zip(choice.pieces[start:end], choice.logprobs[start:end], strict=False):
            content.append({
                "token": piece, "logprob": lp, "bytes": list(piece.encode()),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                 for t, v in top[:top_k]],
            })
        return {"content": content}

    async def _complete(self, req: GenRequest, choices: list[Choice], arrived: float,
                        pacer: _FixedPacer | _EnginePacer) -> web.Response:
        longest = max((len(c.pieces) for c in choices), default=0)
        await pacer.first_token()
        if pacer.handler_observes:
            self.metrics.ttft.observe(time.monotonic() - arrived)
        await pacer.finished(longest)
        completion_tokens = sum(len(c.pieces) for c in choices)
        usage = self._usage(sum(req.prompt_tokens), completion_tokens)
        created = int(time.time())
        top_k = req.logprobs or 0
        if req.chat:
            out_choices = []
            for c in choices:
                out_choices.append({
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text, "refusal": None,
                                "annotations": None, "audio": None, "function_call": None,
                                "reasoning": None},
                    "logprobs": (self._chat_logprobs(c, top_k)
                                 if c.logprobs is not None else None),
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                    "token_ids": None, "routed_experts": None,
                })
            body = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                    "created": created, "model": req.model, "choices": out_choices,
                    "service_tier": None, "system_fingerprint": SYSTEM_FINGERPRINT,
                    "usage": usage, "prompt_logprobs": None, "prompt_token_ids": None,
                    "prompt_text": None, "kv_transfer_params": None, "ec_transfer_params": None,
                    "metrics": None}
        else:
            out_choices = []
            for c in choices:
                out_choices.append({
                    "index": c.index, "text": c.text,
                    "logprobs": self._completion_logprobs(c) if c.logprobs is not None else None,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                    "token_ids": None, "prompt_logprobs": None, "prompt_token_ids": None,
                    "routed_experts": None,
                })
            body = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                    "created": created, "model": req.model, "choices": out_choices,
                    "service_tier": None, "system_fingerprint": SYSTEM_FINGERPRINT,
                    "usage": usage, "kv_transfer_params": None, "ec_transfer_params": None,
                    "metrics": None}
        return web.Response(body=_dumps(body), content_type="application/json")

    async def _stream(self, request: web.Request, req: GenRequest, choices: list[Choice],
                      prompt_of: list[int], arrived: float, crash: bool,
                      number: int, pacer: _FixedPacer | _EnginePacer) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        created = int(time.time())
        chat = req.chat
        request_id = f"chatcmpl-{uuid.uuid4().hex}" if chat else f"cmpl-{uuid.uuid4().hex}"
        obj = "chat.completion.chunk" if chat else "text_completion"
        prompt_total = sum(req.prompt_tokens)
        longest = max((len(c.pieces) for c in choices), default=0)
        # Chunks this request would send: role chunks (chat), one per token, one per finish.
        total_chunks = (len(choices) if chat else 0) + sum(len(c.pieces) for c in choices) + \
            len(choices)
        crash_at = max(1, total_chunks // 2) if crash else -1
        sent = 0
        write = response.write

        # vLLM puts system_fingerprint on the last chunk only: the usage chunk when there is one,
        # else the finishing chunk sent last.
        empties = [c.index for c in choices if not c.pieces]
        if req.include_usage:
            final_chunk: tuple[str, int] = ("usage", -1)
        elif empties:
            final_chunk = ("empty", empties[-1])
        else:
            final_chunk = ("token", max((c.index for c in choices if len(c.pieces) == longest), default=-1))

        def frame(choice_list: list[dict[str, Any]], usage: dict[str, Any] | None,
                  final: bool = False, extra: dict[str, Any] | None = None) -> bytes:
            chunk: dict[str, Any] = {"id": request_id, "object": obj, "created": created,
                                     "model": req.model, "choices": choice_list}
            if extra:
                chunk.update(extra)
            # vLLM serializes chunks with exclude_unset: no "usage" key unless it is set.
            if usage is not None:
                chunk["usage"] = usage
            if final:
                chunk["system_fingerprint"] = SYSTEM_FINGERPRINT
            return b"data: " + _dumps(chunk) + b"\n\n"

        async def send(data: bytes) -> None:
            nonlocal sent
            await write(data)
            sent += 1
            if sent == crash_at:
                self._crash(number)

        await pacer.first_token()
        if chat:
            for c in choices:
                usage = self._stream_usage(prompt_total, 0) if req.continuous_usage else None
                await send(frame([{"index": c.index,
                                   "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}], usage,
                                 extra={"prompt_token_ids": None, "prompt_text": None}))
        first = pacer.handler_observes
        top_k = req.logprobs or 0
        generated = [0] * len(choices)
        for position in range(longest):
            await pacer.token(position)
            for c in choices:
                if position >= len(c.pieces):
                    continue
                generated[c.index] += 1
                piece = c.pieces[position]
                last = position == len(c.pieces) - 1
                usage = (self._stream_usage(req.prompt_tokens[prompt_of[c.index]], generated[c.index])
                         if req.continuous_usage else None)
                if chat:
                    out: dict[str, Any] = {
                        "index": c.index, "delta": {"content": piece},
                        "logprobs": (self._chat_logprobs(c, top_k, position, position + 1)
                                     if c.logprobs is not None else None),
                        "finish_reason": c.finish_reason if last else None,
                    }
                    if last:
                        out["stop_reason"] = c.stop_reason
                    out["token_ids"] = None
                else:
                    logprobs = None
                    if c.logprobs is not None:
                        # text_offset counts from the start of this choice's text.
                        offset = sum(len(p) for p in c.pieces[:position])
                        logprobs = self._completion_logprobs(c, position, position + 1, offset)
                    out = {
                        "index": c.index, "text": piece, "logprobs": logprobs,
                        "finish_reason": c.finish_reason if last else None,
                        "stop_reason": c.stop_reason if last else None,
                        "prompt_token_ids": None, "token_ids": None,
                    }
                await send(frame([out], usage, final=final_chunk == ("token", c.index) and last))
            if first:
                first = False
                self.metrics.ttft.observe(time.monotonic() - arrived)
        # A choice that produced no token still needs its finishing chunk.
        for c in choices:
            if not c.pieces:
                usage = self._stream_usage(prompt_total, 0) if req.continuous_usage else None
                if chat:
                    out = {"index": c.index, "delta": {"content": ""}, "logprobs": None,
                           "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                           "token_ids": None}
                else:
                    out = {"index": c.index, "text": "", "logprobs": None,
                           "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                           "prompt_token_ids": None, "token_ids": None}
                await send(frame([out], usage, final=final_chunk == ("empty", c.index)))
        if req.include_usage:
            completion_tokens = sum(len(c.pieces) for c in choices)
            await send(frame([], self._stream_usage(prompt_total, completion_tokens), final=True))
        if crash:
            self._crash(number)
        await write(_SSE_DONE)
        await response.write_eof()
        return response


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


async def serve(config: SimConfig) -> None:
    """Wait the start delay, listen, and serve until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Handlers first: as PID 1 in a container, a signal without a handler is ignored, and
    # `docker stop` during the start delay would wait for its timeout.
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix
            pass
    if config.start_delay:
        log(f"loading weights (simulated, {config.start_delay:g}s)")
        try:
            await asyncio.wait_for(stop.wait(), config.start_delay)
            log("stopped while loading")
            return
        except TimeoutError:
            pass
    simulator = Simulator(config)
    app = simulator.make_app()
    # Stop fast, as vLLM does, instead of waiting 60 s for open streams; aiohttp 3.8 takes the
    # timeout on the site, later versions on the runner.
    runner_kwargs: dict[str, Any] = {"access_log": None, "handle_signals": False}
    site_kwargs: dict[str, Any] = {"reuse_address": True}
    if "shutdown_timeout" in inspect.signature(web.BaseRunner.__init__).parameters:
        runner_kwargs["shutdown_timeout"] = _SHUTDOWN_TIMEOUT
    else:  # pragma: no cover - aiohttp < 3.9 (the Docker image)
        site_kwargs["shutdown_timeout"] = _SHUTDOWN_TIMEOUT
    runner = web.AppRunner(app, **runner_kwargs)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, **site_kwargs)
    await site.start()
    port = config.port
    server = getattr(site, "_server", None)
    if server is not None and server.sockets:
        port = server.sockets[0].getsockname()[1]
    log(f"Started server process [{os.getpid()}]")
    log(f"Uvicorn running on http://{config.host}:{port} (Press CTRL+C to quit)")
    log("Application startup complete.")
    try:
        await stop.wait()
    finally:
        log("Shutting down")
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    config = parse_config(sys.argv[1:] if argv is None else argv)
    if config.ignored:
        log(f"ignoring unrecognised arguments: {' '.join(config.ignored)}")
    if config.exit_at_start is not None:
        log(f"simulated start-up failure: exiting with status {config.exit_at_start}")
        return config.exit_at_start
    log(f"simulating vLLM: model={config.model} served_model_names={config.served_model_names} "
        f"max_model_len={config.max_model_len} ttft={config.ttft:g}s itl={config.itl:g}s")
    if config.engine is not None:
        log(f"contention model on: {sim_engine.describe(config.engine)}")
    try:
        asyncio.run(serve(config))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
