"""The vLLM server killed (SIGKILL) mid-stream: the stream ends cleanly with an error event, a crash log with
vLLM's last output is written, the supervisor restarts vLLM, and the batch jobs it was running are retried on
the restarted server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import aiohttp
import orjson
import pytest

from gateway.http.appkeys import REDIS, REDIS_KEYS
from tests_vllm.conftest import REALTIME_MODEL, Gateway, eventually

RESTART_TIMEOUT = 300.0


@pytest.mark.timeout(900)
async def test_runtime_killed_mid_stream_restarts_and_batch_job_is_retried(gw: Gateway) -> None:
    supervisor = gw.supervisor
    before = supervisor.snapshot
    failure_dir = gw.settings.failure_dir
    old_logs = set(failure_dir.glob("*.log")) if failure_dir.is_dir() else set()
    pid = supervisor.backend.pid  # type: ignore[attr-defined]
    assert pid is not None

    # Batch jobs long enough (ignore_eos, 1,000 tokens) that some are in flight when vLLM dies.
    ids = [(await gw.submit({"model": REALTIME_MODEL, "prompt": f"survive {i}", "max_tokens": 1000,
                             "ignore_eos": True}))["id"] for i in range(4)]
    await eventually(lambda: _any_running(gw, ids), timeout=60, interval=0.05)
    # n=4 x 1,000 tokens keep vLLM busy for seconds, but a loaded machine can starve this process (which runs
    # the gateway too) until vLLM has finished. So vLLM is frozen (SIGSTOP to its process group) as soon as
    # the stream has begun, the gateway relays what vLLM had already sent, and only a stream still unfinished
    # then is the one whose runtime is killed; one that had finished is read to its end and a new one sent.
    raw = b""
    for _attempt in range(5):
        resp = await gw.post("/v1/chat/completions", {"model": REALTIME_MODEL, "stream": True, "max_tokens": 1000,
                                                      "n": 4, "ignore_eos": True,
                                                      "messages": [{"role": "user", "content": "long answer"}]})
        assert resp.status == 200
        os.killpg(pid, signal.SIGSTOP)
        raw = await _read_until_quiet(resp, quiet=1.5)
        if b"data: [DONE]" not in raw:
            break
        os.killpg(pid, signal.SIGCONT)
        await resp.read()
    else:
        raise AssertionError("vLLM finished every stream before it could be frozen mid-stream")

    os.kill(pid, signal.SIGKILL)  # the API server process, as the OOM killer would
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGCONT)  # the engine process it leaves notices its parent is gone and exits

    # The stream ends with an OpenAI-shaped error event and [DONE], not a hang or a bare disconnect.
    raw += await asyncio.wait_for(resp.read(), 60)
    events = [e for e in raw.split(b"\n\n") if e.strip()]
    assert events[-1] == b"data: [DONE]", events[-3:]
    error = orjson.loads(events[-2].removeprefix(b"data: "))
    assert "error" in error, f"the stream ended normally after {len(events)} events: {events[-3:]}"
    assert error["error"]["type"] == "server_error"
    assert error["error"]["code"] in ("upstream_stream_broken", "upstream_stream_truncated")

    # A crash log with vLLM's own last lines; then the supervisor restarts vLLM.
    await eventually(lambda: supervisor.snapshot.restarts == before.restarts + 1
                     and supervisor.snapshot.ready and supervisor.snapshot.model == REALTIME_MODEL,
                     timeout=RESTART_TIMEOUT, interval=0.2)
    new_logs = set(failure_dir.glob("*.log")) - old_logs
    assert len(new_logs) == 1, new_logs
    crash_log = new_logs.pop()
    assert supervisor.snapshot.last_crash_log == str(crash_log)
    text = crash_log.read_text()
    assert f"model: {REALTIME_MODEL}" in text and "flavour: vllm" in text and "backend: process" in text
    assert "killed by signal 9" in text
    # vLLM's own output up to the kill: uvicorn logged the stream's request when it began answering it.
    assert '"POST /v1/chat/completions HTTP/1.1" 200' in text
    assert supervisor.backend.pid not in (None, pid)  # type: ignore[attr-defined]

    # Realtime is served by the restarted vLLM.
    reply = await gw.sdk().completions.create(model=REALTIME_MODEL, prompt="after the crash", max_tokens=3)
    assert reply.choices and reply.usage and reply.usage.completion_tokens > 0

    # Every job completes; those cut off by the crash were retried, their record naming the crash log.
    retried = []
    for job_id in ids:
        job = await gw.wait_job(job_id, {"completed", "failed"}, timeout=RESTART_TIMEOUT)
        assert job["status"] == "completed", (job["error"], job["attempts"], job["flags"])
        assert job["response"]["usage"]["completion_tokens"] == 1000
        if job["attempts"] > 1:
            retried.append(job)
    assert retried, "no batch job was in flight when vLLM was killed"
    for job in retried:
        # Normally 2; a third is legitimate when a loaded machine notices the crash late.
        assert 2 <= job["attempts"] <= gw.settings.batch_max_attempts
        assert "runtime_crash" in job["flags"] and "connection_error" in job["flags"]
        recorded = await gw.app[REDIS].hget(gw.app[REDIS_KEYS].job(job["id"]), "crash_log")
        assert recorded is not None and Path(recorded.decode()) == crash_log
    retry_events = [e for e in await gw.job_events() if e["job_id"] in set(ids) and e["event"] == "retried"]
    assert {e["job_id"] for e in retry_events} == {j["id"] for j in retried}
    assert all(e.get("crash_log") == str(crash_log) for e in retry_events)


async def _read_until_quiet(resp: aiohttp.ClientResponse, quiet: float) -> bytes:
    """What the stream delivers until it ends or stays silent for `quiet` seconds."""
    raw = b""
    while not resp.content.at_eof():
        try:
            raw += await asyncio.wait_for(resp.content.readany(), quiet)
        except TimeoutError:
            break
    return raw


async def _any_running(gw: Gateway, ids: list[str]) -> bool:
    for job_id in ids:
        if (await gw.job(job_id))["status"] == "running":
            return True
    return False
