"""Co-serving: the admission controller's decisions (injectable clock), priority on the upstream body,
and why queued jobs wait."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web

from gateway.batch.coserve import (
    AdmissionController,
    ControllerConfig,
    LatencyWindow,
    RuntimeLoad,
    batch_priority,
    parse_runtime_load,
)
from gateway.bootstrap import create_app
from gateway.settings import Settings
from tests.conftest import REALTIME_MODEL, auth, eventually, wait_ready


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _windows(clock: Clock, ttft: list[float], itl: list[float] = ()) -> tuple[LatencyWindow, LatencyWindow]:
    t, i = LatencyWindow(10.0, clock=clock), LatencyWindow(10.0, clock=clock)
    for value in ttft:
        t.add(value)
    for value in itl:
        i.add(value)
    return t, i


def test_controller_backs_off_fast_and_grows_slowly() -> None:
    clock = Clock()
    ctl = AdmissionController(ControllerConfig(max_limit=16, ttft_slo=0.5, itl_slo=0.1, cooldown=2.0,
                                               resume_share=1.0), clock=clock)
    assert ctl.limit == 16
    assert ctl.step(*_windows(clock, []), RuntimeLoad(), realtime_active=True, priority=True).reason == "realtime_back"
    clock.now += 0.5
    d = ctl.step(*_windows(clock, [0.9] * 10), RuntimeLoad(), realtime_active=True, priority=True)
    assert (d.limit, d.reason, d.changed) == (8, "ttft_over_slo", True)
    clock.now += 0.5
    assert ctl.step(*_windows(clock, [0.9] * 10), RuntimeLoad(), realtime_active=True, priority=True).limit == 4
    clock.now += 0.5
    # Right after a decrease the controller holds, so the next measurements reflect the new limit.
    fast = _windows(clock, [0.05] * 10)
    assert ctl.step(*fast, RuntimeLoad(), realtime_active=True, priority=True).reason == "cooldown"
    clock.now += 3
    fast = _windows(clock, [0.05] * 10)
    grown = [ctl.step(*fast, RuntimeLoad(), realtime_active=True, priority=True).limit for _ in range(3)]
    assert grown == [5, 6, 7]  # one slot per step
    # Between the headroom mark (half the TTFT SLO) and the SLO it holds.
    clock.now += 3
    near = _windows(clock, [0.4] * 10)
    assert ctl.step(*near, RuntimeLoad(), realtime_active=True, priority=True).reason == "holding"
    assert ctl.limit == 7
    # ITL over its SLO backs off too; no realtime traffic at all gives batch every slot.
    itl_bad = _windows(clock, [0.05] * 10, [0.3] * 10)
    assert ctl.step(*itl_bad, RuntimeLoad(), realtime_active=True, priority=True).reason == "itl_over_slo"
    assert ctl.limit == 3
    assert ctl.step(*_windows(clock, []), RuntimeLoad(), realtime_active=False, priority=True).limit == 16
    # When realtime comes back, the limit starts where realtime was last served, not at every slot.
    clock.now += 0.5
    d = ctl.step(*_windows(clock, []), RuntimeLoad(), realtime_active=True, priority=True)
    assert (d.limit, d.reason) == (3, "realtime_back")
    assert [d.reason for d in ctl.history][:3] == ["realtime_back", "ttft_over_slo", "ttft_over_slo"]


def test_controller_starts_cautiously_when_realtime_first_arrives() -> None:
    clock = Clock()
    ctl = AdmissionController(ControllerConfig(max_limit=256, ttft_slo=0.3, itl_slo=0.05), clock=clock)
    # Before any realtime traffic batch has every slot; the first realtime requests meet an eighth of them.
    assert ctl.step(*_windows(clock, []), RuntimeLoad(), realtime_active=False, priority=True).limit == 256
    d = ctl.step(*_windows(clock, []), RuntimeLoad(), realtime_active=True, priority=True)
    assert (d.limit, d.reason) == (32, "realtime_back")


def test_controller_judges_only_samples_taken_since_its_last_cut() -> None:
    clock = Clock()
    ctl = AdmissionController(ControllerConfig(max_limit=16, ttft_slo=0.5, itl_slo=0.1, resume_share=1.0),
                              clock=clock)
    ttft, itl = _windows(clock, [])
    ctl.step(ttft, itl, RuntimeLoad(), realtime_active=True, priority=True)
    clock.now += 0.5
    for _ in range(10):
        ttft.add(0.9)
    assert ctl.step(ttft, itl, RuntimeLoad(), realtime_active=True, priority=True).limit == 8
    # The same slow samples, still inside the 10 s window, show the old limit's load: no second cut.
    clock.now += 0.5
    assert ctl.step(ttft, itl, RuntimeLoad(), realtime_active=True, priority=True).limit == 8
    # New slow samples do cut again.
    clock.now += 0.5
    for _ in range(3):
        ttft.add(0.9)
    assert ctl.step(ttft, itl, RuntimeLoad(), realtime_active=True, priority=True).limit == 4


def test_controller_cuts_for_a_stream_still_waiting_for_its_first_token() -> None:
    clock = Clock()
    ctl = AdmissionController(ControllerConfig(max_limit=16, ttft_slo=0.5, itl_slo=0.1, resume_share=1.0),
                              clock=clock)
    empty = _windows(clock, [])
    ctl.step(*empty, RuntimeLoad(), realtime_active=True, priority=True)
    clock.now += 0.5
    # No TTFT sample yet, but one stream has waited longer than the SLO: that TTFT can only be worse.
    d = ctl.step(*empty, RuntimeLoad(), realtime_active=True, priority=True, first_token_wait=0.8)
    assert (d.limit, d.reason) == (8, "ttft_over_slo")
    clock.now += 3
    d = ctl.step(*empty, RuntimeLoad(), realtime_active=True, priority=True, first_token_wait=0.1)
    assert (d.limit, d.reason) == (9, "headroom")


def test_activity_counts_streams_waiting_for_their_first_token() -> None:
    from gateway.activity import RealtimeActivity

    now = [100.0]
    activity = RealtimeActivity(clock=lambda: now[0])
    assert activity.first_token_wait() == 0.0
    first, second = activity.await_first_token(), activity.await_first_token()
    now[0] += 2.0
    assert activity.first_token_wait() == 2.0
    activity.first_token(first, 2.0)
    assert activity.ttft.values() == [2.0]
    activity.stream_ended(first)
    activity.stream_ended(second)  # it failed before any token: no sample, no longer waiting
    assert activity.first_token_wait() == 0.0 and activity.ttft.values() == [2.0]


def _active(cfg: ControllerConfig, clock: Clock) -> AdmissionController:
    """A controller past its first step with realtime traffic (the resume to a cautious limit)."""
    ctl = AdmissionController(cfg, clock=clock)
    ctl.step(*_windows(clock, []), RuntimeLoad(), realtime_active=True, priority=True)
    return ctl


def test_controller_reads_the_runtime_queue_only_without_priority() -> None:
    clock = Clock()
    cfg = ControllerConfig(max_limit=8, ttft_slo=0.5, itl_slo=0.1, resume_share=1.0)
    fine = _windows(clock, [0.05] * 10)
    queued = RuntimeLoad(waiting=3, running=8, kv_cache_usage=0.5)
    # FCFS: requests waiting in the runtime make realtime wait behind batch.
    assert _active(cfg, clock).step(*fine, queued, realtime_active=True,
                                                      priority=False).reason == "runtime_queue"
    # Priority: what waits there is batch work, which realtime overtakes; only a full KV cache matters.
    ctl = _active(cfg, clock)
    ctl.limit = 4
    assert ctl.step(*fine, queued, realtime_active=True, priority=True).reason == "headroom"
    full = RuntimeLoad(waiting=3, running=8, kv_cache_usage=0.99)
    assert ctl.step(*fine, full, realtime_active=True, priority=True).reason == "kv_cache_full"
    # Too few samples to judge latency: the runtime's load decides alone.
    thin = _windows(clock, [5.0])
    assert ctl.step(*thin, RuntimeLoad(waiting=0), realtime_active=True, priority=True).reason != "ttft_over_slo"


def test_latency_window_forgets_old_samples() -> None:
    clock = Clock()
    window = LatencyWindow(10.0, clock=clock)
    window.add(1.0)
    clock.now += 5
    window.add(2.0)
    assert window.quantile(0.95) == 2.0 and len(window.values()) == 2
    clock.now += 6
    assert window.values() == [2.0]
    clock.now += 10
    assert window.quantile(0.5) is None


def test_priorities_put_realtime_first_then_batch_by_job_priority_then_evals() -> None:
    assert batch_priority(9, is_eval=False) == 10 and batch_priority(0, is_eval=False) == 19
    assert batch_priority(9, is_eval=True) == 30


def test_runtime_load_from_vllm_and_sglang_metrics() -> None:
    vllm = ('# HELP x\nvllm:num_requests_waiting{engine="0",model_name="m"} 2.0\n'
            'vllm:num_requests_waiting{engine="1",model_name="m"} 1.0\n'
            'vllm:num_requests_running{engine="0",model_name="m"} 5.0\n'
            'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n')
    assert parse_runtime_load(vllm) == RuntimeLoad(3.0, 5.0, 0.25)
    assert parse_runtime_load("sglang:num_queue_reqs 4\nsglang:token_usage 0.5\n") == RuntimeLoad(4.0, None, 0.5)
    assert parse_runtime_load("nothing here\n") == RuntimeLoad()


# --- priority on the upstream body, end to end through the gateway
@pytest.fixture
async def recording_runtime(aiohttp_server: Any) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A runtime that records each generation body and answers like vLLM (non-streamed)."""
    seen: list[dict[str, Any]] = []

    async def generate(request: web.Request) -> web.Response:
        seen.append(orjson.loads(await request.read()))
        return web.json_response({"id": "x", "object": "chat.completion", "model": REALTIME_MODEL,
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": REALTIME_MODEL, "object": "model"}]})

    async def health(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_post("/v1/chat/completions", generate)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    server = await aiohttp_server(app)
    yield str(server.make_url("")).rstrip("/"), seen


@pytest.mark.parametrize("mode", ["on", "off"])
async def test_upstream_bodies_carry_priority_only_when_enabled(
        mode: str, aiohttp_client: Any, make_settings: Callable[..., Settings],
        recording_runtime: tuple[str, list[dict[str, Any]]]) -> None:
    url, seen = recording_runtime
    client = await aiohttp_client(create_app(make_settings(runtime_url=url, runtime_priority_scheduling=mode)))
    await wait_ready(client.app)
    chat = {"model": REALTIME_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    # A client asking for a better place than realtime's gets realtime's, never its own.
    for body in (chat, {**chat, "priority": -100}):
        resp = await client.post("/v1/chat/completions", json=body, headers=auth("realtime"))
        assert resp.status == 200, await resp.text()
    resp = await client.post("/v1/batch/chat/completions", json={**chat, "priority": 7}, headers=auth("batch"))
    assert resp.status == 202
    await eventually(lambda: len(seen) == 3, timeout=20)
    if mode == "on":
        assert [b["priority"] for b in seen] == [0, 0, 12]
    else:
        assert all("priority" not in b for b in seen), seen


@pytest.mark.slow
async def test_queued_jobs_say_why_they_wait(aiohttp_client: Any, make_settings: Callable[..., Settings]) -> None:
    from gateway.http.appkeys import DISPATCHER

    client = await aiohttp_client(create_app(make_settings(coserve_adaptive=False)))
    await wait_ready(client.app)
    client.app[DISPATCHER].set_limit(0, "ttft_over_slo")  # as the controller does when realtime suffers
    chat = {"model": REALTIME_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    job = await (await client.post("/v1/batch/chat/completions", json=chat, headers=auth("batch"))).json()
    got: dict[str, Any] = {}

    async def published() -> bool:
        view = await (await client.get(f"/v1/jobs/{job['id']}", headers=auth("batch"))).json()
        assert view["status"] == "queued"
        got.clear()
        got.update(view["waiting_reason"] or {})
        return got.get("code") == "coserving_paused"

    await eventually(published, timeout=15)
    assert "REALTIME_TTFT_SLO_MS" in got["message"] and got["node"]
    monitor = await (await client.get(f"/monitor/jobs/{job['id']}", headers=auth("monitor"))).json()
    assert monitor["waiting_reason"]["code"] == "coserving_paused"
    # Once the limit allows it the job runs, and a finished job has no waiting reason.
    client.app[DISPATCHER].set_limit(2, "headroom")

    async def done() -> bool:
        view = await (await client.get(f"/v1/jobs/{job['id']}", headers=auth("batch"))).json()
        return view["status"] == "completed" and view["waiting_reason"] is None

    await eventually(done, timeout=15)


@pytest.mark.slow
async def test_waiting_reasons_of_the_dispatcher(aiohttp_client: Any, make_settings: Callable[..., Settings]) -> None:
    from gateway.http.appkeys import ACTIVITY, DISPATCHER

    client = await aiohttp_client(create_app(make_settings(runtime_backend="process", swap_realtime_idle_seconds=30,
                                                           realtime_min_residency_seconds=120)))
    await wait_ready(client.app)
    dispatcher = client.app[DISPATCHER]
    heads = {REALTIME_MODEL: 5.0, "other/model": 10.0}
    # The realtime queue is ahead of the other model's.
    assert dispatcher.waiting_reason("other/model", heads)["code"] == "realtime_queue_first"
    assert dispatcher.waiting_reason("other/model", {"other/model": 1.0})["code"] == "swap_pending"
    # Realtime traffic holds a swap back for SWAP_REALTIME_IDLE_SECONDS, with the time it opens.
    client.app[ACTIVITY].begin()
    client.app[ACTIVITY].end()
    reason = dispatcher.waiting_reason("other/model", {"other/model": 1.0})
    assert reason["code"] == "swap_window" and 25 < reason["seconds"] <= 30 and reason["until"]
    # Co-served jobs wait for a slot when the controller has lowered the limit to zero.
    dispatcher.set_limit(0, "ttft_over_slo")
    assert dispatcher.waiting_reason(REALTIME_MODEL, heads)["code"] == "coserving_paused"
    dispatcher.set_limit(8, "headroom")
    assert dispatcher.waiting_reason(REALTIME_MODEL, heads)["code"] == "next"


# --- end to end on the contention simulator: a realtime burst lowers the batch limit, and it recovers
@pytest.fixture
def contention_sim() -> Any:
    """The simulator with its engine model, where a prefill-heavy batch slows realtime down: a step costs
    0.05 ms per prefill token, so a step full of batch prompts (8,192 tokens) takes ~0.4 s."""
    from tests.conftest import start_simulator

    proc, url = start_simulator(REALTIME_MODEL, "--served-model-name", REALTIME_MODEL, "--sim-profile", "gpu-like",
                                "--sim-step-per-prefill-token-ms", "0.05", "--max-model-len", "4096")
    yield url
    proc.terminate()
    proc.wait(10)


async def test_a_realtime_burst_lowers_the_batch_limit_and_it_recovers(
        aiohttp_client: Any, make_settings: Callable[..., Settings], contention_sim: str) -> None:
    import asyncio

    from gateway.http.appkeys import DISPATCHER

    client = await aiohttp_client(create_app(make_settings(
        runtime_url=contention_sim, max_concurrent_batch=16, coserve_adaptive=True,
        coserve_interval_seconds=0.1, coserve_window_seconds=1.0, realtime_ttft_slo_ms=100,
        realtime_itl_slo_ms=100, runtime_priority_scheduling="off")))
    await wait_ready(client.app)
    dispatcher = client.app[DISPATCHER]
    # A backlog of prefill-heavy batch jobs; with no realtime traffic batch has every slot.
    batch = {"model": REALTIME_MODEL, "prompt": [7] * 2000, "max_tokens": 64}
    for _ in range(48):
        resp = await client.post("/v1/batch/completions", json=batch, headers=auth("batch"))
        assert resp.status == 202, await resp.text()
    await eventually(lambda: dispatcher.status().sending >= 8, timeout=30)
    assert dispatcher.limit == 16

    # A burst of realtime streams: batch prefill makes their first tokens late, and the controller backs off.
    async def stream() -> None:
        body = {"model": REALTIME_MODEL, "prompt": "hello", "max_tokens": 8, "stream": True}
        resp = await client.post("/v1/completions", json=body, headers=auth("realtime"))
        assert resp.status == 200
        await resp.read()

    breaches = ("ttft_over_slo", "itl_over_slo", "runtime_queue")
    stop = asyncio.Event()

    async def burst() -> None:
        while not stop.is_set():
            await asyncio.gather(*(stream() for _ in range(4)))

    task = asyncio.create_task(burst())
    try:
        await eventually(lambda: any(d.reason in breaches and d.changed for d in dispatcher.coserve_history()),
                         timeout=60)
        await eventually(lambda: dispatcher.limit <= 4, timeout=60)
    finally:
        stop.set()
        await task
    cut = next(d for d in dispatcher.coserve_history() if d.reason in breaches and d.changed)
    assert cut.limit < 16
    # The overview (the dashboard's co-serving panel) shows the limit, why it last changed, and the series.
    coserve = (await (await client.get("/monitor/overview", headers=auth("monitor"))).json())["coserve"]
    assert coserve["limit"] < 16 and coserve["max_limit"] == 16 and coserve["ttft_slo_ms"] == 100
    assert coserve["last_change"]["reason"] in (*breaches, "realtime_back")
    assert any(p["limit"] < 16 for p in coserve["series"]) and coserve["ttft_p95_ms"] is not None
    # Once the burst is over (no realtime request for COSERVE_WINDOW_SECONDS) batch gets every slot back.
    await eventually(lambda: dispatcher.limit == 16 and dispatcher.limit_reason == "realtime_idle", timeout=30)
    await eventually(lambda: dispatcher.status().sending > 4, timeout=30)
