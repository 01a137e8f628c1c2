"""vLLM sleep mode through the real endpoints (VLLM_SERVER_DEV_MODE=1: POST /sleep?level=1, GET /is_sleeping,
POST /wake_up). On the CPU no memory is freed, but the engine state is real: requests wait while asleep.

1. A realtime vLLM put to sleep with no batch group is woken by the dispatcher (same process).
2. RUNTIME_SLEEP_MODE=true: a batch group for the other model runs in a second vLLM beside the sleeping
   realtime one; realtime traffic (or the end of the group) stops the batch server and wakes the realtime
   one, which is never restarted.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.actors.supervisor import RuntimeState
from gateway.bootstrap import create_app
from gateway.http.appkeys import DISPATCHER
from tests_vllm.conftest import OTHER_MODEL, REALTIME_MODEL, START_TIMEOUT, Gateway, eventually, gateway_settings


async def is_sleeping(gw: Gateway, base_url: str) -> bool:
    async with gw.client.session.get(base_url + "/is_sleeping") as resp:
        assert resp.status == 200
        return bool((await resp.json())["is_sleeping"])


async def sleep_state(gw: Gateway, base_url: str) -> str:
    """vLLM's vllm:engine_sleep_state gauge: the sleep_state label whose value is 1."""
    async with gw.client.session.get(base_url + "/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith("vllm:engine_sleep_state{") and line.endswith(" 1.0"):
            return line.split('sleep_state="', 1)[1].split('"', 1)[0]
    raise AssertionError("no vllm:engine_sleep_state sample is 1")


async def test_runtime_asleep_without_a_group_is_woken(gw: Gateway) -> None:
    """The supervisor sends the real /sleep; with no batch group to explain it, the dispatcher wakes the same
    vLLM process through /wake_up (no restart) and realtime is served again."""
    supervisor = gw.supervisor
    base_url = gw.runtime_url
    pid = supervisor.backend.pid  # type: ignore[attr-defined]
    woken_before = sum(1 for s in gw.app[DISPATCHER].swaps if s["reason"] == "realtime_wanted")

    snap = await supervisor.sleep()
    assert snap.base_url == base_url
    assert snap.state is RuntimeState.SLEEPING or supervisor.snapshot.ready  # the dispatcher may be quick
    await eventually(lambda: supervisor.snapshot.ready, timeout=60)
    assert not await is_sleeping(gw, base_url)
    assert await sleep_state(gw, base_url) == "awake"
    assert supervisor.backend.pid == pid  # type: ignore[attr-defined]
    assert sum(1 for s in gw.app[DISPATCHER].swaps if s["reason"] == "realtime_wanted") == woken_before + 1
    resp = await gw.post("/v1/completions", {"model": REALTIME_MODEL, "prompt": "x", "max_tokens": 2})
    assert resp.status == 200


@pytest.mark.timeout(1200)
async def test_sleep_mode_group_sleeps_and_wakes_realtime_instead_of_restarting(
        gw: Gateway, session_tmp: Path, session_prefix: str) -> None:
    """RUNTIME_SLEEP_MODE=true: the group runs in a second vLLM beside the sleeping realtime one; realtime
    arriving mid-group gets 503 `runtime_sleeping`, the batch vLLM is stopped and the realtime one woken;
    the group resumes and, once done, realtime is woken again. The realtime vLLM is never restarted."""
    # At most two vLLM servers at once: the session's runtime is stopped while this gateway runs.
    await gw.supervisor.stop_runtime()
    tmp = session_tmp / "sleep-mode"
    tmp.mkdir(exist_ok=True)
    settings = gateway_settings(tmp, session_prefix + "sleep:", runtime_sleep_mode=True)
    client = TestClient(TestServer(create_app(settings), host="127.0.0.1"))
    await client.start_server()
    other = Gateway(client, settings, tmp)
    try:
        await _sleep_mode_scenario(other)
    except AssertionError as exc:
        # What the dispatcher did, for a failure that depends on timing.
        history = [(e["job_id"][-6:], e["event"], e.get("reason", "")) for e in await other.job_events()]
        raise AssertionError(f"{exc}\nswaps: {other.app[DISPATCHER].swaps}\njob events: {history}") from exc
    finally:
        await client.close()
        gw.supervisor.request_start()


async def _sleep_mode_scenario(other: Gateway) -> None:
    """The steps of the sleep-mode test (its caller adds the dispatcher's history to a failure)."""
    supervisor, dispatcher = other.supervisor, other.app[DISPATCHER]
    assert dispatcher.sleep_mode
    await supervisor.wait_ready(START_TIMEOUT)
    realtime_url, realtime_pid = other.runtime_url, supervisor.backend.pid  # type: ignore[attr-defined]

    # n=4 x 900 tokens (ignore_eos): each job keeps the batch vLLM busy for seconds, so the group is still
    # running when the checks below look at it.
    ids = [(await other.submit({"model": OTHER_MODEL, "prompt": f"sleepy {i}", "max_tokens": 900, "n": 4,
                                "ignore_eos": True}))["id"] for i in range(6)]
    # The realtime vLLM goes to sleep and a second vLLM serves the group beside it (checked in detail
    # when the group resumes: here realtime must arrive while the group's first requests run).
    await eventually(lambda: dispatcher.group == OTHER_MODEL, timeout=START_TIMEOUT, interval=0.02)
    assert supervisor.snapshot.state is RuntimeState.SLEEPING
    await eventually(lambda: len(dispatcher.inflight) > 0, timeout=60, interval=0.01)

    # Realtime mid-group: 503 runtime_sleeping with Retry-After, then served by the woken process.
    resp = await other.post("/v1/completions", {"model": REALTIME_MODEL, "prompt": "wake", "max_tokens": 2})
    assert resp.status == 503
    assert int(resp.headers["Retry-After"]) >= 1
    assert (await resp.json())["error"]["code"] == "runtime_sleeping"
    arrived = time.monotonic()
    while True:
        resp = await other.post("/v1/completions", {"model": REALTIME_MODEL, "prompt": "wake", "max_tokens": 2})
        if resp.status == 200:
            break
        assert resp.status == 503, await resp.text()
        assert time.monotonic() - arrived < START_TIMEOUT, "the realtime model never came back"
        await asyncio.sleep(0.2)
    print(f"\n[test-vllm] sleep mode: realtime served {time.monotonic() - arrived:.1f} s after it asked "
          "(batch vLLM stopped, realtime vLLM woken)")
    assert supervisor.backend.pid == realtime_pid  # type: ignore[attr-defined]
    assert not await is_sleeping(other, realtime_url)

    preempted = [e for e in await other.job_events() if e["event"] == "requeued" and e.get("reason") == "preempted"]
    assert preempted, "the realtime request arrived after the group's requests had finished"

    # The group resumes: realtime asleep again, the batch model in a second vLLM beside it (the state is
    # read in the same tick that sees the group, then vLLM is asked while the group's jobs run).
    seen: dict[str, Any] = {}

    def group_running() -> bool:
        batch_runtime = dispatcher.batch_runtime
        if dispatcher.group != OTHER_MODEL or batch_runtime is None:
            return False
        seen.update(state=supervisor.snapshot.state, batch=batch_runtime.snapshot)
        return True

    await eventually(group_running, timeout=START_TIMEOUT, interval=0.05)
    assert seen["state"] is RuntimeState.SLEEPING
    assert seen["batch"].ready and seen["batch"].model == OTHER_MODEL
    assert seen["batch"].base_url != realtime_url
    assert await is_sleeping(other, realtime_url)
    assert await sleep_state(other, realtime_url) == "weights_offloaded"
    assert supervisor.backend.pid == realtime_pid  # type: ignore[attr-defined]
    for job_id in ids:
        job = await other.wait_job(job_id, {"completed", "failed"}, timeout=3 * START_TIMEOUT)
        assert job["status"] == "completed", (job["error"], job["attempts"], job["flags"])
        assert job["response"]["model"] == OTHER_MODEL
        assert job["attempts"] == 1  # preempted requests were requeued without costing an attempt
    await eventually(lambda: dispatcher.group is None and supervisor.snapshot.ready, timeout=START_TIMEOUT)
    assert supervisor.snapshot.model == REALTIME_MODEL
    assert supervisor.backend.pid == realtime_pid  # type: ignore[attr-defined]
    assert not await is_sleeping(other, realtime_url)
    assert dispatcher.batch_runtime is None
    swaps = dispatcher.swaps
    assert [s["reason"] for s in swaps] == ["batch_group", "realtime_wanted", "batch_group", "group_done"]
    assert all(s["mode"] == "sleep" and s["error"] is None for s in swaps), swaps
    resp = await other.post("/v1/completions", {"model": REALTIME_MODEL, "prompt": "awake", "max_tokens": 2})
    assert resp.status == 200
