"""A batch group for the second model on a real vLLM: a real model swap (one vLLM server stopped, another
started), realtime arriving mid-group gets 503 + Retry-After and is then served, the group resumes and every
job completes exactly once."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import aiohttp
import pytest

from gateway.http.appkeys import ACTIVITY, DISPATCHER
from tests_vllm.conftest import OTHER_MODEL, REALTIME_MODEL, Gateway, eventually

SWAP_TIMEOUT = 300.0  # one vLLM start is ~30 s; generous for a loaded machine


async def realtime_request(gw: Gateway) -> tuple[int, dict[str, str], dict]:
    resp = await gw.post("/v1/completions", {"model": REALTIME_MODEL, "prompt": "hello", "max_tokens": 2})
    return resp.status, dict(resp.headers), await resp.json()


@pytest.mark.timeout(1200)
async def test_batch_group_swaps_models_and_realtime_takes_priority(gw: Gateway) -> None:
    app = gw.app
    supervisor, dispatcher = gw.supervisor, app[DISPATCHER]
    swaps_before = len(dispatcher.swaps)
    realtime_url = gw.runtime_url
    # Long generations (n=2 x 900 tokens, ignore_eos), so that jobs are still in flight when the realtime
    # request arrives however busy the machine is.
    ids = [(await gw.submit({"model": OTHER_MODEL, "prompt": f"group job {i}", "max_tokens": 900, "n": 2,
                             "ignore_eos": True}))["id"] for i in range(6)]

    # Realtime is idle: the dispatcher swaps the runtime to the other model and runs its jobs as a group.
    await eventually(lambda: dispatcher.group == OTHER_MODEL and supervisor.snapshot.ready
                     and supervisor.snapshot.model == OTHER_MODEL, timeout=SWAP_TIMEOUT, interval=0.05)
    await eventually(lambda: len(dispatcher.inflight) > 0, timeout=60, interval=0.01)
    async with gw.client.session.get(supervisor.snapshot.base_url + "/v1/models") as resp:
        assert [m["id"] for m in (await resp.json())["data"]] == [OTHER_MODEL]
    # A real swap, one server at a time: the realtime model's server is gone (its port refuses, or was
    # reused by the new server).
    try:
        async with gw.client.session.get(realtime_url + "/v1/models") as resp:
            assert REALTIME_MODEL not in [m["id"] for m in (await resp.json())["data"]]
    except aiohttp.ClientConnectionError:
        pass

    # A realtime request mid-group: 503 with Retry-After, and the realtime model is asked back.
    status, headers, body = await realtime_request(gw)
    assert status == 503, body
    assert 1 <= int(headers["Retry-After"]) <= 900
    assert body["error"]["code"] == "runtime_swapping"
    assert app[ACTIVITY].wanted.is_set()
    arrived = time.monotonic()
    while True:  # what a client honouring Retry-After (but polling sooner) does
        status, headers, body = await realtime_request(gw)
        if status == 200:
            break
        assert status == 503, body
        assert "Retry-After" in headers
        assert time.monotonic() - arrived < SWAP_TIMEOUT, "the realtime model never came back"
        await asyncio.sleep(0.5)
    assert body["model"] == REALTIME_MODEL
    assert supervisor.snapshot.model == REALTIME_MODEL

    # After realtime is idle again the group resumes; jobs cut off by the swap went back to the queue
    # without costing an attempt, and every job completes exactly once, on the other model.
    for job_id in ids:
        job = await gw.wait_job(job_id, {"completed", "failed"}, timeout=3 * SWAP_TIMEOUT)
        assert job["status"] == "completed", (job["error"], job["attempts"], job["flags"])
        assert job["response"]["model"] == OTHER_MODEL
        assert job["response"]["usage"]["completion_tokens"] == 2 * 900
    events = [e for e in await gw.job_events() if e["job_id"] in set(ids)]
    preempted = [e for e in events if e["event"] == "requeued" and e.get("reason") == "preempted"]
    assert preempted, "the realtime request arrived with batch requests in flight"
    for e in preempted:
        assert (await gw.job(e["job_id"]))["attempts"] == 1
    assert Counter(e["job_id"] for e in events if e["event"] == "completed") == {i: 1 for i in ids}

    await eventually(lambda: dispatcher.group is None and supervisor.snapshot.model == REALTIME_MODEL
                     and supervisor.snapshot.ready, timeout=SWAP_TIMEOUT)
    swaps = dispatcher.swaps[swaps_before:]
    assert [s["reason"] for s in swaps[:2]] == ["batch_group", "realtime_wanted"], swaps
    assert swaps[-1]["reason"] == "group_done", swaps
    assert all(s["error"] in (None, "realtime traffic arrived while the batch model was loading")
               for s in swaps), swaps
    status, _, body = await realtime_request(gw)
    assert status == 200, body
