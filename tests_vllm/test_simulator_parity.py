"""The simulator (gateway/simulator.py) against the real vLLM, request for request, so the fast suite keeps
telling the truth: response and stream chunk shapes, the usage chunk, error shapes (status, type, param,
code and, where vLLM's wording does not depend on its tokenizer, the message), what vLLM accepts that
looks invalid, /metrics names and labels, and the sleep endpoints.

Both serve the same model name (the tiny model's directory) with the same --max-model-len. Texts, token
counts and timings differ by design; structure does not.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests_vllm.conftest import MAX_MODEL_LEN, REALTIME_MODEL, Gateway

M = REALTIME_MODEL
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    """The simulator serving the same model name with vLLM's context length."""
    from tests.conftest import free_port, wait_http

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway.simulator", "--model", M, "--host", "127.0.0.1",
                             "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", proc=proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def shape(value: Any, key: str = "") -> Any:
    """The structure of a JSON value: keys and value kinds, not values."""
    if value is None:
        return None
    if isinstance(value, dict):
        if key == "top_logprobs":  # completions: a map keyed by token text
            return "<token map>"
        return {k: shape(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0], key)] if value else []
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


async def call(session: aiohttp.ClientSession, base: str, method: str, path: str,
               body: Any = None, raw: bytes | None = None) -> tuple[int, Any, bytes]:
    kwargs: dict[str, Any] = {}
    if raw is not None:
        kwargs = {"data": raw, "headers": {"Content-Type": "application/json"}}
    elif body is not None:
        kwargs = {"json": body}
    async with session.request(method, base + path, **kwargs) as resp:
        data = await resp.read()
        try:
            parsed = json.loads(data) if data and not data.startswith(b"data: ") else None
        except ValueError:
            parsed = None
        return resp.status, parsed, data


def chunks_of(data: bytes) -> list[dict[str, Any]]:
    events = [e for e in data.split(b"\n\n") if e.strip()]
    assert events[-1] == b"data: [DONE]", events[-2:]
    return [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]


def stream_shapes(chunks: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Chunk shapes by kind (role, token, finish, usage)."""
    kinds: dict[str, set[str]] = {}
    for chunk in chunks:
        choices = chunk["choices"]
        if not choices:
            kind = "usage"
        elif "delta" in choices[0] and "role" in choices[0]["delta"]:
            kind = "role"
        elif choices[0].get("finish_reason"):
            kind = "finish"
        else:
            kind = "token"
        # Where system_fingerprint goes is checked on its own: the last chunk only.
        shown = {k: v for k, v in chunk.items() if k != "system_fingerprint"}
        kinds.setdefault(kind, set()).add(json.dumps(shape(shown), sort_keys=True))
    return kinds


@pytest.fixture
async def both(gw: Gateway, sim_url: str) -> tuple[str, str]:
    return gw.runtime_url, sim_url


async def test_response_bodies_have_vllms_fields(gw: Gateway, both: tuple[str, str]) -> None:
    vllm, sim = both
    cases = [
        ("/v1/completions", {"model": M, "prompt": "hello there", "max_tokens": 4, "ignore_eos": True}),
        ("/v1/completions", {"model": M, "prompt": "hello there", "max_tokens": 3, "logprobs": 2, "ignore_eos": True}),
        ("/v1/completions", {"model": M, "prompt": "x", "max_tokens": 2, "n": 2, "ignore_eos": True}),
        ("/v1/chat/completions", {"model": M, "messages": CHAT, "max_tokens": 3, "ignore_eos": True}),
        ("/v1/chat/completions", {"model": M, "messages": CHAT, "max_tokens": 2, "logprobs": True,
                                  "top_logprobs": 2, "ignore_eos": True}),
    ]
    session = gw.client.session
    for path, body in cases:
        v_status, v_body, _ = await call(session, vllm, "POST", path, body)
        s_status, s_body, _ = await call(session, sim, "POST", path, body)
        assert v_status == s_status == 200, (path, body, v_body, s_body)
        assert shape(s_body) == shape(v_body), (path, body)
        assert s_body["system_fingerprint"].startswith("vllm-")


async def test_stream_chunks_and_usage_chunk_match(gw: Gateway, both: tuple[str, str]) -> None:
    vllm, sim = both
    cases = [
        ("/v1/completions", {"model": M, "prompt": "x", "max_tokens": 3, "stream": True,
                             "stream_options": {"include_usage": True}}),
        ("/v1/completions", {"model": M, "prompt": "x", "max_tokens": 3, "stream": True}),
        ("/v1/completions", {"model": M, "prompt": "x", "max_tokens": 3, "stream": True,
                             "stream_options": {"include_usage": True, "continuous_usage_stats": True}}),
        ("/v1/completions", {"model": M, "prompt": "x", "max_tokens": 3, "n": 2, "stream": True,
                             "stream_options": {"include_usage": True}}),
        ("/v1/chat/completions", {"model": M, "messages": CHAT, "max_tokens": 3, "stream": True,
                                  "stream_options": {"include_usage": True}}),
        ("/v1/chat/completions", {"model": M, "messages": CHAT, "max_tokens": 3, "stream": True,
                                  "logprobs": True, "top_logprobs": 1}),
        ("/v1/completions", {"model": M, "prompt": "x", "max_tokens": 3, "stream": True, "logprobs": 1}),
    ]
    session = gw.client.session
    for path, body in cases:
        body = {**body, "ignore_eos": True}
        v_status, _, v_raw = await call(session, vllm, "POST", path, body)
        s_status, _, s_raw = await call(session, sim, "POST", path, body)
        assert v_status == s_status == 200
        v_chunks, s_chunks = chunks_of(v_raw), chunks_of(s_raw)
        assert stream_shapes(s_chunks) == stream_shapes(v_chunks), (path, body)
        for chunks in (v_chunks, s_chunks):
            marked = [i for i, c in enumerate(chunks) if "system_fingerprint" in c]
            assert marked == [len(chunks) - 1], (path, body)
        if body.get("stream_options", {}).get("include_usage"):
            for chunks in (v_chunks, s_chunks):
                assert chunks[-1]["choices"] == []
                assert set(chunks[-1]["usage"]) == {"prompt_tokens", "total_tokens", "completion_tokens"}
                assert chunks[-1]["usage"]["completion_tokens"] == 3 * body.get("n", 1)


# (path, body or raw bytes, compare the message too)
ERROR_CASES: list[tuple[str, Any, bool]] = [
    ("/v1/completions", {"model": "nope", "prompt": "x", "max_tokens": 2}, True),
    ("/v1/completions", {"model": M, "prompt": "word " * 5000, "max_tokens": 1}, False),  # chars
    ("/v1/completions", {"model": M, "prompt": "a b " * 600, "max_tokens": 1}, True),  # tokens
    ("/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": "word " * 5000}]}, False),
    ("/v1/completions", {"model": M, "prompt": "hi", "max_tokens": 2000}, True),
    ("/v1/completions", {"model": M, "prompt": "hi", "max_tokens": 0}, True),
    ("/v1/completions", {"model": M, "prompt": "hi", "max_tokens": "abc"}, True),
    ("/v1/completions", {"model": M, "prompt": "hi", "max_tokens": 2.5}, True),
    ("/v1/completions", {"model": M, "prompt": "hi", "max_tokens": 2, "n": 0}, True),
    ("/v1/completions", {"model": M, "prompt": "hi", "max_tokens": 2, "logprobs": 50}, True),
    ("/v1/completions", {"model": M, "prompt": "hi", "max_tokens": 2, "temperature": -1}, True),
    ("/v1/completions", {"model": M, "prompt": "hi", "max_tokens": 2, "stream_options": {"include_usage": True}},
     True),
    ("/v1/completions", {"model": M, "max_tokens": 2}, True),
    ("/v1/chat/completions", {"model": M, "messages": CHAT, "top_logprobs": 2}, True),
    ("/v1/chat/completions", {"model": M, "messages": []}, True),
    ("/v1/chat/completions", {"model": M, "max_tokens": 2}, True),
    ("/v1/chat/completions", {"model": M, "messages": "hi"}, True),
    ("/v1/completions", [1, 2], True),
    ("/v1/completions", b"not json", True),
]


async def test_error_shapes_match(gw: Gateway, both: tuple[str, str]) -> None:
    vllm, sim = both
    session = gw.client.session
    for path, body, same_message in ERROR_CASES:
        raw = body if isinstance(body, bytes) else None
        json_body = None if raw is not None else body
        v_status, v_body, _ = await call(session, vllm, "POST", path, json_body, raw)
        s_status, s_body, _ = await call(session, sim, "POST", path, json_body, raw)
        label = (path, str(body)[:80])
        assert v_status == s_status and v_status in (400, 404), (label, v_body, s_body)
        v_err, s_err = v_body["error"], s_body["error"]
        assert set(s_err) == set(v_err) == {"message", "type", "param", "code"}, label
        assert (s_err["type"], s_err["param"], s_err["code"]) == (v_err["type"], v_err["param"], v_err["code"]), \
            (label, v_err, s_err)
        if same_message:
            assert s_err["message"] == v_err["message"], label
        else:  # the count includes the model's chat template, and the bound its longest token
            assert s_err["message"].split(" contains ")[0] == v_err["message"].split(" contains ")[0], label


async def test_lenient_inputs_and_clamped_max_tokens_match(gw: Gateway, both: tuple[str, str]) -> None:
    """What looks invalid but vLLM accepts (pydantic's lax mode), and max_tokens beyond the context's room."""
    vllm, sim = both
    session = gw.client.session
    for extra in ({"max_tokens": "3"}, {"max_tokens": 3.0}, {"max_tokens": True}, {"max_tokens": 3, "n": "1"}):
        body = {"model": M, "prompt": "x", "ignore_eos": True, **extra}
        for base in (vllm, sim):
            status, result, _ = await call(session, base, "POST", "/v1/completions", body)
            assert status == 200, (base, extra, result)
            assert result["usage"]["completion_tokens"] == int(extra["max_tokens"])
    for base in (vllm, sim):
        status, _, raw = await call(session, base, "POST", "/v1/completions",
                                    {"model": M, "prompt": "x", "max_tokens": 2, "stream": "yes"})
        assert status == 200 and raw.startswith(b"data: "), base
    # A prompt of ~1,000 tokens with max_tokens 1,000: cut short at the context length, not refused.
    for base in (vllm, sim):
        status, result, _ = await call(session, base, "POST", "/v1/completions",
                                       {"model": M, "prompt": "a b " * 500, "max_tokens": 1000, "ignore_eos": True})
        assert status == 200, (base, result)
        assert result["usage"]["total_tokens"] == MAX_MODEL_LEN
        assert result["choices"][0]["finish_reason"] == "length"


async def test_metrics_names_and_labels_match(gw: Gateway, both: tuple[str, str]) -> None:
    vllm, sim = both
    session = gw.client.session

    async def families(base: str) -> dict[str, set[str]]:
        async with session.get(base + "/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
        return {f.name: {label for s in f.samples for label in s.labels} for f in
                text_string_to_metric_families(text) if f.name.startswith("vllm:")}

    real, simulated = await families(vllm), await families(sim)
    assert simulated, "the simulator exposes no vllm: metrics"
    missing = set(simulated) - set(real)
    assert not missing, f"simulator metrics that vLLM does not have: {sorted(missing)}"
    for name, labels in simulated.items():
        assert labels == real[name], (name, labels, real[name])
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:request_success", "vllm:prompt_tokens", "vllm:generation_tokens",
                 "vllm:time_to_first_token_seconds", "vllm:engine_sleep_state"):
        assert name in simulated, name


async def test_sleep_endpoints_and_other_routes_match(gw: Gateway, both: tuple[str, str]) -> None:
    vllm, sim = both
    session = gw.client.session
    results: dict[str, list[tuple[int, Any]]] = {}
    for base in (vllm, sim):
        seen = results[base] = []
        try:
            for method, path in [("GET", "/is_sleeping"), ("POST", "/sleep?level=1"), ("GET", "/is_sleeping"),
                                 ("POST", "/sleep?level=3"), ("POST", "/wake_up"), ("GET", "/is_sleeping"),
                                 ("GET", "/sleep"), ("GET", "/no/such/route"), ("GET", "/health")]:
                status, body, raw = await call(session, base, method, path)
                seen.append((status, body if body is not None else raw.decode()))
        finally:
            await call(session, base, "POST", "/wake_up")
    assert results[sim] == results[vllm]
    assert results[vllm][1] == (200, {"status": "sleeping", "level": 1})
    assert results[vllm][4] == (200, {"status": "awake", "tags": None})

    async def card(base: str) -> Any:
        _, listing, _ = await call(session, base, "GET", "/v1/models")
        return listing

    v_models, s_models = await card(vllm), await card(sim)
    assert shape(s_models) == shape(v_models)
    assert [m["id"] for m in s_models["data"]] == [m["id"] for m in v_models["data"]] == [M]
    assert s_models["data"][0]["max_model_len"] == v_models["data"][0]["max_model_len"] == MAX_MODEL_LEN
    _, v_version, _ = await call(session, vllm, "GET", "/version")
    _, s_version, _ = await call(session, sim, "GET", "/version")
    assert set(v_version) == set(s_version) == {"version"}


async def test_requests_wait_while_asleep(gw: Gateway, both: tuple[str, str]) -> None:
    """Asleep, both hold a generation request until /wake_up, then answer it."""
    session = gw.client.session
    for base in both:
        await call(session, base, "POST", "/sleep?level=1")
        task = asyncio.ensure_future(call(session, base, "POST", "/v1/completions",
                                          {"model": M, "prompt": "x", "max_tokens": 2}))
        try:
            await asyncio.sleep(1.0)
            assert not task.done(), base
        finally:
            await call(session, base, "POST", "/wake_up")
        status, body, _ = await asyncio.wait_for(task, 30)
        assert status == 200 and body["usage"]["completion_tokens"] == 2, (base, body)
