"""The realtime API beyond completions, end to end with the official openai SDK against the simulator.

Responses (plain and streamed), embeddings, a model card whose id has a slash, named, required and auto
tool calls (plain and streamed), vLLM's tokenize/detokenize/score/rerank/pooling over plain HTTP, the 404
an SGLang runtime gives for what it lacks, and the usage these requests are accounted with.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
import redis.asyncio as redis_async
from openai import AsyncOpenAI

from gateway.bootstrap import create_app
from gateway.http.appkeys import ACCOUNTANT, REDIS_KEYS
from gateway.http.realtime import ENDPOINTS
from tests.conftest import KEY_IDS, REALTIME_MODEL, REDIS_URL, TOKENS, auth, eventually, wait_ready

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "required": ["city", "unit", "where"], "properties": {
        "city": {"type": "string", "minLength": 2},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "where": {"type": "object", "required": ["lat", "lon"], "properties": {
            "lat": {"type": "number", "minimum": -90, "maximum": 90},
            "lon": {"type": "number", "minimum": -180, "maximum": 180}}},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "alerts": {"type": "boolean"}}}}}
OTHER_TOOL = {"type": "function", "function": {"name": "lookup_stock", "parameters": {
    "type": "object", "properties": {"symbol": {"type": "string"}}, "required": ["symbol"]}}}


def sdk(client: Any, role: str = "realtime") -> AsyncOpenAI:
    """The openai SDK pointed at the test gateway."""
    return AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=TOKENS[role], max_retries=0)


def check_weather_arguments(arguments: str) -> None:
    """The arguments are JSON valid against WEATHER's parameters schema."""
    args = json.loads(arguments)
    assert set(args) >= {"city", "unit", "where"}
    assert isinstance(args["city"], str) and len(args["city"]) >= 2
    assert args["unit"] in ("celsius", "fahrenheit")
    assert isinstance(args["days"], int) and 1 <= args["days"] <= 7
    assert -90 <= args["where"]["lat"] <= 90 and -180 <= args["where"]["lon"] <= 180
    assert 1 <= len(args["tags"]) <= 3 and all(isinstance(t, str) for t in args["tags"])
    assert isinstance(args["alerts"], bool)


async def usage_of(gateway: Any, role: str = "realtime") -> dict[str, str]:
    """The all-time usage hash of a test key, once the accountant has written what it holds."""
    accountant = gateway.app[ACCOUNTANT]
    await eventually(lambda: accountant.buffered == 0)
    r = redis_async.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        return await r.hgetall(gateway.app[REDIS_KEYS].key_usage(KEY_IDS[role]))
    finally:
        await r.aclose()


async def test_responses_plain_and_streamed_with_usage(gateway: Any) -> None:
    api = sdk(gateway)
    plain = await api.responses.create(model=REALTIME_MODEL, input="Say hello", max_output_tokens=5)
    assert plain.object == "response" and plain.output_text
    assert plain.usage is not None and plain.usage.output_tokens == 5 and plain.usage.input_tokens > 0
    assert plain.status == "incomplete" and plain.incomplete_details is not None

    events = []
    async with api.responses.stream(model=REALTIME_MODEL, input=[{"role": "user", "content": "Say hello"}],
                                    max_output_tokens=4) as stream:
        async for event in stream:
            events.append(event.type)
        final = await stream.get_final_response()
    assert events[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                          "response.content_part.added"]
    assert events.count("response.output_text.delta") == 4
    assert events[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                           "response.completed"]
    assert final.usage is not None and final.usage.output_tokens == 4
    assert final.output_text == plain.output_text.rsplit(" ", 1)[0]  # same prompt, same words, one fewer

    usage = await usage_of(gateway)
    assert usage["requests"] == "2" and usage["successes"] == "2"
    assert int(usage["completion_tokens"]) == 5 + 4
    assert int(usage["prompt_tokens"]) == plain.usage.input_tokens + final.usage.input_tokens


async def test_responses_without_input_is_a_clear_400(gateway: Any) -> None:
    resp = await gateway.post("/v1/responses", json={"model": REALTIME_MODEL}, headers=auth("realtime"))
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == "input" and "'input' is required" in error["message"]


async def test_embeddings_deterministic_normalised_dimensions_and_accounted(gateway: Any) -> None:
    api = sdk(gateway)
    first = await api.embeddings.create(model=REALTIME_MODEL, input=["one two three", "four"])
    again = await api.embeddings.create(model=REALTIME_MODEL, input="one two three", encoding_format="float")
    assert [d.index for d in first.data] == [0, 1]
    vector = first.data[0].embedding
    assert vector == pytest.approx(again.data[0].embedding, abs=1e-6)  # the SDK's default is base64
    assert sum(v * v for v in vector) == pytest.approx(1.0, abs=1e-5)
    assert first.data[1].embedding != pytest.approx(vector)
    assert first.usage.prompt_tokens == 4 and again.usage.prompt_tokens == 3
    short = await api.embeddings.create(model=REALTIME_MODEL, input="one two three", dimensions=16)
    assert len(short.data[0].embedding) == 16
    assert sum(v * v for v in short.data[0].embedding) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(openai.NotFoundError) as caught:
        await api.embeddings.create(model="no-such-model", input="x")
    assert caught.value.code == "model_not_found"
    usage = await usage_of(gateway)  # refused by the gateway's own checks, as for chat: not a request
    assert usage["requests"] == "3" and usage["successes"] == "3"
    assert usage["prompt_tokens"] == str(4 + 3 + 3) and usage.get("completion_tokens", "0") == "0"


async def test_litellm_embedding_call(gateway: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """LiteLLM as a library (`litellm.aembedding` with the openai provider), as apps on LiteLLM call it."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # offline: the package's own cost map
    import litellm

    direct = await sdk(gateway).embeddings.create(model=REALTIME_MODEL, input="lite one", encoding_format="float")
    result = await litellm.aembedding(model=f"openai/{REALTIME_MODEL}", input=["lite one", "lite two"],
                                      api_base=str(gateway.make_url("/v1")), api_key=TOKENS["realtime"],
                                      encoding_format="float")
    vectors = [item["embedding"] for item in result.data]
    assert len(vectors) == 2 and vectors[0] == pytest.approx(direct.data[0].embedding, abs=1e-6)
    assert vectors[1] != pytest.approx(vectors[0])
    assert result.usage.prompt_tokens == 4
    usage = await usage_of(gateway)
    assert usage["requests"] == "2" and usage["prompt_tokens"] == str(2 + 4)


async def test_models_retrieve_with_a_slash_and_an_alias(aiohttp_client: Any, make_settings: Any) -> None:
    client = await aiohttp_client(create_app(make_settings(model_aliases="short-name,team/alias")))
    await wait_ready(client.app)
    api = sdk(client)
    card = await api.models.retrieve(REALTIME_MODEL)
    assert card.id == REALTIME_MODEL and "/" in card.id and card.object == "model"
    alias = await api.models.retrieve("team/alias")
    assert alias.id == "team/alias" and alias.model_extra and alias.model_extra["root"] == REALTIME_MODEL
    assert (await api.models.retrieve("short-name")).id == "short-name"
    with pytest.raises(openai.NotFoundError) as caught:
        await api.models.retrieve("someone/else")
    assert caught.value.code == "model_not_found" and REALTIME_MODEL in caught.value.message
    # Batch and eval keys may read the model cards (read only), as they may list the models.
    resp = await client.get("/v1/models/" + REALTIME_MODEL, headers=auth("batch"))
    assert resp.status == 200 and (await resp.json())["id"] == REALTIME_MODEL
    resp = await client.get("/v1/models/" + REALTIME_MODEL, headers=auth("upload"))
    assert resp.status == 401


async def test_named_tool_call_follows_the_schema(gateway: Any) -> None:
    api = sdk(gateway)
    chat = await api.chat.completions.create(
        model=REALTIME_MODEL, messages=[{"role": "user", "content": "Anything at all"}], tools=[OTHER_TOOL, WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=200)
    choice = chat.choices[0]
    assert choice.finish_reason == "stop"  # vLLM's finish reason for a named call (OpenAI's too)
    assert choice.message.tool_calls and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("chatcmpl-tool-")
    check_weather_arguments(call.function.arguments)
    assert chat.usage is not None and chat.usage.completion_tokens > 5

    with pytest.raises(openai.BadRequestError) as caught:
        await api.chat.completions.create(model=REALTIME_MODEL, messages=[{"role": "user", "content": "x"}],
                                          tools=[WEATHER], tool_choice={"type": "function",
                                                                        "function": {"name": "nope"}})
    assert caught.value.param == "tool_choice"


async def test_streamed_tool_call_deltas_assemble_into_valid_arguments(gateway: Any) -> None:
    api = sdk(gateway)
    stream = await api.chat.completions.create(
        model=REALTIME_MODEL, messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
        tools=[OTHER_TOOL, WEATHER], max_tokens=200, stream=True)  # tool_choice defaults to auto
    names, ids, pieces, finish = [], [], [], None
    async for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for call in delta.tool_calls or []:
            assert call.index == 0
            if call.id:
                ids.append(call.id)
            if call.function and call.function.name:
                names.append(call.function.name)
            if call.function and call.function.arguments:
                pieces.append(call.function.arguments)
        finish = chunk.choices[0].finish_reason or finish
    assert names == ["get_weather"] and len(ids) == 1
    assert len(pieces) > 3  # the arguments come as many deltas, as vLLM streams them
    check_weather_arguments("".join(pieces))
    assert finish == "tool_calls"


async def test_tool_choice_required_auto_and_none(gateway: Any) -> None:
    api = sdk(gateway)
    user = [{"role": "user", "content": "Tell me a story"}]
    required = await api.chat.completions.create(model=REALTIME_MODEL, messages=user, tools=[WEATHER],
                                                 tool_choice="required", max_tokens=200)
    assert required.choices[0].finish_reason == "tool_calls"
    assert required.choices[0].message.tool_calls
    check_weather_arguments(required.choices[0].message.tool_calls[0].function.arguments)
    auto = await api.chat.completions.create(model=REALTIME_MODEL, messages=user, tools=[WEATHER], max_tokens=5)
    assert not auto.choices[0].message.tool_calls and auto.choices[0].message.content
    none = await api.chat.completions.create(model=REALTIME_MODEL, tools=[WEATHER], tool_choice="none",
                                             messages=[{"role": "user", "content": "weather in Oslo?"}], max_tokens=5)
    assert not none.choices[0].message.tool_calls and none.choices[0].finish_reason == "length"
    # After the tool has answered, auto answers in text instead of calling it again.
    call = required.choices[0].message.tool_calls[0]
    follow = await api.chat.completions.create(model=REALTIME_MODEL, tools=[WEATHER], max_tokens=5, messages=[
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
    assert not follow.choices[0].message.tool_calls and follow.choices[0].message.content


async def test_tokenize_detokenize_score_rerank_pooling_over_http(gateway: Any) -> None:
    headers = auth("realtime")
    tok = await (await gateway.post("/tokenize", json={"model": REALTIME_MODEL, "prompt": "the quick brown fox",
                                                       "return_token_strs": True}, headers=headers)).json()
    assert tok["count"] == 4 and len(tok["tokens"]) == 4 and tok["max_model_len"] > 0
    no_model = await (await gateway.post("/tokenize", json={"prompt": "the quick"}, headers=headers)).json()
    assert no_model["tokens"] == tok["tokens"][:2]
    detok = await gateway.post("/detokenize", json={"model": REALTIME_MODEL, "tokens": tok["tokens"]}, headers=headers)
    assert detok.status == 200 and (await detok.json())["prompt"] == "the quick brown fox"
    bad = await gateway.post("/detokenize", json={"model": REALTIME_MODEL, "tokens": []}, headers=headers)
    assert bad.status == 400 and (await bad.json())["error"]["param"] == "tokens"

    score = await (await gateway.post("/v1/score", json={"model": REALTIME_MODEL, "queries": "fox",
                                                         "documents": ["quick fox", "blue sky"]},
                                      headers=headers)).json()
    assert [d["index"] for d in score["data"]] == [0, 1] and all(-1 <= d["score"] <= 1 for d in score["data"])
    docs = ["blue sky", "quick fox", "lazy dog"]
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        rerank = await gateway.post(path, json={"model": REALTIME_MODEL, "query": "fox", "documents": docs,
                                                "top_n": 2}, headers=headers)
        assert rerank.status == 200, path
        results = (await rerank.json())["results"]
        assert len(results) == 2 and results[0]["relevance_score"] >= results[1]["relevance_score"]
        assert docs[results[0]["index"]] == results[0]["document"]["text"]
    missing = await gateway.post("/v1/rerank", json={"model": REALTIME_MODEL, "documents": docs}, headers=headers)
    assert missing.status == 400 and (await missing.json())["error"]["param"] == "query"
    pooled = await (await gateway.post("/pooling", json={"model": REALTIME_MODEL, "input": "quick fox"},
                                       headers=headers)).json()
    assert pooled["data"][0]["object"] == "pooling" and len(pooled["data"][0]["data"]) > 8
    usage = await usage_of(gateway)
    assert usage["requests"] == str(2 + 1 + 1 + 3 + 1)  # the two refused by the gateway are not requests
    # score: "fox" once plus four document words; rerank: "fox" plus six, three times; pooling: two.
    assert usage["prompt_tokens"] == str(5 + 3 * 7 + 2)


async def test_sglang_runtime_answers_404_for_what_it_lacks(aiohttp_client: Any, make_settings: Any) -> None:
    client = await aiohttp_client(create_app(make_settings(runtime_type="sglang")))
    await wait_ready(client.app)
    for path in ("/pooling", "/rerank", "/v2/rerank"):
        resp = await client.post(path, json={"model": REALTIME_MODEL, "input": "x", "query": "q", "documents": ["d"]},
                                 headers=auth("realtime"))
        assert resp.status == 404, path
        error = (await resp.json())["error"]
        assert error["code"] == "endpoint_not_supported" and "sglang" in error["message"] and path in error["message"]
    # What SGLang serves is proxied as usual.
    ok = await client.post("/v1/rerank", json={"model": REALTIME_MODEL, "query": "q", "documents": ["d"]},
                           headers=auth("realtime"))
    assert ok.status == 200
    # The refusal comes before the body is read: no key, no scope, no answer.
    resp = await client.post("/pooling", json={}, headers=auth("batch"))
    assert resp.status == 401


async def test_runtime_without_an_endpoint_gives_endpoint_not_supported(aiohttp_client: Any,
                                                                        make_settings: Any) -> None:
    """A runtime 404 without OpenAI's error shape (a generating vLLM has no /v1/embeddings) says so."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    async def not_found(_request: web.Request) -> web.Response:
        return web.json_response({"detail": "Not Found"}, status=404)

    async def models(_request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": REALTIME_MODEL, "object": "model"}]})

    async def health(_request: web.Request) -> web.Response:
        return web.Response()

    runtime = web.Application()
    runtime.router.add_get("/health", health)
    runtime.router.add_get("/v1/models", models)
    runtime.router.add_post("/v1/embeddings", not_found)
    server = TestServer(runtime)
    await server.start_server()
    try:
        client = await aiohttp_client(create_app(make_settings(runtime_url=str(server.make_url("")).rstrip("/"))))
        await wait_ready(client.app)
        with pytest.raises(openai.NotFoundError) as caught:
            await sdk(client).embeddings.create(model=REALTIME_MODEL, input="x")
        assert caught.value.code == "endpoint_not_supported" and "/v1/embeddings" in caught.value.message
    finally:
        await server.close()


def test_every_proxied_endpoint_is_a_post_route_with_the_realtime_scope() -> None:
    paths = [e.path for e in ENDPOINTS]
    assert len(paths) == len(set(paths))
    assert {"/v1/responses", "/v1/embeddings", "/pooling", "/v1/score", "/v1/rerank", "/tokenize",
            "/detokenize"} <= set(paths)


async def test_new_endpoints_get_503_with_retry_after_and_metrics(aiohttp_client: Any, make_settings: Any) -> None:
    from tests.conftest import free_port

    client = await aiohttp_client(create_app(make_settings(runtime_url=f"http://127.0.0.1:{free_port()}")))
    for path, body in (("/v1/responses", {"model": REALTIME_MODEL, "input": "x"}),
                       ("/v1/embeddings", {"model": REALTIME_MODEL, "input": "x"}),
                       ("/tokenize", {"prompt": "x"})):
        resp = await client.post(path, json=body, headers=auth("realtime"))
        assert resp.status == 503, path
        assert int(resp.headers["Retry-After"]) >= 1
        assert (await resp.json())["error"]["type"] == "server_error"
    text = await (await client.get("/metrics", headers=auth("monitor"))).text()
    assert 'route="/v1/embeddings"' in text and 'route="/v1/responses"' in text


async def test_upstream_ttft_is_measured_per_endpoint(gateway: Any) -> None:
    api = sdk(gateway)
    await api.embeddings.create(model=REALTIME_MODEL, input="x")
    async with api.responses.stream(model=REALTIME_MODEL, input="x", max_output_tokens=2) as stream:
        async for _ in stream:
            pass
    text = await (await gateway.get("/metrics", headers=auth("monitor"))).text()
    for path in ("/v1/embeddings", "/v1/responses"):
        assert any(line.startswith("llm_gateway_upstream_time_to_first_token_seconds_count") and path in line
                   and not line.endswith(" 0.0") for line in text.splitlines()), path


SCHEMAS: list[dict[str, Any]] = [
    WEATHER["function"]["parameters"],  # type: ignore[index]
    {"type": "object", "properties": {"items": {"type": "array", "minItems": 2, "maxItems": 5, "items": {
        "type": "object", "required": ["sku", "qty"], "properties": {
            "sku": {"type": "string", "maxLength": 3}, "qty": {"type": "integer", "exclusiveMinimum": 0}}}}},
     "required": ["items"], "additionalProperties": False},
    {"type": "object", "required": ["choice", "maybe", "fixed"], "properties": {
        "choice": {"anyOf": [{"type": "null"}, {"type": "number", "minimum": 0.5, "maximum": 0.75}]},
        "maybe": {"type": ["null", "boolean"]}, "fixed": {"const": "yes"},
        "level": {"enum": [1, 2, 3]}, "both": {"allOf": [{"type": "string"}, {"minLength": 5}]}}},
    {"type": "array", "items": {"type": "integer", "minimum": -3, "maximum": -1}},
    {"type": "object"},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_simulated_tool_arguments_are_valid_against_their_schema(schema: dict[str, Any]) -> None:
    import random

    import jsonschema_rs  # Schemathesis' validator (a test dependency)

    from gateway.simulator import schema_value

    validator = jsonschema_rs.validator_for(schema)
    for seed in range(25):
        value = schema_value(schema, random.Random(seed))
        assert validator.is_valid(value), (schema, value)
        assert schema_value(schema, random.Random(seed)) == value  # deterministic


def test_simulator_tokenizer_round_trips_and_counts_like_generation() -> None:
    from gateway.simulator import (
        CHAT_TOKENS_PER_MESSAGE,
        CHAT_TOKENS_REPLY_PRIMER,
        detokenize,
        tokenize_chat,
        tokenize_text,
    )

    text = "the quick brown fox Jumps-over zebras"
    tokens = tokenize_text(text)
    assert len(tokens) == len(text.split())
    assert detokenize([t for t, _ in tokens]) == text
    chat = tokenize_chat([{"role": "user", "content": "one two"}], add_generation_prompt=True)
    assert len(chat) == CHAT_TOKENS_PER_MESSAGE + 2 + CHAT_TOKENS_REPLY_PRIMER


async def test_a_responses_stream_cut_by_a_crash_ends_with_an_error_event(aiohttp_client: Any,
                                                                          make_settings: Any) -> None:
    from tests.conftest import start_simulator

    proc, url = start_simulator(REALTIME_MODEL, "--sim-crash-after", "0", "--sim-itl", "0.01")
    try:
        client = await aiohttp_client(create_app(make_settings(runtime_url=url)))
        await wait_ready(client.app)
        resp = await client.post("/v1/responses", headers=auth("realtime"), json={
            "model": REALTIME_MODEL, "input": "x", "max_output_tokens": 20, "stream": True})
        assert resp.status == 200
        events = [e for e in (await resp.read()).split(b"\n\n") if e]
        assert b"event: response.output_text.delta" in events[-2]
        name, data = events[-1].split(b"\n", 1)
        assert name == b"event: error" and b"[DONE]" not in events[-1]
        assert json.loads(data.removeprefix(b"data: "))["error"]["code"] == "upstream_stream_broken"
    finally:
        proc.terminate()
        proc.wait(10)


async def test_responses_and_tool_calls_run_on_the_contention_model(aiohttp_client: Any, make_settings: Any) -> None:
    """With --sim-contention the generating endpoints go through the simulated engine, which counts them."""
    from tests.conftest import start_simulator

    proc, url = start_simulator(REALTIME_MODEL, "--sim-contention")
    try:
        client = await aiohttp_client(create_app(make_settings(runtime_url=url)))
        await wait_ready(client.app)
        api = sdk(client)
        answer = await api.responses.create(model=REALTIME_MODEL, input="x", max_output_tokens=6)
        assert answer.usage is not None and answer.usage.output_tokens == 6
        chat = await api.chat.completions.create(model=REALTIME_MODEL, messages=[{"role": "user", "content": "x"}],
                                                 tools=[WEATHER], tool_choice="required", max_tokens=200)
        check_weather_arguments(chat.choices[0].message.tool_calls[0].function.arguments)  # type: ignore[index]
        async with client.session.get(url + "/metrics") as resp:
            metrics = await resp.text()
        generated = next(line for line in metrics.splitlines() if line.startswith("vllm:generation_tokens_total"))
        assert float(generated.rsplit(" ", 1)[1]) == 6 + chat.usage.completion_tokens  # type: ignore[union-attr]
    finally:
        proc.terminate()
        proc.wait(10)
