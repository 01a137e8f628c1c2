"""The realtime proxy end to end on a real vLLM: the openai SDK, streams, usage accounting, logprobs, errors.

The same checks as tests/test_realtime.py on the simulator. Random weights can end a generation early
with the end-of-sequence token, so requests that count tokens send vLLM's `ignore_eos`; they can also emit
control characters and split UTF-8 across chunks, so text is compared, never chunk counts.
"""

from __future__ import annotations

import asyncio

import openai
import orjson
import pytest

from tests_vllm.conftest import KEY_IDS, REALTIME_MODEL, TOKENS, Gateway, auth, eventually

EXACT = {"ignore_eos": True}


async def test_sdk_chat_completions_logprobs_and_models(gw: Gateway) -> None:
    api = gw.sdk()
    chat = await api.chat.completions.create(model=REALTIME_MODEL, messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=5, seed=7, extra_body=EXACT)
    assert chat.model == REALTIME_MODEL
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage is not None and chat.usage.completion_tokens == 5 and chat.usage.prompt_tokens > 0
    again = await api.chat.completions.create(model=REALTIME_MODEL, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=5, seed=7, extra_body=EXACT)
    assert again.choices[0].message.content == chat.choices[0].message.content  # seeded sampling

    comp = await api.completions.create(model=REALTIME_MODEL, prompt="Once upon a time", max_tokens=4,
                                        logprobs=2, extra_body=EXACT)
    logprobs = comp.choices[0].logprobs
    assert logprobs is not None and len(logprobs.tokens or []) == 4
    assert len(logprobs.token_logprobs or []) == 4 and all(lp <= 0 for lp in logprobs.token_logprobs or [])
    # top_logprobs holds the sampled token plus the top 2 (deduplicated): 2 or 3 entries per position.
    assert all(2 <= len(top) <= 3 for top in logprobs.top_logprobs or [])

    top = await api.chat.completions.create(model=REALTIME_MODEL, messages=[{"role": "user", "content": "hey"}],
                                            max_tokens=3, logprobs=True, top_logprobs=2, extra_body=EXACT)
    content = top.choices[0].logprobs.content if top.choices[0].logprobs else None
    assert content is not None and len(content) == 3
    assert all(len(entry.top_logprobs) == 2 for entry in content)

    models = await api.models.list()
    assert REALTIME_MODEL in [m.id for m in models.data]


async def test_streaming_usage_accounted_and_shown_only_when_asked(gw: Gateway) -> None:
    api = gw.sdk()
    before = await gw.usage("realtime")
    stream = await api.chat.completions.create(model=REALTIME_MODEL, messages=[{"role": "user", "content": "x"}],
                                               max_tokens=6, stream=True, stream_options={"include_usage": True},
                                               temperature=0, extra_body=EXACT)
    chunks = [c async for c in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    plain = await api.chat.completions.create(model=REALTIME_MODEL, messages=[{"role": "user", "content": "x"}],
                                              max_tokens=6, stream=True, temperature=0, extra_body=EXACT)
    plain_chunks = [c async for c in plain]
    assert all(c.choices for c in plain_chunks), "usage-only chunk leaked to a client that did not ask"
    assert all(c.usage is None for c in plain_chunks)
    assert "".join(c.choices[0].delta.content or "" for c in plain_chunks) == text  # greedy: same text

    # Both streams were accounted with vLLM's token counts, though only one client asked for them.
    after = await gw.usage("realtime")
    assert after["requests"] - before.get("requests", 0) == 2
    assert after["successes"] - before.get("successes", 0) == 2
    assert after["completion_tokens"] - before.get("completion_tokens", 0) == 12
    assert after["prompt_tokens"] > before.get("prompt_tokens", 0)


async def test_stream_and_non_stream_agree(gw: Gateway) -> None:
    body = {"model": REALTIME_MODEL, "prompt": "abc def", "max_tokens": 8, "temperature": 0, **EXACT}
    resp = await gw.post("/v1/completions", body)
    assert resp.status == 200
    whole = await resp.json()
    assert whole["usage"]["completion_tokens"] == 8
    resp = await gw.post("/v1/completions", {**body, "stream": True})
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers.get("X-Request-ID")
    raw = await resp.read()
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    chunks = [orjson.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    assert all(c["choices"] for c in chunks)  # the usage chunk the gateway asked for is not shown
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]


async def test_gateway_errors_and_vllm_errors_pass_through(gw: Gateway) -> None:
    # Checked by the gateway before the runtime sees anything: an unknown model is a 404 naming the served one.
    resp = await gw.post("/v1/chat/completions", {"model": "other/model",
                                                  "messages": [{"role": "user", "content": "x"}]})
    assert resp.status == 404
    body = await resp.json()
    assert body["error"]["code"] == "model_not_found" and REALTIME_MODEL in body["error"]["message"]
    resp = await gw.post("/v1/chat/completions", {"model": REALTIME_MODEL, "messages": "hi"})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "messages"

    # Validated by vLLM itself: its 400s reach the client unchanged (OpenAI shape, vLLM's message).
    for path, payload, param in [
        ("/v1/completions", {"prompt": "word " * 5000, "max_tokens": 1}, None),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 5000}], "max_tokens": 1}, None),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 5000}, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "logprobs": 50}, "logprobs"),
    ]:
        resp = await gw.post(path, {"model": REALTIME_MODEL, **payload})
        assert resp.status == 400, (path, await resp.text())
        error = (await resp.json())["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "BadRequestError" and error["code"] == 400
        if param is None:
            assert f"maximum context length is {1024} tokens" in error["message"]
        else:
            assert error["param"] == param

    api = gw.sdk()
    with pytest.raises(openai.BadRequestError) as info:
        await api.completions.create(model=REALTIME_MODEL, prompt="word " * 5000, max_tokens=1)
    assert "maximum context length" in str(info.value)
    with pytest.raises(openai.NotFoundError):
        await api.completions.create(model="no/such-model", prompt="x", max_tokens=1)


async def test_usage_counters_after_mixed_traffic(gw: Gateway) -> None:
    before = {role: await gw.usage(role) for role in ("realtime", "all")}
    api = gw.sdk()
    for _ in range(3):
        await api.completions.create(model=REALTIME_MODEL, prompt="one two three", max_tokens=4, extra_body=EXACT)
    stream = await api.chat.completions.create(model=REALTIME_MODEL, messages=[{"role": "user", "content": "a b"}],
                                               max_tokens=5, stream=True, extra_body=EXACT)
    async for _ in stream:
        pass
    with pytest.raises(openai.BadRequestError):
        await api.completions.create(model=REALTIME_MODEL, prompt="word " * 5000, max_tokens=1)
    await gw.sdk("all").completions.create(model=REALTIME_MODEL, prompt="x", max_tokens=2)

    after = {role: await gw.usage(role) for role in ("realtime", "all")}
    delta = {k: after["realtime"][k] - before["realtime"].get(k, 0) for k in after["realtime"]}
    assert delta["requests"] == 5 and delta["successes"] == 4 and delta["errors"] == 1
    assert delta["completion_tokens"] == 3 * 4 + 5
    assert delta["prompt_tokens"] > 0
    assert after["all"]["requests"] - before["all"].get("requests", 0) == 1

    resp = await gw.client.get("/monitor/key_usage?limit=50", headers=auth("monitor"))
    assert resp.status == 200
    rows = {r["key_id"]: r for r in (await resp.json())["data"]}
    assert rows[KEY_IDS["realtime"]]["requests"] == after["realtime"]["requests"]


def _metric(text: str, name: str) -> float:
    """The value of the first sample of `name` in a Prometheus text page."""
    line = next(x for x in text.splitlines() if x.startswith(name + "{"))
    return float(line.rsplit(" ", 1)[1])


async def test_client_disconnect_aborts_the_vllm_request(gw: Gateway) -> None:
    runtime = gw.runtime_url

    async def vllm_metrics() -> str:
        async with gw.client.session.get(runtime + "/metrics") as m:
            return await m.text()

    generated_before = _metric(await vllm_metrics(), "vllm:generation_tokens_total")
    # 16 x 1,000 tokens: many seconds of work for vLLM, however slowly this (busy) test process relays
    # (4 x 1,000 was seen to finish before a heavily loaded machine relayed the disconnect).
    resp = await gw.post("/v1/completions", {"model": REALTIME_MODEL, "prompt": "x", "max_tokens": 1000, "n": 16,
                                             "stream": True, **EXACT})
    assert resp.status == 200
    await resp.content.readline()
    resp.close()

    async def idle() -> str | None:
        text = await vllm_metrics()
        return text if _metric(text, "vllm:num_requests_running") == 0.0 else None

    # vLLM stopped generating for nobody: the request ended short of its 16,000 tokens (with ignore_eos it
    # could only end early by being aborted). vLLM 0.32 does not count such aborts in
    # vllm:request_success_total{finished_reason="abort"}, so the token counter is what tells.
    text = await eventually(idle, timeout=30, interval=0.2)
    generated = _metric(text, "vllm:generation_tokens_total") - generated_before
    assert 0 < generated < 16000


async def test_concurrent_requests(gw: Gateway) -> None:
    api = gw.sdk()

    async def one(i: int) -> int:
        reply = await api.completions.create(model=REALTIME_MODEL, prompt=f"request {i}", max_tokens=8,
                                             extra_body=EXACT)
        return reply.usage.completion_tokens if reply.usage else 0

    assert await asyncio.gather(*(one(i) for i in range(20))) == [8] * 20


async def test_metrics_health_and_ready(gw: Gateway) -> None:
    await gw.post("/v1/completions", {"model": REALTIME_MODEL, "prompt": "x", "max_tokens": 2})
    resp = await gw.client.get("/metrics", headers=auth("monitor"))
    assert resp.status == 200
    text = await resp.text()
    for name in ("llm_gateway_http_requests_total", "llm_gateway_upstream_time_to_first_token_seconds",
                 "llm_gateway_tokens_total", "llm_gateway_runtime_state"):
        assert name in text
    assert 'llm_gateway_runtime_state{state="ready"} 1.0' in text
    assert TOKENS["realtime"] not in text
    assert (await gw.client.get("/health")).status == 200
    ready = await gw.client.get("/ready")
    assert ready.status == 200, await ready.text()
