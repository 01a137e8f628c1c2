"""The BatchDispatcher's scheduling decisions, one step at a time, with a fake runtime, a fake queue and a
clock the test moves by hand: which model runs, when a swap may start, residency, the swap log, job retries.

No Redis, no runtime process, no sleeps: each test calls `step()` and reads the dispatcher's public state.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.activity import RealtimeActivity
from gateway.actors.dispatcher import BatchDispatcher
from gateway.actors.supervisor import RuntimeSnapshot, RuntimeState, RuntimeUnavailable
from gateway.batch.queue import HeldJob
from gateway.flavours import flavour_for
from gateway.settings import Settings
from tests.polling import ManualClock

REALTIME = "org/realtime"
OTHER = "org/other"
THIRD = "org/third"


class FakeBackend:
    kind = "fake"
    can_swap = True


class FakeRuntime:
    """Stands in for the RuntimeSupervisor: a snapshot the dispatcher reads, and model changes it asks for."""

    def __init__(self, settings: Settings, clock: ManualClock, base_url: str = "http://127.0.0.1:9") -> None:
        self.settings = settings
        self.clock = clock
        self.backend = FakeBackend()
        self.flavour = flavour_for(settings.runtime_type)
        self.snapshot = RuntimeSnapshot(RuntimeState.READY, REALTIME, base_url, time.time())
        self.asked: list[str] = []
        self.cannot_load: set[str] = set()

    async def ensure_model(self, model: str, timeout: float | None = None) -> RuntimeSnapshot:
        self.asked.append(model)
        if model in self.cannot_load:
            self.snapshot = replace(self.snapshot, state=RuntimeState.FAILED, model=model, base_url=None)
            raise RuntimeUnavailable(f"cannot load {model}", self.snapshot)
        self.snapshot = replace(self.snapshot, state=RuntimeState.READY, model=model,
                                base_url=self.snapshot.base_url or "http://127.0.0.1:9")
        return self.snapshot

    async def wake_up(self, timeout: float = 120.0) -> RuntimeSnapshot:
        return self.snapshot

    async def restart(self) -> None:
        self.asked.append("restart")

    async def wait_changed(self, timeout: float | None = None,
                           since: RuntimeSnapshot | None = None) -> RuntimeSnapshot:
        # Nothing changes on its own here: the wait takes its full time, on the fake clock.
        self.clock.advance(timeout or 0.0)
        await asyncio.sleep(0)
        return self.snapshot


class FakeQueue:
    """The job queue's dispatcher side, in memory: queued heads per model, jobs to hand out, what was written."""

    def __init__(self) -> None:
        self.heads: dict[str, float] = {}
        self.jobs: dict[str, list[HeldJob]] = {}
        self.claims: list[tuple[str, int]] = []
        self.events: list[tuple[str, str, dict[str, str]]] = []
        self.finished: list[tuple[str, str, dict[str, Any]]] = []
        self.requeued: list[tuple[str, str]] = []

    async def ready_heads(self) -> dict[str, float]:
        return dict(self.heads)

    async def claim(self, model: str, n: int, owner: str) -> list[HeldJob]:
        self.claims.append((model, n))
        queued = self.jobs.get(model, [])
        taken, self.jobs[model] = queued[:n], queued[n:]
        if not self.jobs[model]:
            self.heads.pop(model, None)
        return taken

    async def mark_sent(self, job: HeldJob) -> int | None:
        job.sent = True
        job.fields["attempt"] = str(job.attempt + 1)
        return job.attempt

    async def update(self, job: HeldJob, fields: dict[str, str], *, attempt_delta: int = 0,
                     final: bool = False, event: str = "", reason: str = "") -> int | None:
        job.fields.update(fields)
        job.fields["attempt"] = str(job.attempt + attempt_delta)
        if event:
            self.events.append((job.id, event, {"reason": reason} if reason else {}))
        return job.attempt

    async def event(self, fields: dict[str, str], event: str, **extra: str) -> None:
        self.events.append((fields["id"], event, extra))

    async def finish(self, job: HeldJob, fields: dict[str, Any], event: str) -> bool:
        job.settled = True
        self.finished.append((job.id, event, fields))
        return True

    async def requeue(self, job: HeldJob, reason: str, count_attempt: bool = False) -> None:
        self.requeued.append((job.id, reason))

    async def release(self, job: HeldJob) -> None:
        self.requeued.append((job.id, "released"))


def job(job_id: str, model: str, attempt: int = 0) -> HeldJob:
    """A claimed job: `attempt` attempts were sent before this claim (the claim's own counts once sent)."""
    return HeldJob(job_id, "token", 0.0, {"id": job_id, "model": model, "attempt": str(attempt),
                                          "endpoint": "/v1/completions", "created_at": repr(time.time()),
                                          "request": orjson.dumps({"model": model, "prompt": "x"}).decode()})


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "realtime_model": REALTIME, "runtime_backend": "process", "runtime_failure_dir": str(tmp_path / "f"),
        "swap_realtime_idle_seconds": 30, "realtime_min_residency_seconds": 120,
        "batch_max_residency_seconds": 600, "swap_grace_seconds": 0, "batch_poll_interval": 0.5,
        "max_concurrent_batch": 2, "batch_max_attempts": 3, "coserve_adaptive": False,
        "batch_retry_backoff_seconds": 0.001, "batch_retry_backoff_max": 0.002,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


class Rig:
    """A dispatcher wired to fakes that share one clock."""

    def __init__(self, settings: Settings, session: aiohttp.ClientSession, base_url: str = "http://127.0.0.1:9"):
        self.clock = ManualClock()
        self.runtime = FakeRuntime(settings, self.clock, base_url)
        self.queue = FakeQueue()
        self.activity = RealtimeActivity(clock=self.clock)
        # The dispatcher sends through its own upstream pool; `session` is the tests' client. The fakes have
        # the parts of JobQueue and RuntimeSupervisor the dispatcher uses, not their types.
        self.dispatcher = BatchDispatcher(settings, self.queue, self.runtime, self.activity,  # type: ignore[arg-type]
                                          clock=self.clock)

    def realtime_request(self) -> None:
        self.activity.begin()
        self.activity.end()

    async def settle(self) -> None:
        """Let the job tasks the last step started run to their end."""
        for _ in range(1000):
            if not self.dispatcher.status().held:
                return
            await asyncio.sleep(0.001)
        raise AssertionError(f"jobs still held: {self.dispatcher.status().held}")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def rig(tmp_path: Path, session: aiohttp.ClientSession) -> Rig:
    return Rig(settings_for(tmp_path), session)


def reasons(rig: Rig) -> list[tuple[str, str]]:
    return [(s["reason"], s["model"]) for s in rig.dispatcher.swaps]


# --- which model runs, and when a swap may start


async def test_realtime_traffic_holds_the_runtime_until_the_idle_window_passes(rig: Rig) -> None:
    rig.queue.heads = {OTHER: 10.0}
    rig.realtime_request()
    await rig.dispatcher.step()
    assert rig.runtime.asked == [] and rig.dispatcher.status().group is None
    reason = rig.dispatcher.waiting_reason(OTHER, rig.queue.heads)
    assert reason["code"] == "swap_window" and reason["seconds"] == 30.0
    rig.clock.advance(29.9)
    await rig.dispatcher.step()
    assert rig.runtime.asked == [], "swapped before SWAP_REALTIME_IDLE_SECONDS of quiet"
    assert rig.dispatcher.waiting_reason(OTHER, rig.queue.heads)["seconds"] == pytest.approx(0.1, abs=0.05)
    rig.clock.advance(0.6)  # idle long enough, and past the next swap check (every 0.5 s at most)
    await rig.dispatcher.step()
    assert rig.runtime.asked == [OTHER]
    assert rig.dispatcher.status().group == OTHER
    assert reasons(rig) == [("batch_group", OTHER)]


async def test_a_request_in_flight_counts_as_not_idle(rig: Rig) -> None:
    rig.queue.heads = {OTHER: 10.0}
    rig.activity.begin()  # never ends: a long stream
    rig.clock.advance(3600)
    await rig.dispatcher.step()
    assert rig.runtime.asked == []
    rig.activity.end()
    rig.clock.advance(31)
    await rig.dispatcher.step()
    assert rig.runtime.asked == [OTHER]


async def test_the_most_urgent_other_model_goes_first(rig: Rig) -> None:
    rig.queue.heads = {OTHER: 50.0, THIRD: 20.0}
    await rig.dispatcher.step()  # nobody has used realtime: no idle window to wait for
    assert rig.runtime.asked == [THIRD]


async def test_the_realtime_models_own_queue_goes_first_while_its_head_is_more_urgent(rig: Rig) -> None:
    rig.queue.heads = {REALTIME: 5.0, OTHER: 10.0}
    await rig.dispatcher.step()
    assert rig.runtime.asked == [] and rig.dispatcher.status().group is None
    assert rig.queue.claims == [(REALTIME, 4)]  # two slots plus two claimed ahead
    assert rig.dispatcher.waiting_reason(OTHER, {REALTIME: 5.0, OTHER: 10.0})["code"] == "realtime_queue_first"
    rig.queue.heads = {REALTIME: 15.0, OTHER: 10.0}
    rig.clock.advance(1)  # past the next swap check
    await rig.dispatcher.step()
    assert rig.runtime.asked == [OTHER]


# --- residency


async def test_a_group_ends_when_its_queue_is_empty_and_realtime_comes_back(rig: Rig) -> None:
    rig.queue.heads = {OTHER: 10.0}
    await rig.dispatcher.step()
    assert rig.dispatcher.status().group == OTHER
    await rig.dispatcher.step()  # the group claims: nothing left
    assert rig.queue.claims[-1] == (OTHER, 4)
    assert rig.runtime.asked == [OTHER, REALTIME]
    assert rig.dispatcher.status().group is None
    assert reasons(rig) == [("batch_group", OTHER), ("group_done", REALTIME)]


async def test_max_residency_hands_the_runtime_back(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    runner, url, seen = await _runtime_answering([200])
    try:
        rig = Rig(settings_for(tmp_path, batch_max_residency_seconds=100), session, base_url=url)
        rig.queue.heads = {OTHER: 10.0}
        rig.queue.jobs = {OTHER: [job(f"j{i}", OTHER) for i in range(10)]}
        await rig.dispatcher.step()
        assert rig.dispatcher.status().group == OTHER
        await rig.dispatcher.step()  # claims four (two slots, two ahead); they complete
        await rig.settle()
        assert len(seen) == 4
        rig.clock.advance(99)
        await rig.dispatcher.step()  # within residency: four more
        await rig.settle()
        assert rig.dispatcher.status().group == OTHER and len(seen) == 8
        rig.clock.advance(2)
        await rig.dispatcher.step()
    finally:
        await runner.cleanup()
    assert reasons(rig) == [("batch_group", OTHER), ("max_residency", REALTIME)]
    assert rig.dispatcher.status().group is None
    assert len(rig.queue.jobs[OTHER]) == 2, "the rest of the group waits for the next one"
    assert [event for _, event, _ in rig.queue.finished] == ["completed"] * 8


async def test_realtime_min_residency_after_a_swap_back(rig: Rig) -> None:
    rig.queue.heads = {OTHER: 10.0}
    await rig.dispatcher.step()
    await rig.dispatcher.step()  # group done: back to realtime at t0
    assert rig.runtime.asked == [OTHER, REALTIME]
    rig.clock.advance(1)
    rig.realtime_request()  # realtime users are around since it came back: the residency binds
    rig.clock.advance(31)  # idle long enough, but realtime came back only 32 s ago
    rig.queue.heads = {OTHER: 10.0}
    await rig.dispatcher.step()
    assert rig.runtime.asked == [OTHER, REALTIME]
    reason = rig.dispatcher.waiting_reason(OTHER, rig.queue.heads)
    assert reason["code"] == "realtime_min_residency" and reason["seconds"] == pytest.approx(88, abs=0.1)
    rig.clock.advance(88.5)
    await rig.dispatcher.step()
    assert rig.runtime.asked == [OTHER, REALTIME, OTHER]


async def test_realtime_wanted_mid_group_ends_it(rig: Rig) -> None:
    rig.queue.heads = {OTHER: 10.0}
    rig.queue.jobs = {OTHER: []}
    await rig.dispatcher.step()
    rig.activity.want_realtime()
    await rig.dispatcher.step()
    assert reasons(rig) == [("batch_group", OTHER), ("realtime_wanted", REALTIME)]
    assert not rig.activity.wanted.is_set()


# --- a model that cannot load


async def test_load_failures_fail_the_models_jobs_after_max_attempts(tmp_path: Path,
                                                                     session: aiohttp.ClientSession) -> None:
    rig = Rig(settings_for(tmp_path, batch_max_attempts=2), session)
    rig.runtime.cannot_load.add(OTHER)
    rig.queue.heads = {OTHER: 10.0}
    rig.queue.jobs = {OTHER: [job("j1", OTHER)]}
    await rig.dispatcher.step()
    assert reasons(rig) == [("batch_group", OTHER), ("load_failed", REALTIME)]
    assert rig.dispatcher.swaps[0]["error"] == f"cannot load {OTHER}"
    assert rig.queue.claims == [] and rig.dispatcher.status().group is None
    rig.clock.advance(1)
    await rig.dispatcher.step()
    # The second failure in a row: the queued jobs are claimed (until none is left) and failed.
    assert rig.queue.claims == [(OTHER, 100), (OTHER, 100)]
    assert [(job_id, event, fields["error_code"]) for job_id, event, fields in rig.queue.finished] == [
        ("j1", "failed", "model_load_failed")]


# --- jobs: retries with backoff, then give up


async def _runtime_answering(statuses: list[int]) -> tuple[web.AppRunner, str, list[int]]:
    seen: list[int] = []

    async def completions(request: web.Request) -> web.Response:
        status = statuses[min(len(seen), len(statuses) - 1)]
        seen.append(status)
        body = {"choices": [{"text": "ok"}], "usage": {"prompt_tokens": 1, "completion_tokens": 2}} \
            if status == 200 else {"error": {"message": f"status {status}"}}
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}", seen


@pytest.mark.parametrize(("statuses", "outcome"), [([503, 502, 200], "completed"), ([503], "failed"),
                                                   ([400], "failed")])
async def test_job_retries_transient_errors_and_gives_up_after_max_attempts(
        tmp_path: Path, session: aiohttp.ClientSession, statuses: list[int], outcome: str) -> None:
    runner, url, seen = await _runtime_answering(statuses)
    try:
        rig = Rig(settings_for(tmp_path), session, base_url=url)
        rig.queue.heads = {REALTIME: 1.0}
        rig.queue.jobs = {REALTIME: [job("j1", REALTIME)]}
        await rig.dispatcher.step()
        await rig.settle()
    finally:
        await runner.cleanup()
    [(job_id, event, fields)] = rig.queue.finished
    assert (job_id, event) == ("j1", outcome)
    retried = [(e, extra["reason"]) for _, e, extra in rig.queue.events if e == "retried"]
    if statuses == [400]:
        assert seen == [400] and retried == [] and fields["error_code"] == "runtime_4xx"
    elif outcome == "completed":
        assert seen == [503, 502, 200]
        assert retried == [("retried", "runtime_5xx"), ("retried", "runtime_5xx")]
    else:
        assert seen == [503, 503, 503], "BATCH_MAX_ATTEMPTS=3 requests, then it gives up"
        assert len(retried) == 2 and fields["error_code"] == "runtime_5xx"
        assert "max_attempts" in fields["flags"].split(",")
        assert fields["error"].startswith("Gave up after 3 attempts")
