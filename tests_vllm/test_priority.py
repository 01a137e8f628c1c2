"""Priority scheduling on the real vLLM server (issue 13): the managed runtime runs vLLM's priority scheduler,
requests carrying `priority` are accepted, and realtime overtakes a batch backlog waiting in the engine.

What is asserted is an order, never a duration: more streamed batch requests (priority 10) than vLLM runs
at once, so some wait in its queue; once /metrics shows requests waiting, one realtime stream goes through
the gateway (which gives it priority 0). vLLM takes waiting requests by (priority, arrival), so the realtime
stream's first token comes before those of batch requests that were waiting when it arrived; first come,
first served would start it after all of them.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp

from tests.polling import eventually
from tests_vllm.conftest import REALTIME_MODEL, Gateway, auth

BACKLOG = 160  # more than vLLM's CPU default of 128 running sequences: the rest wait
BATCH_TOKENS = 256  # long decodes, so the running ones hold their slots while realtime arrives


def _cmdline(pid_file: Path) -> list[str]:
    """The running runtime's command line, read from /proc (the pid file is the supervisor's JSON record)."""
    pid = int(json.loads(pid_file.read_text())["pid"])
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


async def _gauge(session: aiohttp.ClientSession, runtime: str, name: str) -> float:
    async with session.get(runtime + "/metrics") as resp:
        text = await resp.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


async def _first_token(resp: aiohttp.ClientResponse) -> float:
    """Read a stream; the time its first event arrived."""
    assert resp.status == 200, await resp.text()
    first = 0.0
    async for _ in resp.content.iter_any():
        first = first or time.monotonic()
    return first


async def test_the_managed_runtime_runs_the_priority_scheduler(gw: Gateway) -> None:
    assert gw.settings.priority_scheduling
    args = _cmdline(Path(gw.settings.runtime_pid_file))
    assert "--scheduling-policy" in args and args[args.index("--scheduling-policy") + 1] == "priority", args
    # A request with a priority field is accepted, straight to vLLM and through the gateway (which replaces
    # the client's value with realtime's).
    body = {"model": REALTIME_MODEL, "prompt": "Once upon a time", "max_tokens": 2, "priority": 10}
    async with aiohttp.ClientSession() as session, session.post(gw.runtime_url + "/v1/completions",
                                                                json=body) as resp:
        assert resp.status == 200, await resp.text()
    resp = await gw.post("/v1/completions", {**body, "priority": -5})
    assert resp.status == 200, await resp.text()


async def test_realtime_overtakes_a_batch_backlog_waiting_in_vllm(gw: Gateway) -> None:
    runtime = gw.runtime_url
    first: dict[str, float] = {}
    batch_body = {"model": REALTIME_MODEL, "prompt": [7] * 32, "max_tokens": BATCH_TOKENS, "ignore_eos": True,
                  "priority": 10, "stream": True}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def batch(i: int) -> None:
            async with session.post(runtime + "/v1/completions", json=batch_body) as resp:
                first[f"batch-{i}"] = await _first_token(resp)

        backlog = [asyncio.create_task(batch(i)) for i in range(BACKLOG)]
        try:
            # Wait (bounded) until vLLM runs all it may and holds the rest waiting: those were there first.
            waiting_at_arrival = await eventually(
                lambda: _gauge(session, runtime, "vllm:num_requests_waiting"), timeout=120, interval=0.05)
            body = {"model": REALTIME_MODEL, "prompt": [7] * 16, "max_tokens": 2, "ignore_eos": True,
                    "stream": True}
            async with gw.client.post("/v1/completions", json=body, headers=auth("realtime")) as resp:
                first["realtime"] = await _first_token(resp)
            await asyncio.gather(*backlog)
        finally:
            for task in backlog:
                task.cancel()
            await asyncio.gather(*backlog, return_exceptions=True)
    later = sum(1 for name, at in first.items() if name != "realtime" and at > first["realtime"])
    # First come, first served would start every batch request waiting when realtime arrived before it;
    # under priority realtime leaves the waiting queue first, so (nearly) all of them start after it.
    assert waiting_at_arrival >= 1
    assert later >= waiting_at_arrival // 2, (later, waiting_at_arrival)
