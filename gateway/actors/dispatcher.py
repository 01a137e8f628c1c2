"""BatchDispatcher: feeds queued batch jobs to the runtime, keeps the slots full, and decides model swaps.

Rules (docs/batch.md): jobs for REALTIME_MODEL run beside realtime traffic; jobs for another model wait
until realtime has been idle for SWAP_REALTIME_IDLE_SECONDS (and the realtime model has been back for
REALTIME_MIN_RESIDENCY_SECONDS), then run as one group on that model until the group is empty,
BATCH_MAX_RESIDENCY_SECONDS pass, or a realtime request asks for its model back (grace period, then the
in-flight requests are cancelled and requeued without counting an attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Never

import orjson

from gateway import metrics, redis_client
from gateway.activity import RealtimeActivity
from gateway.actors.base import Actor
from gateway.actors.supervisor import RuntimeSnapshot, RuntimeState, RuntimeSupervisor
from gateway.actors.usage import UsageEvent
from gateway.backends import make_backend
from gateway.batch.coserve import (
    AdmissionController,
    ControllerConfig,
    Decision,
    RuntimeLoad,
    batch_priority,
    parse_runtime_load,
)
from gateway.batch.jobs import PRIORITY_MAX, JobStatus
from gateway.batch.queue import HeldJob, JobQueue, instance_id
from gateway.fleet.store import FleetStore
from gateway.redis_client import REDIS_ERRORS, REDIS_OR_OS_ERRORS
from gateway.redis_codec import text
from gateway.settings import RuntimeBackend, Settings
from gateway.tokens import usage_tokens
from gateway.upstream import UpstreamError, UpstreamPool

if TYPE_CHECKING:
    from gateway.actors.usage import UsageAccountant

_JSON = {"Content-Type": "application/json"}

# Runtime answers that are worth another attempt (the rest of 4xx fail at once).
_TRANSIENT_4XX = frozenset({408, 429})


@dataclass(frozen=True, slots=True)
class DispatcherStatus:
    """What the dispatcher is doing now, for the monitor, the CLI and tests."""

    held: frozenset[str]
    """Ids of the jobs this gateway holds: sending to the runtime, or claimed ahead of a free slot."""
    sending: int
    """How many of them hold a slot."""
    group: str | None
    """The other model a batch group is running on, or None while the realtime model serves."""
    slots: int
    limit: int
    """How many may send at once now: MAX_CONCURRENT_BATCH, or less while co-serving protects realtime."""
    limit_reason: str

    @property
    def in_flight(self) -> int:
        """Jobs held here."""
        return len(self.held)


@dataclass(slots=True)
class _Running:
    job: HeldJob
    task: asyncio.Task[None] | None = None
    cancel_reason: str | None = None
    started: float = field(default_factory=time.monotonic)
    sending: bool = False  # holds a slot (False: claimed ahead, waiting for one)


class BatchDispatcher(Actor[Never]):
    """Pulls jobs from the shared Redis queue and runs at most MAX_CONCURRENT_BATCH of them at a time."""

    name = "batch_dispatcher"

    def __init__(self, settings: Settings, queue: JobQueue, supervisor: RuntimeSupervisor,
                 activity: RealtimeActivity, accountant: UsageAccountant | None = None,
                 fleet: FleetStore | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.clock = clock
        """Monotonic seconds for scheduling decisions: idle windows, residency (injectable for unit tests)."""
        self.settings = settings
        self.fleet = fleet
        """The fleet's swap slots and node registry (None: decide alone, as a single node)."""
        self.swap_slot_model: str | None = None
        """The model this node holds a fleet swap slot for (taken before a swap, released on swap back)."""
        self._fleet_refusals: dict[str, tuple[float, dict[str, Any]]] = {}
        self.queue = queue
        self.supervisor = supervisor
        self.activity = activity
        # The batch path's own client: the lean one of the realtime path (gateway/upstream.py), one keep-alive
        # connection per slot kept between jobs, a couple more for the runtime's /metrics.
        self.upstream = UpstreamPool(limit=settings.max_concurrent_batch + 4,
                                     connect_timeout=settings.upstream_connect_timeout,
                                     read_timeout=settings.batch_request_timeout,
                                     max_idle=settings.max_concurrent_batch + 4)
        self.accountant = accountant
        self.owner = instance_id()
        self.slots = settings.max_concurrent_batch
        self.prefetch = self.slots
        """Jobs claimed ahead of a free slot, so a finished request is replaced without a Redis round trip."""
        self.inflight: dict[str, _Running] = {}
        """Jobs this gateway holds: sending to the runtime (`active` of them) or waiting for a slot."""
        self.active = 0
        self.limit = self.slots
        """Co-serving: how many batch requests may be at the runtime now (see gateway/batch/coserve.py)."""
        self.limit_reason = "start"
        self.controller = AdmissionController(ControllerConfig(
            max_limit=self.slots, ttft_slo=settings.realtime_ttft_slo_ms / 1000,
            itl_slo=settings.realtime_itl_slo_ms / 1000,
            interval=settings.coserve_interval_seconds)) if settings.coserve_adaptive else None
        self._cancel_seen: set[str] = set()  # cancel messages that may have beaten their job's task
        self._slot_free = asyncio.Event()
        self.group: str | None = None
        self.swaps: list[dict[str, Any]] = []
        self._group_started = 0.0
        self._grace_deadline: float | None = None
        self._draining_for: str | None = None
        self._realtime_since = float("-inf")
        self._next_swap_check = 0.0
        self._load_failures: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._busy_seconds = 0.0
        self._busy_mark = time.monotonic()
        self._batch_runtime: RuntimeSupervisor | None = None
        self.sleep_mode = (settings.runtime_sleep_mode and supervisor.flavour.supports_sleep
                           and settings.runtime_backend is not RuntimeBackend.EXTERNAL)
        """Swap by putting the realtime runtime to sleep and starting the batch model beside it."""
        metrics.BATCH_SLOTS.set(self.slots)
        metrics.COSERVE_LIMIT.set(self.limit)

    # --- public
    @property
    def slot_busy_seconds(self) -> float:
        """Integral of slots in use over time since start (benchmarks derive utilisation from it)."""
        self._account()
        return self._busy_seconds

    @property
    def batch_runtime(self) -> RuntimeSupervisor | None:
        """The runtime started for a batch group beside the sleeping realtime one (sleep mode), else None."""
        return self._batch_runtime

    def status(self) -> DispatcherStatus:
        """A snapshot of the jobs held here and the current group (never awaits)."""
        return DispatcherStatus(frozenset(self.inflight), self.active, self.group, self.slots, self.limit,
                                self.limit_reason)

    def coserve_history(self) -> list[Decision]:
        """The co-serving controller's recent decisions, oldest first (empty when it is off)."""
        return list(self.controller.history) if self.controller is not None else []

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop claiming, let in-flight jobs finish for part of `timeout`, requeue the rest."""
        self.stopping = True
        self._wake.set()
        await super().stop(timeout)

    async def on_stop(self) -> None:
        """Stop a batch runtime started beside a sleeping realtime one (sleep mode); free the swap slot and
        close the connections."""
        self.upstream.close()
        if self._batch_runtime is not None:
            runtime, self._batch_runtime = self._batch_runtime, None
            await runtime.stop(timeout=self.settings.runtime_stop_timeout + 15)
        await self._release_swap_slot()

    async def start(self) -> None:
        """Stop a batch runtime a killed gateway left behind (sleep mode), then start the loop."""
        if self.sleep_mode:
            backend = make_backend(self._batch_settings(self.settings.realtime_model))
            try:
                await backend.remove_leftover()
            except Exception as exc:  # the next swap's start removes it too; do not block start-up
                self.log.warning("batch_runtime_leftover_not_removed", error=str(exc))
            finally:
                await backend.close()
        await super().start()

    # --- run loop
    async def run(self) -> None:
        """Schedule until stopped; a listener and a lease keeper run beside the scheduler."""
        pubsub = await redis_client.pubsub(self.queue.redis)
        await pubsub.subscribe(self.queue.keys.batch_notify, self.queue.keys.batch_cancel)
        try:
            async with asyncio.TaskGroup() as tg:
                listener = tg.create_task(self._listen(pubsub), name="batch:listen")
                keeper = tg.create_task(self._keep_leases(), name="batch:leases")
                control = tg.create_task(self._control_loop(), name="batch:coserve")
                try:
                    await self._schedule_loop()
                    await self._cancel_all("shutdown", waiting_only=True)
                    await self._drain(self.settings.shutdown_timeout / 2)
                finally:
                    await self._cancel_all("shutdown")
                    listener.cancel()
                    keeper.cancel()
                    control.cancel()
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]

    async def _schedule_loop(self) -> None:
        while not self.stopping:
            self._wake.clear()
            try:
                timeout = await self._schedule()
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as exc:
                self.log.warning("batch_redis_error", error=str(exc))
                timeout = 1.0
            if self.stopping:  # set by stop() while _schedule() awaited
                return  # type: ignore[unreachable]
            if timeout > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)

    async def step(self) -> float:
        """One scheduling decision (what the loop does each time it wakes): claim, swap, or leave a group.

        Returns how long the loop waits for a wake-up before the next step. Unit tests drive it directly.
        """
        return await self._schedule()

    async def _schedule(self) -> float:
        """One scheduling step; returns how long to wait for a wake-up before the next one."""
        if self.group is not None:
            return await self._schedule_group(self.group)
        realtime = self.settings.realtime_model
        snap = self.supervisor.snapshot
        if snap.state is RuntimeState.SLEEPING:
            # Asleep without a group (e.g. this loop restarted mid-group): bring realtime back.
            await self._swap_to_realtime("realtime_wanted", None)
            return 0
        if snap.ready and snap.model and snap.model != realtime:
            # The runtime serves another model without a group (e.g. this loop restarted mid-group):
            # adopt it as a group so its jobs drain and the realtime model comes back.
            self._enter_group_state(snap.model)
            return 0
        if snap.ready and snap.model == realtime and self.activity.wanted.is_set():
            self.activity.wanted.clear()
        now = self.clock()
        if self._draining_for is None and now >= self._next_swap_check:
            self._next_swap_check = now + min(0.5, self.settings.batch_poll_interval)
            picked = None
            for candidate in await self._pick_groups():
                if await self._fleet_allows(candidate):
                    picked = candidate
                    break
            self._draining_for = picked
        if self._draining_for is not None:
            if (self.activity.idle_for() < self.settings.swap_realtime_idle_seconds
                    or self.activity.wanted.is_set()):
                self.log.info("batch_swap_abandoned", model=self._draining_for, reason="realtime_active")
                self._draining_for = None
                await self._release_swap_slot()
            elif self.inflight:
                await self._cancel_all("preempted", waiting_only=True)
                return 0.1  # let the realtime-model jobs finish before the runtime changes
            else:
                await self._enter_group(self._draining_for)
                return 0
        free = self._room()
        if not snap.ready or snap.model != realtime:
            return 0.25
        if free > 0:
            await self._claim(realtime, free)
        return min(0.5, self.settings.batch_poll_interval)

    async def _pick_groups(self) -> list[str]:
        """The other models with queued work, most urgent first, when a swap is allowed now (the fleet's
        swap slots then decide which one, if any, this node takes)."""
        if self.activity.wanted.is_set():
            return []
        if self.activity.idle_for() < self.settings.swap_realtime_idle_seconds:
            return []
        if self._residency_left() > 0:
            return []
        heads = await self.queue.ready_heads()
        realtime = self.settings.realtime_model
        others = sorted(((s, m) for m, s in heads.items() if m != realtime))
        # Aging decides between groups too: the realtime model's own queue goes first while its head
        # job is more urgent than the other models'.
        head = heads.get(realtime)
        return [m for s, m in others if head is None or s < head]

    def _residency_left(self) -> float:
        """Seconds the realtime model must still stay loaded before another swap (0: none).

        REALTIME_MIN_RESIDENCY_SECONDS counts from the moment the realtime model came back, and only binds
        when realtime traffic has arrived since: it stops swap thrash while realtime users are around, and
        must not hold batch work back on a gateway nobody is using (at start-up, say).
        """
        if self.activity.last_request_at <= self._realtime_since:
            return 0.0
        return max(0.0, self._realtime_since + self.settings.realtime_min_residency_seconds - self.clock())

    # --- why queued jobs wait (published to Redis for the job API, the dashboard and the CLI)
    def waiting_reason(self, model: str, heads: dict[str, float]) -> dict[str, Any]:
        """Why queued jobs for `model` are not running on this gateway now, with an estimate when one exists.

        `heads`: the queue's most urgent score per model (JobQueue.ready_heads). `until` is a Unix time.
        """
        settings = self.settings
        realtime = settings.realtime_model
        now, mono = time.time(), self.clock()

        def reason(code: str, message: str, in_seconds: float | None = None) -> dict[str, Any]:
            until = round(now + in_seconds, 3) if in_seconds is not None else None
            return {"code": code, "message": message, "until": until,
                    "seconds": round(in_seconds, 1) if in_seconds is not None else None}

        snap = self.supervisor.snapshot
        if self.group is not None:
            if model == self.group:
                return reason("batch_slots_busy", f"A batch group for {model} is running and all {self.limit} slots "
                              "are busy; the job runs when one frees.")
            left = self._group_started + settings.batch_max_residency_seconds - mono
            return reason("other_group_running", f"A batch group for {self.group} holds the runtime until its queue "
                          "is empty (at the latest after BATCH_MAX_RESIDENCY_SECONDS).", max(0.0, left))
        if model == realtime:
            if not snap.ready or snap.model != realtime:
                eta = snap.ready_eta - now if snap.ready_eta else None
                return reason("runtime_starting", f"The runtime is {snap.state.value}; co-served jobs start once it "
                              f"serves {realtime}.", max(0.0, eta) if eta is not None else None)
            if self.limit == 0:
                return reason("coserving_paused", "Realtime latency is at its SLO (REALTIME_TTFT_SLO_MS, "
                              f"REALTIME_ITL_SLO_MS; {self.limit_reason}): co-served batch is paused until it "
                              "recovers.")
            if self.active >= self.limit:
                return reason("coserving_limit", f"All {self.limit} co-serving slots are busy (limit {self.limit} "
                              f"of MAX_CONCURRENT_BATCH={self.slots}: {self.limit_reason}).")
            return reason("next", "The job is claimed at the dispatcher's next step (within a second).", 1.0)
        if not self.supervisor.backend.can_swap:
            return reason("runtime_cannot_swap", f"The runtime is external and serves only {realtime}; jobs for "
                          f"{model} wait for a gateway that can load it.")
        idle = self.activity.idle_for()
        if self.activity.wanted.is_set() or idle < settings.swap_realtime_idle_seconds:
            return reason("swap_window", f"Realtime traffic is active; a swap to {model} may start after "
                          f"{settings.swap_realtime_idle_seconds:g} s without realtime requests "
                          "(SWAP_REALTIME_IDLE_SECONDS).", settings.swap_realtime_idle_seconds - idle)
        residency = self._residency_left()
        if residency > 0:
            return reason("realtime_min_residency", "The realtime model came back recently and stays loaded "
                          "REALTIME_MIN_RESIDENCY_SECONDS before another swap.", residency)
        head, own = heads.get(realtime), heads.get(model)
        if head is not None and own is not None and head <= own:
            return reason("realtime_queue_first", "Jobs for the realtime model are ahead in the queue (priority "
                          "aging orders models too); this group starts when they are done.")
        refusal = self._fleet_refusals.get(model)
        if refusal is not None and mono - refusal[0] < 5.0:
            return {**refusal[1], "until": (round(now + refusal[1]["seconds"], 3)
                                            if refusal[1].get("seconds") is not None else None)}
        return reason("swap_pending", f"A swap to {model} starts at the dispatcher's next step.", 1.0)

    async def _publish_waiting_reasons(self) -> None:
        heads = await self.queue.ready_heads()
        if heads:
            await self.queue.set_waiting_reasons(self.owner, {m: self.waiting_reason(m, heads) for m in heads})

    async def _schedule_group(self, model: str) -> float:
        now = self.clock()
        if self.activity.wanted.is_set() or self.stopping:
            if self._grace_deadline is None:
                self._grace_deadline = now + self.settings.swap_grace_seconds
                self.log.info("batch_group_preempted", model=model, in_flight=self.active,
                              grace=self.settings.swap_grace_seconds)
                # Jobs claimed ahead have not started: back to the queue now, the grace is for the others.
                await self._cancel_all("preempted", waiting_only=True)
            if self.inflight and now < self._grace_deadline:
                return min(0.1, self._grace_deadline - now)
            await self._cancel_all("preempted")
            await self._leave_group("realtime_wanted")
            return 0
        if now - self._group_started >= self.settings.batch_max_residency_seconds:
            if self.inflight:
                return 0.1
            await self._leave_group("max_residency")
            return 0
        snap = self._supervisor_for(model).snapshot
        if snap.ready and snap.model != model:
            self.log.warning("batch_group_model_changed", model=model, serving=snap.model)
            await self._cancel_all("preempted")
            await self._leave_group("model_changed")
            return 0
        if not snap.ready:
            return 0.1
        free = self._room()
        if free > 0:
            claimed = await self._claim(model, free)
            if claimed == 0 and not self.inflight:
                await self._leave_group("group_done")
                return 0
        return 0.1  # short: a realtime request must end the group promptly

    def _room(self) -> int:
        """How many more jobs to claim: slots plus pull-ahead, not counting jobs writing their outcome."""
        held = sum(1 for r in self.inflight.values() if not r.job.settled)
        return self.limit + min(self.prefetch, self.limit) - held

    # --- swaps
    def _enter_group_state(self, model: str) -> None:
        self.group = model
        self._group_started = self.clock()
        self._grace_deadline = None
        self._draining_for = None

    async def _enter_group(self, model: str) -> None:
        """Swap the runtime to `model` for a batch group (abandoned if realtime asks first)."""
        self._draining_for = None
        started = time.monotonic()
        self.log.info("batch_swap_start", to_model=model, reason="batch_group")
        swap = asyncio.create_task(self._bring_up(model), name="batch:swap")
        wanted = asyncio.create_task(self.activity.wanted.wait(), name="batch:wanted")
        try:
            await asyncio.wait({swap, wanted}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            wanted.cancel()
            if not swap.done():
                swap.cancel()
            for task in (wanted, swap):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        error: str | None = None
        if swap.cancelled():
            error = "realtime traffic arrived while the batch model was loading"
        elif swap.exception() is not None:
            error = str(swap.exception())
        self._record_swap("batch_group", model, started, error)
        if error is not None:
            self.log.warning("batch_swap_failed", to_model=model, error=error)
            if not swap.cancelled():
                await self._model_load_failed(model, error)
            await self._swap_to_realtime("load_failed" if not swap.cancelled() else "realtime_wanted", model)
            return
        self._load_failures.pop(model, None)
        self._enter_group_state(model)

    async def _bring_up(self, model: str) -> None:
        """Make `model` servable: swap the runtime, or (sleep mode) sleep realtime and start a second one."""
        if not self.sleep_mode:
            await self.supervisor.ensure_model(model, self.settings.runtime_start_timeout)
            return
        # A realtime request may abandon this swap at any point; the supervisor finishes a /sleep it has
        # begun, and the swap back's wake-up runs after it.
        await self.supervisor.sleep()
        runtime = RuntimeSupervisor(self._batch_settings(model), role="batch")
        self._batch_runtime = runtime
        await runtime.start()
        await runtime.ensure_model(model, self.settings.runtime_start_timeout)

    def _batch_settings(self, model: str) -> Settings:
        """Settings of the second runtime that serves a batch group while realtime sleeps."""
        s = self.settings
        return s.model_copy(update={"realtime_model": model,
                                    "runtime_container_name": f"{s.runtime_container_name}_batch",
                                    "runtime_pid_file": f"{s.runtime_pid_path}.batch", "runtime_port": 0})

    def _supervisor_for(self, model: str) -> RuntimeSupervisor:
        runtime = self._batch_runtime
        if runtime is not None and runtime.settings.realtime_model == model:
            return runtime
        return self.supervisor

    async def _leave_group(self, reason: str) -> None:
        model = self.group
        self.group = None
        self._grace_deadline = None
        await self._swap_to_realtime(reason, model)

    async def _swap_to_realtime(self, reason: str, from_model: str | None) -> None:
        started = time.monotonic()
        realtime = self.settings.realtime_model
        self.log.info("batch_swap_start", to_model=realtime, from_model=from_model, reason=reason)
        error: str | None = None
        try:
            if self._batch_runtime is not None:
                runtime, self._batch_runtime = self._batch_runtime, None
                await runtime.stop(timeout=self.settings.runtime_stop_timeout + 15)
            # Always asked, in any mode: a no-op unless the runtime is asleep, and it runs after a /sleep
            # still under way (sleep mode's swap, or a runtime put to sleep by hand).
            try:
                await self.supervisor.wake_up()
            except Exception as exc:
                self.log.error("batch_wake_failed", error=str(exc))
                await self.supervisor.restart()
            await self.supervisor.ensure_model(realtime, self.settings.runtime_start_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the supervisor keeps trying on its own; realtime waits on it
            error = str(exc)
            self.log.error("batch_swap_back_failed", error=error)
        self._record_swap(reason, realtime, started, error)
        if self.activity.wanted.is_set():
            # Clients turned away during the swap are about to retry: count the swap back as realtime
            # activity so the idle clock does not send the runtime straight back to the batch model.
            self.activity.want_realtime()
        self.activity.wanted.clear()
        self._realtime_since = self.clock()
        await self._release_swap_slot()

    def _record_swap(self, reason: str, model: str, started: float, error: str | None) -> None:
        seconds = time.monotonic() - started
        metrics.BATCH_SWAPS.labels(reason).inc()
        metrics.BATCH_SWAP_SECONDS.labels(reason).observe(seconds)
        self.swaps.append({"reason": reason, "model": model, "seconds": seconds, "error": error,
                           "at": time.time(), "mode": "sleep" if self.sleep_mode else "restart"})
        del self.swaps[:-100]
        self.log.info("batch_swap_done", to_model=model, reason=reason, seconds=round(seconds, 3), error=error)

    async def _model_load_failed(self, model: str, error: str) -> None:
        """After BATCH_MAX_ATTEMPTS failed loads in a row, fail the model's queued jobs with the reason."""
        count = self._load_failures.get(model, 0) + 1
        self._load_failures[model] = count
        if count < self.settings.batch_max_attempts:
            return
        self._load_failures.pop(model, None)
        while True:
            jobs = await self.queue.claim(model, 100, self.owner)
            if not jobs:
                return
            for job in jobs:
                await self._finish_failed(job, f"The runtime could not load model '{model}': {error}",
                                          "model_load_failed", {"model_load_failed"})

    # --- fleet: swap slots (gateway/fleet/store.py, docs/fleet.md)
    async def _fleet_allows(self, model: str) -> bool:
        """Take a fleet swap slot for `model`, or say why not (kept for waiting_reason).

        Alone in the registry a node swaps as a single gateway does (it still takes a slot, so nodes that
        join meanwhile see it). With others: at most FLEET_MAX_SWAPPED_NODES (0: all but one) are off the
        realtime model; a model no node serves needs FLEET_SWAP_MIN_JOBS queued jobs or a job waiting
        FLEET_SWAP_MAX_WAIT_SECONDS; a model other nodes serve needs FLEET_SWAP_MIN_JOBS per node.
        """
        if self.fleet is None:
            return True
        settings = self.settings
        node_id = settings.node_id
        try:
            nodes = await self.fleet.nodes()
            queued, head = await self.queue.model_backlog(model)
            others = [n for n in nodes if n.get("node_id") != node_id and (n.get("batch") or {}).get("enabled")]
            others_loaded = sum(1 for n in others
                                if (n.get("batch") or {}).get("swap_slot") != model
                                and model in (*(n.get("models") or {}).get("loaded", ()),
                                              *(n.get("models") or {}).get("sleeping", ())))
            waited = time.time() - head if head is not None else 0.0
            alone = not others
            max_slots = 1 if alone else (settings.fleet_max_swapped_nodes or len(others))
            worth = alone or queued >= settings.fleet_swap_min_jobs or waited >= settings.fleet_swap_max_wait_seconds
            answer = await self.fleet.take_swap_slot(
                node_id, model, max_slots=max_slots, lease_seconds=settings.fleet_lease_seconds, queued=queued,
                min_jobs=settings.fleet_swap_min_jobs, others_loaded=0 if alone else others_loaded,
                worth_alone=worth)
        except REDIS_OR_OS_ERRORS as exc:
            self.log.warning("fleet_swap_slot_error", model=model, error=str(exc))
            return False
        metrics.FLEET_NODES.set(len(nodes))
        metrics.FLEET_SWAP_SLOT.labels(answer.reason).inc()
        if answer.granted:
            self.swap_slot_model = model
            self._fleet_refusals.pop(model, None)
            self.log.info("fleet_swap_slot_taken", model=model, holders=answer.holders, queued=queued)
            return True
        if alone:
            return False  # a dead node's slot has not run out yet: at most FLEET_LEASE_SECONDS
        self._fleet_refusals[model] = (self.clock(), self._refusal_reason(
            answer.reason, model, queued=queued, waited=waited, max_slots=max_slots, holders=answer.holders))
        return False

    def _refusal_reason(self, code: str, model: str, *, queued: int, waited: float, max_slots: int,
                        holders: int) -> dict[str, Any]:
        s = self.settings
        if code == "swap_slot_busy":
            message = (f"{holders} of the fleet's nodes are off the realtime model already, the most allowed at "
                       f"once (FLEET_MAX_SWAPPED_NODES={s.fleet_max_swapped_nodes or 'all but one'}: {max_slots}); "
                       f"a node swaps to {model} when one of them swaps back.")
            return {"code": "swap_slot_busy", "message": message, "seconds": None}
        if code == "other_node_has_model":
            message = (f"Another node already serves {model}: its {queued} queued jobs go there first. One more "
                       f"node swaps to it only when at least FLEET_SWAP_MIN_JOBS={s.fleet_swap_min_jobs} jobs "
                       "per node serving it are queued.")
            return {"code": "other_node_has_model", "message": message, "seconds": None}
        left = max(0.0, s.fleet_swap_max_wait_seconds - waited)
        message = (f"Only {queued} jobs for {model} are queued: a node swaps for them once "
                   f"FLEET_SWAP_MIN_JOBS={s.fleet_swap_min_jobs} are queued, or once the oldest has waited "
                   f"FLEET_SWAP_MAX_WAIT_SECONDS={s.fleet_swap_max_wait_seconds:g} s.")
        return {"code": "swap_not_worth", "message": message, "seconds": round(left, 1)}

    async def _renew_swap_slot(self) -> None:
        if self.fleet is None or self.swap_slot_model is None:
            return
        if not await self.fleet.renew_swap_slot(self.settings.node_id, self.settings.fleet_lease_seconds):
            # Renewals stopped for longer than the lease (Redis away, a long pause): another node may
            # hold the slot now. The group still ends within BATCH_MAX_RESIDENCY_SECONDS.
            self.log.warning("fleet_swap_slot_lost", model=self.swap_slot_model)

    async def _release_swap_slot(self) -> None:
        if self.fleet is None or self.swap_slot_model is None:
            return
        model, self.swap_slot_model = self.swap_slot_model, None
        try:
            await self.fleet.release_swap_slot(self.settings.node_id)
        except REDIS_OR_OS_ERRORS as exc:  # it runs out after FLEET_LEASE_SECONDS
            self.log.warning("fleet_swap_slot_release_failed", model=model, error=str(exc))
        else:
            self.log.info("fleet_swap_slot_released", model=model)

    # --- claiming and running
    async def _claim(self, model: str, n: int) -> int:
        jobs = await self.queue.claim(model, n, self.owner)
        for job in jobs:
            running = _Running(job)
            self.inflight[job.id] = running
            running.task = asyncio.create_task(self._run_job(running), name=f"batch:{job.id}")
            running.task.add_done_callback(partial(self._job_done, job.id))
            metrics.BATCH_JOBS.labels("started").inc()
            if job.id in self._cancel_seen:
                self._cancel_seen.discard(job.id)
                running.cancel_reason = "cancelled"
                running.task.cancel()
        return len(jobs)

    def _job_done(self, job_id: str, task: asyncio.Task[None]) -> None:
        self.inflight.pop(job_id, None)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("batch_job_task_crashed", job_id=job_id, error=repr(task.exception()))
        self._wake.set()

    def _account(self) -> None:
        now = time.monotonic()
        delta = self.active * (now - self._busy_mark)
        self._busy_seconds += delta
        metrics.BATCH_SLOT_BUSY_SECONDS.inc(delta)
        self._busy_mark = now

    async def _run_job(self, running: _Running) -> None:
        job = running.job
        try:
            async with self._slot(running) as free_slot:
                await self._attempts(job, free_slot)
        except asyncio.CancelledError:
            reason = running.cancel_reason or "shutdown"
            try:
                if reason in ("preempted", "shutdown", "coserve"):
                    await self.queue.requeue(job, reason, count_attempt=False)
                elif reason == "cancelled":
                    await self.queue.release(job)
                    metrics.BATCH_ATTEMPT_SECONDS.labels("cancelled").observe(time.monotonic() - running.started)
            except Exception as exc:  # the lease runs out and the reaper repairs it
                self.log.warning("batch_requeue_failed", job_id=job.id, error=str(exc))
            raise
        except Exception as exc:
            self.log.exception("batch_job_error", job_id=job.id)
            try:
                await self.queue.requeue(job, f"internal_error: {exc}", count_attempt=True)
            except Exception as requeue_exc:  # the lease runs out and the reaper repairs it
                self.log.warning("batch_requeue_failed", job_id=job.id, error=str(requeue_exc))

    @contextlib.asynccontextmanager
    async def _slot(self, running: _Running) -> AsyncIterator[Callable[[], None]]:
        """One of the MAX_CONCURRENT_BATCH slots while a job talks to the runtime; yields `free()`,
        which gives the slot back early (the outcome is written to Redis outside the slot)."""
        while self.active >= self.limit:
            self._slot_free.clear()
            await self._slot_free.wait()
        held = True
        running.sending = True
        self._account()
        self.active += 1
        metrics.BATCH_IN_FLIGHT.set(self.active)

        def free() -> None:
            nonlocal held
            if held:
                held = False
                self._account()
                self.active -= 1
                metrics.BATCH_IN_FLIGHT.set(self.active)
                self._slot_free.set()
                self._wake.set()  # top up the pulled-ahead jobs now, not when the outcome is written

        try:
            yield free
        finally:
            free()

    async def _cancel_all(self, reason: str, *, waiting_only: bool = False) -> None:
        """Cancel every held job (or only those still waiting for a slot) with `reason`; wait for clean-up."""
        tasks = []
        for running in list(self.inflight.values()):
            if waiting_only and running.sending:
                continue
            if running.task is not None and not running.task.done():
                if not running.job.settled:  # an outcome being written is let through, not cut off
                    running.cancel_reason = running.cancel_reason or reason
                    running.task.cancel()
                tasks.append(running.task)
        if tasks:
            self.log.info("batch_jobs_cancelled", count=len(tasks), reason=reason)
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.inflight and time.monotonic() < deadline:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.01, deadline - time.monotonic()))

    async def _runtime_for(self, model: str) -> RuntimeSnapshot:
        """Wait until the runtime is ready with `model`."""
        while True:
            supervisor = self._supervisor_for(model)
            snap = supervisor.snapshot
            if snap.ready and snap.model == model:
                return snap
            await supervisor.wait_changed(1.0, since=snap)

    async def _attempts(self, job: HeldJob, free_slot: Callable[[], None]) -> None:
        """Send the job to the runtime until it completes, fails for good or runs out of attempts."""
        settings = self.settings
        fields = job.fields
        body = fields["request"].encode()
        if self.settings.priority_scheduling:
            # The stored body never has a 'priority' (parse_submission takes the job's own out).
            runtime_priority = batch_priority(int(fields.get("priority") or 0), job_priority_max=PRIORITY_MAX,
                                              is_eval='"eval_run"' in fields.get("metadata", ""))
            body = b'{"priority":%d,' % runtime_priority + body[body.index(b"{") + 1:]
        endpoint = fields["endpoint"]
        backoff = settings.batch_retry_backoff_seconds
        flags = {f for f in fields.get("flags", "").split(",") if f}
        snap = await self._runtime_for(job.model)
        # The attempt counts from here: a job claimed ahead and given back before this cost none.
        if await self.queue.mark_sent(job) is None:
            self.log.info("batch_job_lost", job_id=job.id, reason="cancelled or taken back")
            await self.queue.release(job)
            return
        if job.attempt == 1:
            metrics.BATCH_QUEUE_WAIT.observe(max(0.0, time.time() - float(fields.get("created_at") or time.time())))
        while True:
            before = snap
            started = time.monotonic()
            status: int | None = None
            payload = b""
            failure = ""
            try:
                # Cancelling this task (a cancel, a swap, co-serving) closes the connection, which makes the
                # runtime abort the request.
                exchange = await self.upstream.request(snap.base_url or "", endpoint, body, _JSON, until="body")
                status = exchange.status
                payload = await exchange.read()
            except UpstreamError as exc:
                if exc.kind == "timeout":
                    failure = f"the runtime did not answer within {settings.batch_request_timeout:g} s"
                    kind = "timeout"
                else:
                    failure = f"connection to the runtime failed: {exc}"
                    kind = "connection_error"
            elapsed = time.monotonic() - started
            if status == 200:
                metrics.BATCH_ATTEMPT_SECONDS.labels("ok").observe(elapsed)
                free_slot()
                await self._finish_completed(job, payload)
                return
            if status is not None and 400 <= status < 500 and status not in _TRANSIENT_4XX:
                metrics.BATCH_ATTEMPT_SECONDS.labels("permanent").observe(elapsed)
                self._usage(job, ok=False)
                message = _runtime_message(payload) or f"the runtime answered {status}"
                free_slot()
                await self._finish_failed(job, f"The runtime rejected the request ({status}): {message}",
                                          "runtime_4xx", flags | {"runtime_4xx"}, runtime_status=status,
                                          error_type="invalid_request_error")
                return
            if status is not None:
                kind = "runtime_5xx" if status >= 500 else f"runtime_{status}"
                failure = f"the runtime answered {status}: {_runtime_message(payload) or 'no message'}"
            metrics.BATCH_ATTEMPT_SECONDS.labels("transient").observe(elapsed)
            self._usage(job, ok=False)
            flags.add(kind)
            attempt = job.attempt
            if attempt >= settings.batch_max_attempts:
                free_slot()
                crash_log = await self._crash_after(job.model, before, wait=2.0)
                if crash_log is not None:
                    flags.add("runtime_crash")
                await self._finish_failed(
                    job, f"Gave up after {attempt} attempts; last: {failure}"
                    + (f" (runtime crashed; crash log: {crash_log})" if crash_log else ""),
                    kind, flags | {"max_attempts"}, runtime_status=status, crash_log=crash_log)
                return
            await asyncio.sleep(min(backoff, settings.batch_retry_backoff_max))
            backoff = max(backoff * 2, 0.05)
            if kind == "connection_error":
                # A broken connection usually means the runtime died: give the supervisor a moment to see
                # it, so the retry goes to the restarted runtime instead of spending an attempt on a dead port.
                await self._crash_after(job.model, before, wait=2.0)
            snap = await self._runtime_for(job.model)
            crash_log = _crash_between(before, snap)
            update: dict[str, str] = {"error": f"attempt {attempt}: {failure}", "error_code": kind}
            if crash_log is not None:
                flags.add("runtime_crash")
                update["crash_log"] = crash_log
                update["error"] += f" (runtime crashed; crash log: {crash_log})"
            update["flags"] = ",".join(sorted(flags))
            if status is not None:
                update["runtime_status"] = str(status)
            new_attempt = await self.queue.update(job, update, attempt_delta=1, event="retried", reason=kind)
            if new_attempt is None:
                self.log.info("batch_job_lost", job_id=job.id, reason="cancelled or taken back")
                await self.queue.release(job)
                return
            metrics.BATCH_JOBS.labels("retried").inc()
            self.log.info("batch_job_retry", job_id=job.id, attempt=new_attempt, reason=kind,
                          crash_log=crash_log)

    async def _crash_after(self, model: str, before: RuntimeSnapshot, wait: float) -> str | None:
        """The crash log if the runtime crashed since `before` (waits briefly for the supervisor to see it)."""
        deadline = self.clock() + wait
        supervisor = self._supervisor_for(model)
        while True:
            snap = supervisor.snapshot
            crash_log = _crash_between(before, snap)
            if crash_log is not None or self.clock() >= deadline:
                return crash_log
            await supervisor.wait_changed(max(0.01, deadline - self.clock()), since=snap)

    def _usage(self, job: HeldJob, ok: bool, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        if self.accountant is not None:
            self.accountant.record(UsageEvent(job.fields.get("key_id", ""), ok, prompt_tokens, completion_tokens,
                                              kind="batch"))

    async def _finish_completed(self, job: HeldJob, payload: bytes) -> None:
        usage: dict[str, Any] | None = None
        try:
            parsed = orjson.loads(payload)
            if isinstance(parsed, dict) and isinstance(parsed.get("usage"), dict):
                usage = parsed["usage"]
        except orjson.JSONDecodeError:
            pass
        prompt, completion = usage_tokens(usage)
        self._usage(job, True, prompt, completion)
        fields: dict[str, str | bytes] = {
            "status": JobStatus.COMPLETED.value, "claim": "", "finished_at": repr(time.time()),
            "response": payload, "usage": orjson.dumps(usage).decode() if usage else "", "runtime_status": "200",
            "error": "", "error_code": "", "error_type": "",
        }
        await self._finish(job, fields, "completed")

    async def _finish_failed(self, job: HeldJob, message: str, code: str, flags: set[str], *,
                             runtime_status: int | None = None, crash_log: str | None = None,
                             error_type: str = "batch_job_failed") -> None:
        fields: dict[str, str | bytes] = {
            "status": JobStatus.FAILED.value, "claim": "", "finished_at": repr(time.time()), "error": message,
            "error_type": error_type, "error_code": code, "flags": ",".join(sorted(flags)),
        }
        if runtime_status is not None:
            fields["runtime_status"] = str(runtime_status)
        if crash_log:
            fields["crash_log"] = crash_log
        await self._finish(job, fields, "failed")

    async def _finish(self, job: HeldJob, fields: dict[str, str | bytes], event: str) -> None:
        if await self.queue.finish(job, fields, event):
            metrics.BATCH_JOBS.labels(event).inc()
        else:
            self.log.info("batch_result_discarded", job_id=job.id, reason="cancelled or taken back")

    # --- background loops beside the scheduler
    async def _listen(self, pubsub: Any) -> None:
        """Wake the scheduler on new work; stop the request of a job cancelled through the API."""
        cancel_channel = self.queue.keys.batch_cancel.encode()
        while True:
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except asyncio.CancelledError:
                raise
            except REDIS_OR_OS_ERRORS as exc:
                self.log.warning("batch_listen_error", error=str(exc))
                await asyncio.sleep(1.0)
                with contextlib.suppress(*REDIS_OR_OS_ERRORS):
                    await pubsub.subscribe(self.queue.keys.batch_notify, self.queue.keys.batch_cancel)
                continue
            if message is None:
                continue
            if message.get("channel") == cancel_channel:
                job_id = text(message["data"])
                running = self.inflight.get(job_id)
                if running is None:
                    # The job may be between its claim and its task here; a few ids are kept for that.
                    if len(self._cancel_seen) > 10_000:
                        self._cancel_seen.clear()
                    self._cancel_seen.add(job_id)
                elif running.task is not None and not running.task.done() and not running.job.settled:
                    running.cancel_reason = "cancelled"
                    running.task.cancel()
            else:
                self._wake.set()

    async def _keep_leases(self) -> None:
        """Renew our leases, take back expired ones (any holder's), refresh the queue gauge."""
        interval = max(0.1, min(self.settings.batch_lease_seconds / 3, 2.0))
        next_stats = next_reasons = 0.0
        while True:
            await asyncio.sleep(interval)
            try:
                held = [r.job for r in self.inflight.values()]
                if held:
                    lost = await self.queue.renew(held)
                    for job_id in lost:
                        running = self.inflight.get(job_id)
                        if (running is not None and running.task is not None and not running.task.done()
                                and not running.job.settled):
                            self.log.warning("batch_lease_lost", job_id=job_id)
                            running.cancel_reason = "lost"
                            running.task.cancel()
                if self.swap_slot_model is not None:
                    await self._renew_swap_slot()
                if await self.queue.reap():
                    self._wake.set()
                if time.monotonic() >= next_reasons:
                    next_reasons = time.monotonic() + 2.0
                    await self._publish_waiting_reasons()
                if time.monotonic() >= next_stats:
                    next_stats = time.monotonic() + 5.0
                    metrics.BATCH_QUEUED.set(await self.queue.queued_count())
                    await self.queue.trim_events()
                self._account()
            except asyncio.CancelledError:
                raise
            except REDIS_OR_OS_ERRORS as exc:
                self.log.warning("batch_lease_keeper_error", error=str(exc))


    # --- co-serving: the batch limit beside realtime traffic (gateway/batch/coserve.py)
    async def _control_loop(self) -> None:
        """Every COSERVE_INTERVAL_SECONDS, let the controller set the limit from realtime latency and the
        runtime's load; while a batch group runs another model there is no realtime to protect."""
        controller = self.controller
        if controller is None:
            return
        interval = controller.config.interval
        while True:
            await asyncio.sleep(interval)
            try:
                if self.group is not None:
                    self.set_limit(self.slots, "batch_group")
                    continue
                snap = self.supervisor.snapshot
                load = await self._runtime_load(snap) if snap.ready else RuntimeLoad()
                active = self.activity.idle_for() < self.settings.coserve_window_seconds
                decision = controller.step(self.activity.ttft, self.activity.itl, load, realtime_active=active,
                                           priority=self.settings.priority_scheduling,
                                           first_token_wait=self.activity.first_token_wait())
                if decision.ttft is not None:
                    metrics.COSERVE_REALTIME_TTFT.set(decision.ttft)
                if self.group is None:
                    self.set_limit(decision.limit, decision.reason)
            except asyncio.CancelledError:
                raise
            except Exception:  # the next round decides again; the limit stays as it was
                self.log.exception("coserve_control_failed")

    async def _runtime_load(self, snap: RuntimeSnapshot) -> RuntimeLoad:
        """The runtime's waiting/running/KV gauges; empty when its /metrics cannot be read right now."""
        try:
            async with asyncio.timeout(1.0):
                exchange = await self.upstream.request(snap.base_url or "", self.supervisor.flavour.metrics_path,
                                                       b"", {}, until="body", method=b"GET")
                if exchange.status != 200:
                    return RuntimeLoad()
                return parse_runtime_load((await exchange.read()).decode(errors="replace"))
        except (UpstreamError, TimeoutError):
            return RuntimeLoad()

    def set_limit(self, limit: int, reason: str) -> None:
        """Set the co-served batch limit (the controller does, every COSERVE_INTERVAL_SECONDS)."""
        previous = self.limit
        self.limit, self.limit_reason = limit, reason
        if limit == previous:
            return
        metrics.COSERVE_LIMIT.set(limit)
        metrics.COSERVE_CHANGES.labels(reason).inc()
        self.log.info("coserve_limit", limit=limit, previous=previous, reason=reason)
        if limit > previous:
            self._slot_free.set()
            self._wake.set()
            return
        # Lower: jobs claimed ahead beyond the new room go back to the queue at once, and the newest
        # requests the runtime is working on beyond the limit are stopped and requeued without costing an
        # attempt. Even with priority scheduling: the runtime puts realtime first in its waiting queue, but
        # every running batch sequence still lengthens each step (a decode, a prefill chunk), so a limit
        # that waited for in-flight requests to finish would act only a whole batch request later.
        waiting = sorted((r for r in self.inflight.values() if not r.sending and not r.job.settled),
                         key=lambda r: r.started, reverse=True)
        surplus = len(waiting) - min(self.prefetch, limit)
        victims = waiting[:max(0, surplus)]
        sending = sorted((r for r in self.inflight.values() if r.sending and not r.job.settled),
                         key=lambda r: r.started, reverse=True)
        victims += sending[:max(0, len(sending) - limit)]
        metrics.COSERVE_PREEMPTED.inc(max(0, len(sending) - limit))
        for running in victims:
            if running.task is not None and not running.task.done():
                running.cancel_reason = "coserve"
                running.task.cancel()


def _crash_between(before: RuntimeSnapshot, after: RuntimeSnapshot) -> str | None:
    """The newest crash log when the runtime crashed between two snapshots, else None."""
    crashed = (after.restarts != before.restarts or after.last_crash_log != before.last_crash_log
               or after.state.value in ("failed", "starting", "stopped"))
    if not crashed:
        return None
    return after.last_crash_log or "(no crash log written)"


def _runtime_message(payload: bytes) -> str:
    """The error message of a runtime answer (OpenAI/vLLM shape), or the start of its text."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return payload[:300].decode(errors="replace").strip()
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(data.get("message"), str):
            return str(data["message"])
        if isinstance(error, str):
            return error
    return payload[:300].decode(errors="replace").strip()
