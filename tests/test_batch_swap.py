"""Model swaps: a batch group for another model, realtime arriving mid-group (503 then served), swap back."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.bootstrap import create_app
from gateway.http.appkeys import ACTIVITY, DISPATCHER, SUPERVISOR
from tests.api_helpers import events, job_status, submit, wait_status
from tests.conftest import REALTIME_MODEL, auth, eventually, wait_ready

pytestmark = pytest.mark.slow  # model swaps on a process runtime

OTHER = "test-org/batch-model"


def swap_settings(make_settings: Callable[..., Any], tmp_path: Path, **extra: Any) -> Any:
    values: dict[str, Any] = {
        "runtime_backend": "process", "runtime_url": "", "runtime_pid_file": str(tmp_path / "runtime.pid"),
        "runtime_args": "--sim-ttft 0.4", "max_concurrent_batch": 2, "swap_realtime_idle_seconds": 0.3,
        "realtime_min_residency_seconds": 1, "swap_grace_seconds": 0, "batch_max_residency_seconds": 300,
    }
    values.update(extra)
    return make_settings(**values)


async def realtime_request(client: Any) -> Any:
    return await client.post("/v1/completions", json={"model": REALTIME_MODEL, "prompt": "hello", "max_tokens": 2},
                             headers=auth("realtime"))


async def run_swap_scenario(client: Any, jobs: int = 8, sleep_mode: bool = False) -> None:
    """Queue a group for another model, send realtime traffic mid-group, check every rule on the way."""
    app = client.app
    supervisor, dispatcher = app[SUPERVISOR], app[DISPATCHER]
    assert dispatcher.sleep_mode is sleep_mode
    rt_job = await submit(client, {"model": REALTIME_MODEL, "prompt": "on the hot model", "max_tokens": 2})
    await wait_status(client, rt_job["id"], {"completed"}, timeout=30)
    ids = [(await submit(client, {"model": OTHER, "prompt": f"group job {i}", "max_tokens": 2}))["id"]
           for i in range(jobs)]

    # Realtime idle -> the dispatcher swaps to the other model and drains its jobs as a group.
    batch_runtime = (lambda: dispatcher.batch_runtime or supervisor) if sleep_mode else (lambda: supervisor)
    await eventually(lambda: dispatcher.status().group == OTHER and batch_runtime().snapshot.ready
                     and batch_runtime().snapshot.model == OTHER, timeout=60, interval=0.02)
    await eventually(lambda: dispatcher.status().in_flight > 0, timeout=30, interval=0.01)
    realtime_pid = getattr(supervisor.backend, "pid", None)
    if sleep_mode:
        # The realtime runtime sleeps beside the batch one instead of being stopped.
        assert supervisor.snapshot.state == "sleeping" and supervisor.snapshot.model == REALTIME_MODEL
        assert batch_runtime() is not supervisor and realtime_pid is not None

    # A realtime request mid-group: 503 with Retry-After, and the realtime model is asked back.
    arrived = time.monotonic()
    resp = await realtime_request(client)
    assert resp.status == 503
    assert int(resp.headers["Retry-After"]) >= 1
    assert (await resp.json())["error"]["code"] == ("runtime_sleeping" if sleep_mode else "runtime_swapping")
    assert app[ACTIVITY].wanted.is_set()
    while True:  # what a client honouring Retry-After (quickly) does
        resp = await realtime_request(client)
        if resp.status == 200:
            break
        assert resp.status == 503
        assert time.monotonic() - arrived < 120, "realtime never came back"
        await asyncio.sleep(0.1)
    assert supervisor.snapshot.model == REALTIME_MODEL
    if sleep_mode:
        assert supervisor.backend.pid == realtime_pid, "woken, not restarted"
        assert dispatcher.batch_runtime is None

    # Jobs cut off by the swap went back to the queue without costing an attempt; after realtime has
    # been idle again the group resumes, and every job completes exactly once.
    for job_id in ids:
        job = await wait_status(client, job_id, {"completed", "failed"}, timeout=90)
        assert job["status"] == "completed", job
        assert job["response"]["model"] == OTHER
    log = await events(client)
    preempted = [e for e in log if e["event"] == "requeued" and e.get("reason") == "preempted"]
    assert preempted, "the realtime request arrived with batch requests in flight"
    for e in preempted:
        job = await wait_status(client, e["job_id"], {"completed"})
        assert job["attempts"] == 1
    assert Counter(e["job_id"] for e in log if e["event"] == "completed") == {i: 1 for i in [rt_job["id"], *ids]}

    # No interleaving: between consecutive swaps only one model's jobs start.
    reasons = [s["reason"] for s in dispatcher.swaps]
    assert reasons[:2] == ["batch_group", "realtime_wanted"], dispatcher.swaps
    await eventually(lambda: dispatcher.status().group is None and dispatcher.swaps[-1]["reason"] == "group_done"
                     and supervisor.snapshot.model == REALTIME_MODEL and supervisor.snapshot.ready, timeout=60)
    # A group may be abandoned while loading when realtime traffic arrives; nothing else may fail.
    assert all(s["error"] in (None, "realtime traffic arrived while the batch model was loading")
               for s in dispatcher.swaps), dispatcher.swaps


async def test_swap_out_and_back_with_realtime_mid_group(aiohttp_client: Any, make_settings: Callable[..., Any],
                                                         tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(swap_settings(make_settings, tmp_path)))
    await wait_ready(client.app, timeout=60)
    await run_swap_scenario(client)


async def test_other_model_waits_while_realtime_is_busy(aiohttp_client: Any, make_settings: Callable[..., Any],
                                                        tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(swap_settings(make_settings, tmp_path,
                                                           swap_realtime_idle_seconds=1.5,
                                                           runtime_args="")))
    await wait_ready(client.app, timeout=60)
    # Realtime traffic every 0.2 s keeps the runtime on the realtime model.
    assert (await realtime_request(client)).status == 200
    job = await submit(client, {"model": OTHER, "prompt": "wait for idle", "max_tokens": 2})
    for _ in range(12):
        assert (await realtime_request(client)).status == 200
        await asyncio.sleep(0.2)
    assert client.app[SUPERVISOR].snapshot.model == REALTIME_MODEL
    # Read now, not waited for: after 2.4 s of realtime traffic the job has not started and nothing swapped.
    waiting = await job_status(client, job["id"])
    assert waiting["status"] == "queued" and waiting["started_at"] is None and waiting["attempts"] == 0, waiting
    assert client.app[DISPATCHER].swaps == []
    assert [e["event"] for e in await events(client) if e["job_id"] == job["id"]] == ["enqueued"]
    # Once realtime is quiet for SWAP_REALTIME_IDLE_SECONDS the group runs and the realtime model returns.
    done = await wait_status(client, job["id"], {"completed"}, timeout=60)
    assert done["response"]["model"] == OTHER
    await eventually(lambda: client.app[SUPERVISOR].snapshot.model == REALTIME_MODEL
                     and client.app[SUPERVISOR].snapshot.ready, timeout=60)


@pytest.mark.docker
async def test_swap_on_the_docker_backend(aiohttp_client: Any, docker_settings: Callable[..., Any]) -> None:
    """The same scenario with the runtime in a container (the simulator image): swap out, back, resume."""
    settings = docker_settings(runtime_url="", runtime_args="--sim-ttft 0.4", max_concurrent_batch=2,
                               swap_realtime_idle_seconds=0.3, realtime_min_residency_seconds=1,
                               swap_grace_seconds=0, batch_max_residency_seconds=300)
    client = await aiohttp_client(create_app(settings))
    await wait_ready(client.app, timeout=90)
    await run_swap_scenario(client, jobs=6)


async def test_swap_with_sleep_mode_wakes_instead_of_restarting(
        aiohttp_client: Any, make_settings: Callable[..., Any], tmp_path: Path) -> None:
    settings = swap_settings(make_settings, tmp_path, runtime_sleep_mode=True,
                             runtime_args="--sim-ttft 0.4 --sim-sleep-delay 0.1 --sim-wake-delay 0.2")
    client = await aiohttp_client(create_app(settings))
    await wait_ready(client.app, timeout=60)
    await run_swap_scenario(client, sleep_mode=True)
    assert all(s["mode"] == "sleep" for s in client.app[DISPATCHER].swaps)


async def test_max_residency_ends_a_group(aiohttp_client: Any, make_settings: Callable[..., Any],
                                          tmp_path: Path) -> None:
    """A group that outstays BATCH_MAX_RESIDENCY_SECONDS hands the runtime back; its jobs resume later."""
    client = await aiohttp_client(create_app(swap_settings(make_settings, tmp_path, max_concurrent_batch=1,
                                                           batch_max_residency_seconds=0.5,
                                                           realtime_min_residency_seconds=0.5)))
    await wait_ready(client.app, timeout=60)
    ids = [(await submit(client, {"model": OTHER, "prompt": f"long group {i}", "max_tokens": 2}))["id"]
           for i in range(4)]
    for job_id in ids:
        job = await wait_status(client, job_id, {"completed", "failed"}, timeout=90)
        assert job["status"] == "completed" and job["response"]["model"] == OTHER, job
    log = await events(client)
    # Jobs cut off when the group outstayed its residency were requeued and each completed exactly once.
    assert Counter(e["job_id"] for e in log if e["event"] == "completed") == dict.fromkeys(ids, 1)
    dispatcher = client.app[DISPATCHER]
    await eventually(lambda: dispatcher.status().group is None and dispatcher.swaps[-1]["reason"] == "group_done",
                     timeout=60)
    reasons = [s["reason"] for s in dispatcher.swaps]
    assert "max_residency" in reasons, reasons
    # Between two group entries the realtime model always came back.
    assert reasons[0] == "batch_group"
    assert all(a != b for a, b in zip(reasons, reasons[1:], strict=False) if a == "batch_group")


async def test_model_that_cannot_load_fails_its_jobs(aiohttp_client: Any, make_settings: Callable[..., Any]) -> None:
    """An external runtime cannot switch models: after BATCH_MAX_ATTEMPTS failed loads the jobs fail."""
    client = await aiohttp_client(create_app(make_settings(batch_max_attempts=1, swap_realtime_idle_seconds=0,
                                                           realtime_min_residency_seconds=0)))
    await wait_ready(client.app)
    created = await submit(client, {"model": OTHER, "prompt": "nowhere to run"})
    job = await wait_status(client, created["id"], {"failed"}, timeout=30)
    assert job["error"]["code"] == "model_load_failed" and "model_load_failed" in job["error"]["flags"]
    assert OTHER in job["error"]["message"]
    assert client.app[SUPERVISOR].snapshot.model == REALTIME_MODEL
    # The realtime model's own jobs are unaffected.
    ok = await submit(client, {"model": REALTIME_MODEL, "prompt": "fine"})
    done = await wait_status(client, ok["id"], {"completed", "failed"})
    assert done["status"] == "completed" and done["attempts"] == 1 and done["error"] is None, done
    assert done["response"]["model"] == REALTIME_MODEL
    assert [e["event"] for e in await events(client) if e["job_id"] == created["id"]][-1] == "failed"


async def test_request_cut_off_by_a_restart_gets_503_not_502(aiohttp_client: Any, make_settings: Callable[..., Any],
                                                           tmp_path: Path) -> None:
    """A realtime request already sent when a restart (or a swap) stops the runtime: the client is told to
    retry (503 with Retry-After), as one arriving a moment later would be, not that the runtime broke."""
    client = await aiohttp_client(create_app(swap_settings(make_settings, tmp_path, runtime_args="--sim-ttft 5")))
    await wait_ready(client.app, timeout=30)
    supervisor = client.app[SUPERVISOR]
    pending = asyncio.create_task(realtime_request(client))
    await eventually(lambda: client.app[ACTIVITY].in_flight > 0, timeout=10, interval=0.01)
    await asyncio.sleep(0.2)  # the request is at the runtime, waiting for its first token
    await supervisor.restart()
    resp = await asyncio.wait_for(pending, 30)
    body = await resp.json()
    assert resp.status == 503, body
    assert int(resp.headers["Retry-After"]) >= 1
    assert body["error"]["code"] in ("runtime_starting", "runtime_stopped"), body
