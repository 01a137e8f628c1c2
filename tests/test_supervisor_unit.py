"""The RuntimeSupervisor's reconcile loop with a fake backend and a clock the test moves by hand: start,
crash then restart after an exponential backoff (reset after a long healthy run), failed starts, stop.

The fake backend "starts" a runtime by pointing the supervisor at a tiny in-process HTTP server that
answers the readiness probes, and "crashes" it when the test says so. No process, no container, and no
wait longer than a few loop turns: the backoff runs on the fake clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.actors.supervisor import RuntimeSnapshot, RuntimeState, RuntimeSupervisor
from gateway.backends.base import BackendError, ExitInfo, RuntimeBackend
from gateway.settings import Settings
from tests.polling import ManualClock, eventually

MODEL = "org/realtime"
BACKOFF = 0.02  # the first retry delay (seconds on the fake clock; the loop's real wait is as long)


class FakeBackend(RuntimeBackend):
    """A runtime that is an in-process HTTP server: starts at once, serves the probes, crashes on demand."""

    kind = "fake"

    def __init__(self, url: str) -> None:
        self.url = url
        self.calls: list[str] = []
        self.serving: str | None = None
        self.refuse_starts = 0
        self._exit: asyncio.Future[ExitInfo] | None = None

    async def adopt(self, model: str) -> str | None:
        self.calls.append("adopt")
        return None

    async def start(self, model: str) -> str:
        self.calls.append("start")
        if self.refuse_starts:
            self.refuse_starts -= 1
            raise BackendError("no GPU left")
        self.serving = model
        self._exit = asyncio.get_running_loop().create_future()
        return self.url

    async def stop(self) -> None:
        self.calls.append("stop")
        self.serving = None

    async def logs(self, tail: int = 200) -> str:
        return "fake runtime: last words"

    async def wait_exit(self) -> ExitInfo:
        assert self._exit is not None
        return await self._exit

    def crash(self, code: int = 137) -> None:
        """The instance exits on its own."""
        assert self._exit is not None and not self._exit.done()
        self.serving = None
        self._exit.set_result(ExitInfo("exit", code, ""))

    @property
    def starts(self) -> int:
        return self.calls.count("start")


@pytest.fixture
async def backend() -> AsyncIterator[FakeBackend]:
    fake: FakeBackend

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200 if fake.serving else 503)

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": fake.serving}] if fake.serving else []})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    fake = FakeBackend(f"http://{host}:{port}")
    yield fake
    await runner.cleanup()


@pytest.fixture
async def make(tmp_path: Path, backend: FakeBackend) -> AsyncIterator[Callable[..., RuntimeSupervisor]]:
    made: list[RuntimeSupervisor] = []

    def build(clock: ManualClock, **overrides: Any) -> RuntimeSupervisor:
        values: dict[str, Any] = {"realtime_model": MODEL, "runtime_backend": "process",
                                  "runtime_failure_dir": str(tmp_path / "crashes"), "runtime_start_timeout": 10,
                                  "runtime_stop_timeout": 1, "runtime_restart_backoff_max": 0.16}
        values.update(overrides)
        sup = RuntimeSupervisor(Settings(_env_file=None, **values), backend, clock=clock)  # type: ignore[call-arg]
        sup.backoff_initial = BACKOFF
        sup.ready_poll_interval = 0.005
        made.append(sup)
        return sup

    yield build
    for sup in made:
        await sup.stop()


async def state(sup: RuntimeSupervisor, wanted: RuntimeState, timeout: float = 5.0) -> RuntimeSnapshot:
    snap: RuntimeSnapshot = await eventually(lambda: sup.snapshot if sup.snapshot.state is wanted else None,
                                             timeout=timeout, interval=0.002)
    return snap


async def crash_and_check_backoff(sup: RuntimeSupervisor, backend: FakeBackend, clock: ManualClock,
                                  delay: float) -> RuntimeSnapshot:
    """Crash the runtime; it must stay down for exactly `delay` on the supervisor's clock, then come back."""
    starts = backend.starts
    backend.crash()
    failed = await state(sup, RuntimeState.FAILED)
    assert failed.ready_eta is not None and failed.ready_eta - failed.since == pytest.approx(delay, abs=0.01)
    # The clock stands still: however often the loop looks, the retry is not due.
    await asyncio.sleep(2 * BACKOFF + 0.02)
    assert sup.snapshot.state is RuntimeState.FAILED and backend.starts == starts
    clock.advance(delay - 0.001)
    await asyncio.sleep(delay + 0.02)
    assert sup.snapshot.state is RuntimeState.FAILED and backend.starts == starts, "retried before the backoff"
    clock.advance(0.002)
    ready = await state(sup, RuntimeState.READY)
    assert backend.starts == starts + 1
    return ready


async def test_start_adopts_nothing_then_starts_and_becomes_ready(make: Callable[..., RuntimeSupervisor],
                                                                  backend: FakeBackend) -> None:
    sup = make(ManualClock())
    await sup.start()
    ready = await state(sup, RuntimeState.READY)
    assert ready.model == MODEL and ready.base_url == backend.url and ready.restarts == 0
    assert backend.calls == ["adopt", "start"]
    assert [e.state for e in sup.history] == [RuntimeState.STOPPED, RuntimeState.STARTING, RuntimeState.READY]


async def test_crashes_restart_with_exponential_backoff_up_to_the_cap(make: Callable[..., RuntimeSupervisor],
                                                                      backend: FakeBackend) -> None:
    clock = ManualClock()
    sup = make(clock)
    await sup.start()
    await state(sup, RuntimeState.READY)
    for n, delay in enumerate((BACKOFF, 2 * BACKOFF, 4 * BACKOFF, 0.16, 0.16), start=1):
        ready = await crash_and_check_backoff(sup, backend, clock, delay)
        assert ready.restarts == n
    failed = [e for e in sup.history if e.state is RuntimeState.FAILED]
    assert len(failed) == 5 and all("exited with code 137" in (e.error or "") for e in failed)
    log = Path(sup.snapshot.last_crash_log or "")
    assert log.is_file() and "fake runtime: last words" in log.read_text()


async def test_a_long_healthy_run_resets_the_backoff(make: Callable[..., RuntimeSupervisor],
                                                     backend: FakeBackend) -> None:
    clock = ManualClock()
    sup = make(clock)
    await sup.start()
    await state(sup, RuntimeState.READY)
    await crash_and_check_backoff(sup, backend, clock, BACKOFF)
    await crash_and_check_backoff(sup, backend, clock, 2 * BACKOFF)
    clock.advance(sup.backoff_reset_after)  # READY for a minute on the supervisor's clock
    await crash_and_check_backoff(sup, backend, clock, BACKOFF)


async def test_a_failed_start_is_retried_after_the_backoff(make: Callable[..., RuntimeSupervisor],
                                                           backend: FakeBackend) -> None:
    clock = ManualClock()
    backend.refuse_starts = 2
    sup = make(clock)
    await sup.start()
    failed = await state(sup, RuntimeState.FAILED)
    assert "no GPU left" in (failed.last_error or "") and backend.starts == 1
    clock.advance(BACKOFF + 0.001)
    await eventually(lambda: backend.starts == 2 and sup.snapshot.state is RuntimeState.FAILED, interval=0.002)
    clock.advance(2 * BACKOFF - 0.01)  # the second delay is twice the first
    await asyncio.sleep(BACKOFF + 0.02)
    assert backend.starts == 2
    clock.advance(0.02)
    ready = await state(sup, RuntimeState.READY)
    assert ready.restarts == 2 and backend.starts == 3


async def test_stop_stops_the_runtime_and_a_crash_after_stop_is_not_restarted(
        make: Callable[..., RuntimeSupervisor], backend: FakeBackend) -> None:
    clock = ManualClock()
    sup = make(clock)
    await sup.start()
    await state(sup, RuntimeState.READY)
    await sup.stop_runtime()
    await state(sup, RuntimeState.STOPPED)
    await eventually(lambda: "stop" in backend.calls, interval=0.002)
    assert backend.serving is None and sup.desired_model is None
    clock.advance(3600)
    await asyncio.sleep(0.05)
    assert backend.starts == 1, "nothing is desired: no restart"
    sup.request_start()
    assert (await state(sup, RuntimeState.READY)).model == MODEL
    await sup.stop(timeout=2)
    assert sup.snapshot.state is RuntimeState.STOPPED and not sup.running
    assert backend.calls[-1] == "stop"
