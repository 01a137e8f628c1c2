"""RuntimeSupervisor: owns the runtime (container or process), its readiness and its restarts.

One reconcile loop compares the desired runtime (a model, or none) with the actual one. Public
methods only put messages in the inbox; the loop reacts to them by cancelling or starting one
*attempt* task at a time. An attempt stops whatever runs, starts the runtime through its backend,
polls readiness (health path, then /v1/models listing the model) while watching for an early exit,
marks it READY and then waits for the backend to report an unexpected exit (Docker event stream,
subprocess exit, or failing health probes). A crash or failed start writes a crash log with the
runtime's last output, marks the runtime FAILED and schedules the next attempt with exponential
backoff. The current state is published as an immutable RuntimeSnapshot that is read without
awaiting; every change also wakes `wait_changed()` callers.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import aiohttp
import orjson
import structlog

from gateway import metrics
from gateway.actors.base import STOP, Actor, Stop
from gateway.backends import RuntimeBackend, make_backend
from gateway.backends.base import ExitInfo
from gateway.flavours import flavour_for
from gateway.settings import Settings


class RuntimeState(StrEnum):
    """Lifecycle state of the runtime."""

    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    SWAPPING = "swapping"
    FAILED = "failed"
    SLEEPING = "sleeping"
    """vLLM sleep mode (batch swaps with RUNTIME_SLEEP_MODE): process kept, weights in host memory."""


@dataclass(frozen=True, slots=True)
class RuntimeSnapshot:
    """What other code may read about the runtime without awaiting anything."""

    state: RuntimeState
    model: str | None
    base_url: str | None
    since: float
    last_error: str | None = None
    restarts: int = 0
    ready_eta: float | None = None
    last_crash_log: str | None = None

    @property
    def ready(self) -> bool:
        """True when requests can be forwarded to `base_url`."""
        return self.state is RuntimeState.READY and self.base_url is not None

    def retry_after(self, now: float | None = None) -> int:
        """Whole seconds a client should wait before retrying (at least 1)."""
        now = time.time() if now is None else now
        if self.ready_eta is None:
            return 5
        return max(1, math.ceil(self.ready_eta - now))


@dataclass(frozen=True, slots=True)
class RuntimeEvent:
    """One entry of the supervisor's state history (what the dashboard's runtime page lists)."""

    at: float
    state: RuntimeState
    model: str | None
    error: str | None = None


class RuntimeUnavailable(Exception):
    """The runtime cannot serve the requested model now (failed, timed out, superseded, not swappable)."""

    def __init__(self, message: str, snapshot: RuntimeSnapshot | None = None) -> None:
        super().__init__(message)
        self.snapshot = snapshot


@dataclass(frozen=True, slots=True)
class _Want:
    """Desired model (None: no runtime)."""

    model: str | None
    applied: asyncio.Future[None] | None = None


@dataclass(frozen=True, slots=True)
class _Restart:
    applied: asyncio.Future[None]


@dataclass(frozen=True, slots=True)
class _SleepOp:
    """Put the runtime to sleep (`asleep` True) or wake it; `done` gets the snapshot after it."""

    asleep: bool
    timeout: float
    done: asyncio.Future[RuntimeSnapshot]


class _LookAgain:
    """Inbox message meaning "look again" (an attempt ended, or a timer passed)."""


_WAKE = _LookAgain()
_Message = _Want | _Restart | _SleepOp | _LookAgain


class RuntimeSupervisor(Actor[_Message]):
    """Keeps the GPU runtime serving the desired model; see the module docstring.

    `role` names what it supervises: "realtime" (the one that publishes llm_gateway_runtime_state), or
    "batch", the second runtime that serves a batch group while the realtime one sleeps (sleep mode).
    """

    name = "supervisor"
    backoff_initial = 1.0
    backoff_reset_after = 60.0
    """A crash after this many seconds of READY starts the backoff again from `backoff_initial`."""
    ready_poll_interval = 0.25
    probe_timeout = 2.0
    crash_log_lines = 200
    history_size = 200

    def __init__(self, settings: Settings, backend: RuntimeBackend | None = None, *,
                 role: str = "realtime", clock: Callable[[], float] = time.monotonic) -> None:
        self.role = role
        self.clock = clock
        """Monotonic seconds for the restart backoff (injectable: unit tests drive it by hand)."""
        if role != "realtime":
            self.name = f"{role}_runtime"
        super().__init__()
        self.settings = settings
        self.backend = backend if backend is not None else make_backend(settings)
        self.flavour = flavour_for(settings.runtime_type)
        self._snapshot = RuntimeSnapshot(RuntimeState.STOPPED, None, None, time.time())
        self._changed = asyncio.Event()
        self._desired: str | None = None
        self._op: asyncio.Task[None] | None = None
        self._op_target: str | None = None
        self._active = False  # the backend may have an instance that must be stopped first
        self._adopt_pending = True
        self._restart_requested = False
        self._restart_waiters: list[asyncio.Future[None]] = []
        self._start_requested = False
        self._retry_at: float | None = None  # monotonic time of the next attempt after a failure
        self._backoff = self.backoff_initial
        self._after_failure = False
        self._start_durations: dict[str, float] = {}
        self._last_start_duration: float | None = None
        self._session: aiohttp.ClientSession | None = None
        self._sleep_task: asyncio.Task[None] | None = None
        self._history: deque[RuntimeEvent] = deque(maxlen=self.history_size)
        self._history.append(RuntimeEvent(self._snapshot.since, RuntimeState.STOPPED, None))
        self._publish_state(RuntimeState.STOPPED)

    # --- reading state (never awaits)
    @property
    def snapshot(self) -> RuntimeSnapshot:
        """The runtime's current state; a plain attribute read."""
        return self._snapshot

    @property
    def history(self) -> list[RuntimeEvent]:
        """State changes, oldest first (bounded: the last `history_size`)."""
        return list(self._history)

    @property
    def desired_model(self) -> str | None:
        """The model the supervisor is working towards (None when the runtime is meant to be stopped)."""
        return self._desired

    # --- lifecycle
    async def start(self) -> None:
        """Start the loop and begin bringing up REALTIME_MODEL (adopting a matching leftover runtime);
        returns at once, without waiting for readiness."""
        if self.running:
            return
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        self._adopt_pending = True
        await super().start()
        self.tell(_Want(self.settings.realtime_model))

    async def on_stop(self) -> None:
        """Stop the runtime (container stopped and removed, process terminated) and release clients."""
        self._desired = None
        await self._cancel_op()
        if self._sleep_task is not None:
            self._sleep_task.cancel()
            with contextlib.suppress(BaseException):
                await self._sleep_task
            self._sleep_task = None
        if self._active or self._snapshot.state is not RuntimeState.STOPPED:
            try:
                await asyncio.wait_for(self.backend.stop(), self.settings.runtime_stop_timeout + 15)
            except Exception:
                self.log.exception("runtime_stop_failed")
            self._active = False
        self._set(state=RuntimeState.STOPPED, model=None, base_url=None, ready_eta=None)
        self._notify()  # ensure_model() waiters see that nothing is desired any more
        self._resolve_restart_waiters()
        await self.backend.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- commands
    def request_start(self) -> None:
        """Non-blocking: if the runtime is stopped, start the realtime model."""
        if self._desired is None and not self._start_requested and self.running:
            self._start_requested = True
            self.tell(_Want(self.settings.realtime_model))

    async def stop_runtime(self) -> None:
        """Stop the runtime but keep supervising (request_start() or ensure_model() bring it back)."""
        applied: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.tell(_Want(None, applied))
        await applied

    async def ensure_model(self, model: str, timeout: float | None = None) -> RuntimeSnapshot:
        """Make `model` the served model and wait until the runtime is READY with it.

        Concurrent callers for the same model share one swap. Raises RuntimeUnavailable when the
        attempt fails, when `timeout` passes, when another model is asked for meanwhile, or when the
        backend cannot switch models (external runtimes).
        """
        snap = self._snapshot
        if snap.ready and snap.model == model and self._desired == model:
            return snap
        if not self.backend.can_swap and model != self.settings.realtime_model:
            raise RuntimeUnavailable(f"the runtime at {self.settings.runtime_url} is external and serves "
                                     f"{self.settings.realtime_model}; it cannot be switched to {model}", snap)
        if not self.running:
            raise RuntimeUnavailable("the runtime supervisor is not running", snap)
        try:
            async with asyncio.timeout(timeout):
                applied: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self.tell(_Want(model, applied))
                await applied
                entry = self._snapshot

                def check(s: RuntimeSnapshot) -> bool:
                    if self._desired != model:
                        why = "the runtime was stopped" if self._desired is None else \
                            f"{self._desired} was asked for meanwhile"
                        raise RuntimeUnavailable(f"gave up waiting for {model}: {why}", s)
                    if s is not entry and s.state is RuntimeState.FAILED and s.model == model:
                        raise RuntimeUnavailable(f"the runtime failed to serve {model}: {s.last_error}", s)
                    return s.ready and s.model == model

                return await self._wait_for(check)
        except TimeoutError:
            snap = self._snapshot
            raise RuntimeUnavailable(f"{model} not ready after {timeout:g} s (runtime {snap.state.value}"
                                     f"{': ' + snap.last_error if snap.last_error else ''})", snap) from None

    async def wait_ready(self, timeout: float | None = None) -> RuntimeSnapshot:
        """Wait until the runtime is READY (with whatever model); RuntimeUnavailable on timeout."""
        try:
            async with asyncio.timeout(timeout):
                return await self._wait_for(lambda s: s.ready)
        except TimeoutError:
            snap = self._snapshot
            raise RuntimeUnavailable(f"runtime not ready after {timeout:g} s (state {snap.state.value})",
                                     snap) from None

    async def wait_changed(self, timeout: float | None = None,
                           since: RuntimeSnapshot | None = None) -> RuntimeSnapshot:
        """Wait until the snapshot changes (or `timeout` passes) and return the current snapshot.

        With `since`, return at once if the snapshot already differs from that one (no lost wake-ups).
        """
        changed = self._changed
        if since is not None and self._snapshot is not since:
            return self._snapshot
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout)
        return self._snapshot

    async def restart(self) -> None:
        """Restart the runtime with the current model; returns once the restart has begun."""
        applied: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.tell(_Restart(applied))
        await applied

    # --- sleep mode (added for the batch dispatcher's swaps; vLLM /sleep?level=1 and /wake_up)
    default_wake_seconds = 5.0
    """Retry-After basis while asleep, until a wake-up has been measured."""
    _last_wake_seconds: float | None = None

    async def sleep(self, timeout: float = 120.0) -> RuntimeSnapshot:
        """Put the READY runtime to sleep (weights to host memory, GPU memory released, process kept).

        Raises RuntimeUnavailable when the flavour has no sleep mode, the runtime is not READY, or the
        runtime refuses. The state becomes SLEEPING; realtime requests get 503 until `wake_up()`. The
        supervisor's own task makes the call: a caller that gives up waiting does not stop it halfway.
        """
        return await self._sleep_op(True, timeout)

    async def wake_up(self, timeout: float = 120.0) -> RuntimeSnapshot:
        """Wake a SLEEPING runtime (/wake_up) and mark it READY again; a no-op in any other state.

        Sleep and wake-up calls run one after the other in the order asked, so a wake-up asked while a
        sleep is still under way wakes the runtime once it is asleep.
        """
        return await self._sleep_op(False, timeout)

    async def _sleep_op(self, asleep: bool, timeout: float) -> RuntimeSnapshot:
        if not self.running:
            raise RuntimeUnavailable("the runtime supervisor is not running", self._snapshot)
        done: asyncio.Future[RuntimeSnapshot] = asyncio.get_running_loop().create_future()
        self.tell(_SleepOp(asleep, timeout, done))
        return await asyncio.shield(done)

    async def _run_sleep_op(self, op: _SleepOp, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            with contextlib.suppress(BaseException):
                await previous
        try:
            snap = await (self._fall_asleep(op.timeout) if op.asleep else self._wake_runtime(op.timeout))
        except BaseException as exc:
            if not op.done.done():
                op.done.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        if not op.done.done():
            op.done.set_result(snap)

    async def _fall_asleep(self, timeout: float) -> RuntimeSnapshot:
        snap = self._snapshot
        if not self.flavour.supports_sleep or self.flavour.sleep_path is None:
            raise RuntimeUnavailable(f"the {self.flavour.name} runtime has no sleep mode", snap)
        if not snap.ready or snap.base_url is None:
            raise RuntimeUnavailable(f"cannot put the runtime to sleep while it is {snap.state.value}", snap)
        await self._post_runtime(snap.base_url + self.flavour.sleep_path, timeout)
        current = self._snapshot
        if current.state is RuntimeState.READY and current.base_url == snap.base_url:
            wake = self._last_wake_seconds or self.default_wake_seconds
            self._set(state=RuntimeState.SLEEPING, ready_eta=time.time() + wake)
            self.log.info("runtime_sleeping", model=current.model)
        return self._snapshot

    async def _wake_runtime(self, timeout: float) -> RuntimeSnapshot:
        snap = self._snapshot
        if snap.state is not RuntimeState.SLEEPING or snap.base_url is None or self.flavour.wake_path is None:
            return snap
        started = time.monotonic()
        await self._post_runtime(snap.base_url + self.flavour.wake_path, timeout)
        current = self._snapshot
        if current.state is RuntimeState.SLEEPING and current.base_url == snap.base_url:
            self._last_wake_seconds = time.monotonic() - started
            self._set(state=RuntimeState.READY, ready_eta=None)
            self.log.info("runtime_awake", model=current.model, wake_seconds=round(self._last_wake_seconds, 3))
        return self._snapshot

    async def _post_runtime(self, url: str, timeout: float) -> None:
        session = self._session
        if session is None or session.closed:
            raise RuntimeUnavailable("the runtime supervisor is not running", self._snapshot)
        try:
            async with session.post(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                if resp.status != 200:
                    text = (await resp.text())[:300]
                    raise RuntimeUnavailable(f"POST {url} answered {resp.status}: {text}", self._snapshot)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RuntimeUnavailable(f"POST {url} failed: {exc or type(exc).__name__}", self._snapshot) from None

    # --- the loop
    async def run(self) -> None:
        """Apply messages and reconcile the actual runtime with the desired one."""
        structlog.contextvars.bind_contextvars(actor=self.name)
        while True:
            message = await self.receive(self._wake_in())
            if message is STOP:
                return
            if message is not None and not isinstance(message, Stop):
                self._apply(message)
            await self._reconcile()

    def _wake_in(self) -> float | None:
        if self._op is None and self._retry_at is not None and self._desired is not None:
            return max(0.0, self._retry_at - self.clock())
        return None

    def _apply(self, message: _Message) -> None:
        if isinstance(message, _Want):
            if message.model is not None:
                self._start_requested = False
            if message.model != self._desired:
                self.log.info("runtime_desired", model=message.model, previous=self._desired)
                self._desired = message.model
                self._backoff = self.backoff_initial
                self._retry_at = None
                self._after_failure = False
                self._notify()
            if message.applied is not None and not message.applied.done():
                message.applied.set_result(None)
        elif isinstance(message, _Restart):
            self._restart_requested = True
            self._restart_waiters.append(message.applied)
        elif isinstance(message, _SleepOp):
            # Beside the reconcile loop, one after another: each waits for the one asked before it.
            self._sleep_task = asyncio.create_task(self._run_sleep_op(message, self._sleep_task),
                                                   name=f"{self.name}:sleep" if message.asleep else f"{self.name}:wake")

    async def _reconcile(self) -> None:
        if self._op is not None and self._op.done():
            self._reap(self._op)
            self._op = None
        target = self._desired
        if self._op is not None:
            if self._op_target == target and not self._restart_requested:
                return
            await self._cancel_op()
        if target is None:
            self._restart_requested = False
            self._resolve_restart_waiters()
            if self._active or self._snapshot.state is not RuntimeState.STOPPED:
                self._set(state=RuntimeState.STOPPED, model=None, base_url=None, ready_eta=None)
                self._spawn(self._teardown(), None)
            return
        if self._restart_requested:
            self._restart_requested = False
            self._retry_at = None
        elif self._retry_at is not None:
            if self.clock() < self._retry_at:
                return
            self._retry_at = None
        if self._after_failure:
            self._after_failure = False
            metrics.RUNTIME_RESTARTS.inc()
            self._set(restarts=self._snapshot.restarts + 1)
        # The first state of the attempt is published here, synchronously, so that a caller of
        # restart() or ensure_model() never sees the previous READY once its request is applied.
        eta = time.time() + self._expected_start(target)
        if self._active and self._snapshot.model not in (None, target):
            metrics.RUNTIME_SWAPS.inc()
            self._set(state=RuntimeState.SWAPPING, model=target, base_url=None, ready_eta=eta)
        else:
            self._set(state=RuntimeState.STARTING, model=target, base_url=None, ready_eta=eta)
        self._spawn(self._attempt(target), target)
        self._resolve_restart_waiters()

    def _spawn(self, coro: Any, target: str | None) -> None:
        self._op = asyncio.create_task(coro, name=f"supervisor:{'attempt' if target else 'teardown'}")
        self._op_target = target

    def _reap(self, op: asyncio.Task[None]) -> None:
        if op.cancelled():
            return
        exc = op.exception()
        if exc is not None:
            # A bug, not a runtime failure: retry later rather than spin.
            self.log.error("runtime_attempt_crashed", exc_info=exc)
            self._retry_at = self.clock() + self._backoff
            self._backoff = min(self._backoff * 2, self.settings.runtime_restart_backoff_max)

    async def _cancel_op(self) -> None:
        op, self._op = self._op, None
        if op is None:
            return
        op.cancel()
        current = asyncio.current_task()
        try:
            await op
        except asyncio.CancelledError:
            # Only swallow the cancellation we caused, not one aimed at this task.
            if current is not None and current.cancelling():
                raise
        except Exception:
            self.log.exception("runtime_attempt_crashed")

    # --- attempts
    async def _teardown(self) -> None:
        try:
            await self.backend.stop()
            self._active = False
        finally:
            self._wake()

    async def _attempt(self, model: str) -> None:
        """Bring up `model`, then watch it until it exits unexpectedly (or the task is cancelled)."""
        try:
            if self._active:
                await self.backend.stop()
                self._active = False
                self._set(state=RuntimeState.STARTING, model=model, base_url=None,
                          ready_eta=time.time() + self._expected_start(model))
            started = time.monotonic()
            self._active = True
            adopted = False
            try:
                url: str | None = None
                if self._adopt_pending:
                    self._adopt_pending = False
                    url = await self.backend.adopt(model)
                    adopted = url is not None
                if url is None:
                    url = await self.backend.start(model)
            except Exception as exc:
                await self._fail(model, "start_failed", f"could not start the runtime for {model}: {exc}")
                return
            self._set(base_url=url)
            exit_task = asyncio.create_task(self.backend.wait_exit(), name="supervisor:monitor")
            try:
                error = await self._wait_ready(url, model, exit_task)
                if error is not None:
                    await self._fail(model, "start_failed", error)
                    return
                duration = time.monotonic() - started
                if not adopted:
                    self._start_durations[model] = self._last_start_duration = duration
                    metrics.RUNTIME_START_SECONDS.observe(duration)
                self._set(state=RuntimeState.READY, model=model, base_url=url, ready_eta=None)
                self.log.info("runtime_ready", model=model, base_url=url, adopted=adopted,
                              start_seconds=round(duration, 2))
                ready_at = self.clock()
                try:
                    info = await exit_task
                except Exception as exc:
                    info = ExitInfo("exit", None, f"lost track of the runtime: {exc}")
                if self.clock() - ready_at >= self.backoff_reset_after:
                    self._backoff = self.backoff_initial
                await self._fail(model, info.reason, f"the runtime serving {model} {info.describe()}")
            finally:
                if not exit_task.done():
                    exit_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await exit_task
        finally:
            self._wake()

    async def _wait_ready(self, url: str, model: str, exit_task: asyncio.Task[ExitInfo]) -> str | None:
        """None once the runtime serves `model`; else why it never will (exited, timed out)."""
        timeout = self.settings.runtime_start_timeout
        deadline = time.monotonic() + timeout
        while True:
            if exit_task.done():
                try:
                    info = exit_task.result()
                except Exception as exc:
                    return f"lost track of the runtime while starting {model}: {exc}"
                return f"the runtime {info.describe()} while starting {model}"
            if await self._serves(url, model):
                return None
            if time.monotonic() >= deadline:
                return f"the runtime did not serve {model} within {timeout:g} s (RUNTIME_START_TIMEOUT)"
            await asyncio.wait({exit_task}, timeout=self.ready_poll_interval)

    async def _serves(self, url: str, model: str) -> bool:
        """True when the health path answers 2xx and /v1/models lists `model` (as id or root)."""
        session = self._session
        if session is None or session.closed:
            session = self._session = aiohttp.ClientSession()
        timeout = aiohttp.ClientTimeout(total=self.probe_timeout)
        try:
            async with session.get(url + self.flavour.health_path, timeout=timeout) as resp:
                await resp.read()
                if not 200 <= resp.status < 300:
                    return False
            async with session.get(url + self.flavour.models_path, timeout=timeout) as resp:
                if resp.status != 200:
                    return False
                body = orjson.loads(await resp.read())
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
            return False
        entries = body.get("data") if isinstance(body, dict) else None
        return any(isinstance(e, dict) and model in (e.get("id"), e.get("root")) for e in entries or [])

    async def _fail(self, model: str, reason: str, detail: str) -> None:
        """Record a crash or failed start, clean up, and schedule the next attempt."""
        try:
            logs = await asyncio.wait_for(self.backend.logs(self.crash_log_lines), 15)
        except Exception as exc:
            logs = f"(runtime logs unavailable: {exc})"
        path = self._write_crash_log(model, reason, detail, logs)
        metrics.RUNTIME_CRASHES.labels(reason).inc()
        try:
            await self.backend.stop()
        except Exception:
            self.log.exception("runtime_cleanup_failed")
        self._active = False
        delay = self._backoff
        self._backoff = min(delay * 2, self.settings.runtime_restart_backoff_max)
        self._retry_at = self.clock() + delay
        self._after_failure = True
        self.log.error("runtime_failed", model=model, reason=reason, error=detail, crash_log=path,
                       retry_in=delay)
        self._set(state=RuntimeState.FAILED, model=model, base_url=None, last_error=detail,
                  last_crash_log=path or self._snapshot.last_crash_log, ready_eta=time.time() + delay)

    def _write_crash_log(self, model: str, reason: str, detail: str, logs: str) -> str | None:
        """Write `<failure_dir>/<UTC time>-<model>.log`; None (and an error log) when impossible."""
        directory = self.settings.failure_dir
        now = datetime.now(UTC)
        stamp = now.strftime("%Y%m%dT%H%M%SZ")
        safe_model = re.sub(r"[^A-Za-z0-9._-]+", "_", model.replace("/", "_"))
        text = (f"time: {now.isoformat()}\nmodel: {model}\nbackend: {self.backend.kind}\n"
                f"flavour: {self.flavour.name}\nreason: {reason}\nerror: {detail}\n"
                f"--- last {self.crash_log_lines} lines of runtime output ---\n{logs}\n")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for n in range(1, 1000):
                path = directory / (f"{stamp}-{safe_model}.log" if n == 1 else f"{stamp}-{safe_model}-{n}.log")
                try:
                    with path.open("x", encoding="utf-8") as handle:
                        handle.write(text)
                except FileExistsError:
                    continue
                return str(path)
        except OSError as exc:
            self.log.error("runtime_crash_log_unwritable", directory=str(directory), error=str(exc))
        return None

    # --- state publication
    def _expected_start(self, model: str) -> float:
        known = self._start_durations.get(model, self._last_start_duration)
        return known if known is not None else self.settings.runtime_expected_start_seconds

    def _set(self, **changes: Any) -> None:
        old = self._snapshot
        if "state" in changes and changes["state"] is not old.state:
            changes.setdefault("since", time.time())
        new = replace(old, **changes)
        if new == old:
            return
        self._snapshot = new
        if new.state is not old.state or new.model != old.model:
            self._history.append(RuntimeEvent(time.time(), new.state, new.model,
                                              new.last_error if new.state is RuntimeState.FAILED else None))
        if new.state is not old.state:
            self._publish_state(new.state)
            self.log.info("runtime_state", state=new.state.value, model=new.model)
        self._notify()

    def _publish_state(self, state: RuntimeState) -> None:
        # llm_gateway_runtime_state describes the realtime runtime; a batch runtime must not overwrite it.
        if self.role != "realtime":
            return
        for each in RuntimeState:
            metrics.RUNTIME_STATE.labels(each.value).set(1 if each is state else 0)

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _wake(self) -> None:
        if not self.stopping:
            self.inbox.put_nowait(_WAKE)

    def _resolve_restart_waiters(self) -> None:
        waiters, self._restart_waiters = self._restart_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _wait_for(self, predicate: Callable[[RuntimeSnapshot], bool]) -> RuntimeSnapshot:
        while True:
            changed = self._changed
            snap = self._snapshot
            if predicate(snap):
                return snap
            await changed.wait()
