"""Batch jobs for the realtime model on a real vLLM: they run beside realtime traffic, vLLM's answer is stored,
usage is accounted, and a request vLLM rejects fails at once with vLLM's message."""

from __future__ import annotations

import asyncio
from collections import Counter

import orjson

from tests_vllm.conftest import REALTIME_MODEL, Gateway

EXACT = {"ignore_eos": True}


async def test_batch_jobs_for_the_realtime_model(gw: Gateway) -> None:
    before = await gw.usage("batch")
    created = [await gw.submit({"model": REALTIME_MODEL, "prompt": f"job {i}", "max_tokens": 6, "priority": i % 3,
                                **EXACT}) for i in range(6)]
    chat = await gw.submit({"model": REALTIME_MODEL, "messages": [{"role": "user", "content": "hello"}],
                            "max_tokens": 4, **EXACT}, path="/v1/batch/chat/completions")
    assert all(c["status"] == "queued" for c in [*created, chat])

    # Realtime traffic at the same time is served: batch runs beside it on the realtime model.
    api = gw.sdk()
    replies = await asyncio.gather(*(api.completions.create(model=REALTIME_MODEL, prompt="rt", max_tokens=3)
                                     for _ in range(4)))
    assert all(r.choices for r in replies)

    for c in created:
        job = await gw.wait_job(c["id"], {"completed", "failed"})
        assert job["status"] == "completed", (job["error"], job["attempts"], job["flags"])
        response = job["response"]
        assert response["object"] == "text_completion" and response["model"] == REALTIME_MODEL
        assert response["usage"]["completion_tokens"] == 6
        assert response["choices"][0]["finish_reason"] == "length"
        assert job["attempts"] == 1
    job = await gw.wait_job(chat["id"], {"completed", "failed"})
    assert job["status"] == "completed", job
    assert job["response"]["object"] == "chat.completion"
    assert job["response"]["choices"][0]["message"]["role"] == "assistant"

    after = await gw.usage("batch")
    assert after["requests"] - before.get("requests", 0) == 7
    assert after["completion_tokens"] - before.get("completion_tokens", 0) == 6 * 6 + 4

    ids = {c["id"] for c in [*created, chat]}
    events = [e for e in await gw.job_events() if e["job_id"] in ids]
    assert Counter(e["event"] for e in events) == {"enqueued": 7, "started": 7, "completed": 7}


async def test_batch_job_vllm_rejects_fails_with_its_message(gw: Gateway) -> None:
    created = await gw.submit({"model": REALTIME_MODEL, "prompt": "word " * 5000, "max_tokens": 1})
    job = await gw.wait_job(created["id"], {"completed", "failed"})
    assert job["status"] == "failed", job
    assert job["attempts"] == 1  # a 400 is not retried
    error = job["error"]
    assert error["runtime_status"] == 400
    assert "maximum context length" in error["message"]
    assert "runtime_4xx" in error["flags"]


async def test_batch_and_realtime_agree_on_a_seeded_request(gw: Gateway) -> None:
    """A job stores vLLM's JSON body as it came: the same seeded request through realtime gives the same text."""
    created = await gw.submit({"model": REALTIME_MODEL, "prompt": "seeded", "max_tokens": 5, "seed": 11, **EXACT})
    job = await gw.wait_job(created["id"], {"completed", "failed"})
    assert job["status"] == "completed", job
    direct = await gw.post("/v1/completions", {"model": REALTIME_MODEL, "prompt": "seeded", "max_tokens": 5,
                                               "seed": 11, **EXACT})
    assert direct.status == 200
    assert orjson.loads(await direct.read())["choices"][0]["text"] == job["response"]["choices"][0]["text"]
