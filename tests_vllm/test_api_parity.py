"""The simulator's newer endpoints against the real vLLM: Responses (plain and streamed), tokenize and
detokenize, streamed named tool calls, and, on a tiny pooling model, embeddings, pooling, score and rerank.
Plus the gateway relaying a real Responses stream and accounting its usage.

Shapes (keys and value kinds) and error status/type/param are compared, not texts or numbers: the models
are random and the simulator's tokenizer is one word per token.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests_vllm.conftest import (
    MAX_MODEL_LEN,
    MODELS_DIR,
    REALTIME_MODEL,
    RUNTIME_ENV,
    START_TIMEOUT,
    Gateway,
    vllm_command,
)

M = REALTIME_MODEL
EMBED_MODEL = str(MODELS_DIR / "tiny-llama-embed")
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}


def _simulator(model: str) -> tuple[subprocess.Popen[bytes], str]:
    from tests.conftest import free_port, wait_http

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway.simulator", "--model", model, "--host", "127.0.0.1",
                             "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", proc=proc)
    return proc, url


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    """The simulator serving the realtime model's name with vLLM's context length."""
    proc, url = _simulator(M)
    try:
        yield url
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def pooling_urls() -> Iterator[tuple[str, str]]:
    """A real vLLM serving the tiny pooling model (`--runner pooling`), and a simulator with its name."""
    from tests.conftest import free_port, wait_http

    if not (EMBED_MODEL and os.path.exists(os.path.join(EMBED_MODEL, "config.json"))):
        pytest.fail(f"missing {EMBED_MODEL}: run `make test-vllm` (scripts/make_tiny_models.py makes it)",
                    pytrace=False)
    port = free_port()
    env = {**os.environ, **dict(item.split("=", 1) for item in shlex.split(RUNTIME_ENV))}
    argv = [*shlex.split(vllm_command()), "--model", EMBED_MODEL, "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", str(MAX_MODEL_LEN), "--dtype", "float32", "--enforce-eager", "--runner", "pooling"]
    real = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sim, sim_base = _simulator(EMBED_MODEL)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=START_TIMEOUT, proc=real)
        yield f"http://127.0.0.1:{port}", sim_base
    finally:
        _stop(real)
        _stop(sim)


def shape(value: Any) -> Any:
    """The structure of a JSON value: keys and value kinds, not values (lists by their first item)."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


async def call(base: str, path: str, body: Any) -> tuple[int, Any, bytes]:
    async with aiohttp.ClientSession() as session, session.post(base + path, json=body) as resp:
        raw = await resp.read()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        return resp.status, parsed, raw


def named_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """A Responses stream as (event name, data); every event names itself twice, and there is no [DONE]."""
    out = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        name_line, data_line = block.split("\n", 1)
        assert name_line.startswith("event: ") and data_line.startswith("data: "), block[:200]
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == name_line.removeprefix("event: ")
        out.append((data["type"], data))
    return out


def collapsed(events: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Event names with each run of deltas as one (how many tokens a random model writes varies)."""
    names: list[str] = []
    for name, _ in events:
        if not (names and names[-1] == name and name.endswith(".delta")):
            names.append(name)
    return names


async def test_responses_plain_and_streamed_match(gw: Gateway, sim_url: str) -> None:
    vllm = gw.runtime_url
    body = {"model": M, "input": "hello there", "max_output_tokens": 3}
    v_status, v_body, _ = await call(vllm, "/v1/responses", body)
    s_status, s_body, _ = await call(sim_url, "/v1/responses", body)
    assert v_status == s_status == 200, (v_body, s_body)
    assert shape(s_body) == shape(v_body)
    _, _, v_raw = await call(vllm, "/v1/responses", {**body, "stream": True})
    _, _, s_raw = await call(sim_url, "/v1/responses", {**body, "stream": True})
    v_events, s_events = named_events(v_raw), named_events(s_raw)
    assert collapsed(s_events) == collapsed(v_events)
    assert [d["sequence_number"] for _, d in s_events] == list(range(len(s_events)))
    v_shapes = {name: json.dumps(shape(d), sort_keys=True) for name, d in v_events}
    s_shapes = {name: json.dumps(shape(d), sort_keys=True) for name, d in s_events}
    assert s_shapes == v_shapes
    for events in (v_events, s_events):
        usage = events[-1][1]["response"]["usage"]
        assert usage["output_tokens"] <= 3 and usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    for raw in ({"model": M}, {"model": "nope", "input": "x"}):
        v_status, v_err, _ = await call(vllm, "/v1/responses", raw)
        s_status, s_err, _ = await call(sim_url, "/v1/responses", raw)
        assert v_status == s_status, (raw, v_err, s_err)
        assert (s_err["error"]["type"], s_err["error"]["param"]) == (v_err["error"]["type"], v_err["error"]["param"])


async def test_tokenize_and_detokenize_match(gw: Gateway, sim_url: str) -> None:
    vllm = gw.runtime_url
    for body in ({"model": M, "prompt": "hello world"}, {"prompt": "hello world", "return_token_strs": True},
                 {"model": M, "messages": [{"role": "user", "content": "hi"}]}):
        v_status, v_body, _ = await call(vllm, "/tokenize", body)
        s_status, s_body, _ = await call(sim_url, "/tokenize", body)
        assert v_status == s_status == 200
        assert shape(s_body) == shape(v_body), body
        assert s_body["max_model_len"] == v_body["max_model_len"] == MAX_MODEL_LEN
        for base, tokens in ((vllm, v_body["tokens"]), (sim_url, s_body["tokens"])):
            if "prompt" in body:
                _, back, _ = await call(base, "/detokenize", {"model": M, "tokens": tokens})
                assert back == {"prompt": "hello world"}, base
    for path, body in (("/tokenize", {"model": M}), ("/detokenize", {"model": M}),
                       ("/detokenize", {"model": M, "tokens": [-1]})):
        v_status, v_err, _ = await call(vllm, path, body)
        s_status, s_err, _ = await call(sim_url, path, body)
        assert v_status == s_status == 400, (path, body, v_err, s_err)
        assert (s_err["error"]["type"], s_err["error"]["param"]) == (v_err["error"]["type"], v_err["error"]["param"])


async def test_streamed_named_tool_call_chunks_match(gw: Gateway, sim_url: str) -> None:
    """The chat template of the tiny model ignores tools; a named tool_choice still goes through vLLM's
    structured output, so the streamed call's chunks can be compared (the random weights rarely finish the
    JSON within max_tokens, so the assembled arguments are not). vLLM streams nothing of the call until the
    hermes format has named the function, some forty tokens in with this tokenizer."""
    vllm = gw.runtime_url
    body = {"model": M, "messages": [{"role": "user", "content": "weather?"}], "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "max_tokens": 50,
            "stream": True}

    def tool_chunks(raw: bytes) -> tuple[str, str]:
        chunks = [json.loads(e.removeprefix(b"data: ")) for e in raw.split(b"\n\n")
                  if e.startswith(b"data: {")]
        calls = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("tool_calls")]
        opening = calls[0]["choices"][0]["delta"]
        assert opening["tool_calls"][0]["function"]["name"] == "get_weather"
        assert opening["tool_calls"][0]["id"] and opening["tool_calls"][0]["type"] == "function"
        argument = calls[1]["choices"][0]
        return json.dumps(shape(opening), sort_keys=True), json.dumps(shape(argument), sort_keys=True)

    _, _, v_raw = await call(vllm, "/v1/chat/completions", body)
    _, _, s_raw = await call(sim_url, "/v1/chat/completions", body)
    assert v_raw.endswith(b"data: [DONE]\n\n") and s_raw.endswith(b"data: [DONE]\n\n")
    assert tool_chunks(s_raw) == tool_chunks(v_raw)
    bad = {**body, "stream": False, "tool_choice": {"type": "function", "function": {"name": "nope"}}}
    v_status, v_err, _ = await call(vllm, "/v1/chat/completions", bad)
    s_status, s_err, _ = await call(sim_url, "/v1/chat/completions", bad)
    assert v_status == s_status == 400
    assert s_err["error"] == v_err["error"]


async def test_embeddings_pooling_score_rerank_match(pooling_urls: tuple[str, str]) -> None:
    vllm, sim = pooling_urls
    cases = [
        ("/v1/embeddings", {"model": EMBED_MODEL, "input": "hello world"}),
        ("/v1/embeddings", {"model": EMBED_MODEL, "input": ["a", "b c"]}),
        ("/v1/embeddings", {"model": EMBED_MODEL, "input": "hello", "encoding_format": "base64"}),
        ("/pooling", {"model": EMBED_MODEL, "input": "hello world"}),
        ("/v1/score", {"model": EMBED_MODEL, "queries": "q", "documents": ["a", "b"]}),
        ("/score", {"model": EMBED_MODEL, "text_1": "q", "text_2": "a"}),
        ("/v1/rerank", {"model": EMBED_MODEL, "query": "q", "documents": ["a", "b c", "d"], "top_n": 2}),
        ("/rerank", {"model": EMBED_MODEL, "query": "q", "documents": ["a", "b c"]}),
        ("/v2/rerank", {"model": EMBED_MODEL, "query": "q", "documents": ["a", "b c"]}),
    ]
    for path, body in cases:
        v_status, v_body, _ = await call(vllm, path, body)
        s_status, s_body, _ = await call(sim, path, body)
        assert v_status == s_status == 200, (path, v_body, s_body)
        assert shape(s_body) == shape(v_body), (path, body)
        if path == "/v1/embeddings" and body.get("encoding_format") == "base64":
            v_len = len(base64.b64decode(v_body["data"][0]["embedding"]))
            s_len = len(base64.b64decode(s_body["data"][0]["embedding"]))
            assert v_len == s_len == 4 * 128  # float32, the tiny models' hidden size
        if "rerank" in path:
            for result in (v_body, s_body):
                scores = [r["relevance_score"] for r in result["results"]]
                assert scores == sorted(scores, reverse=True)
                assert len(scores) == (body.get("top_n") or len(body["documents"]))
        if path == "/v1/score":
            assert s_body["usage"]["prompt_tokens"] == v_body["usage"]["prompt_tokens"]  # one token per word here
    for path, body in (("/v1/embeddings", {"model": EMBED_MODEL}), ("/v1/embeddings", {"model": "nope", "input": "x"}),
                       ("/v1/rerank", {"model": EMBED_MODEL, "documents": ["a"]})):
        v_status, v_err, _ = await call(vllm, path, body)
        s_status, s_err, _ = await call(sim, path, body)
        assert v_status == s_status, (path, body, v_err, s_err)
        assert (s_err["error"]["type"], s_err["error"]["param"]) == (v_err["error"]["type"], v_err["error"]["param"])


async def test_gateway_relays_a_real_responses_stream_and_accounts_it(gw: Gateway) -> None:
    before = await gw.usage("realtime")
    events = []
    async with gw.sdk().responses.stream(model=M, input="hello", max_output_tokens=4) as stream:
        async for event in stream:
            events.append(event.type)
        final = await stream.get_final_response()
    assert events[0] == "response.created" and events[-1] == "response.completed"
    assert final.usage is not None and 1 <= final.usage.output_tokens <= 4
    after = await gw.usage("realtime")
    assert after["requests"] == before.get("requests", 0) + 1
    assert after["completion_tokens"] - before.get("completion_tokens", 0) == final.usage.output_tokens
    assert after["prompt_tokens"] - before.get("prompt_tokens", 0) == final.usage.input_tokens
    # A generating vLLM has no /v1/embeddings: the gateway says so instead of relaying FastAPI's 404.
    resp = await gw.post("/v1/embeddings", {"model": M, "input": "x"})
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "endpoint_not_supported"
