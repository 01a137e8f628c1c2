"""The composition root: `create_app(settings)` builds every component, in dependency order, and the routes.

This is the one place that knows how the parts fit together. Each component gets its collaborators as
explicit constructor arguments and is reached through a typed key in gateway/http/appkeys.py. Every
long-lived component is started and stopped by `actor_ctx`, one aiohttp cleanup context each: they
start in the order appended below and stop in reverse, so whatever uses a resource stops before it.
Route modules (gateway/http/*) only add routes.
"""

from __future__ import annotations

import asyncio
import signal
import warnings
from collections.abc import AsyncIterator, Callable
from typing import Protocol, TypeVar

import aiohttp
import structlog
from aiohttp import web

from gateway import metrics, redis_client
from gateway.activity import RealtimeActivity
from gateway.actors.dispatcher import BatchDispatcher
from gateway.actors.evals import EvalRunner
from gateway.actors.job_feed import JobEventFeed
from gateway.actors.queue_depth import QueueDepthSampler
from gateway.actors.registry import NodeRegistry
from gateway.actors.supervisor import RuntimeSupervisor
from gateway.actors.traffic import TrafficSampler
from gateway.actors.usage import UsageAccountant
from gateway.batch.queue import JobQueue
from gateway.evals.runs import RunStore
from gateway.fleet.store import FleetStore
from gateway.http import (
    admin,
    batch,
    batches,
    dashboard,
    evals,
    files,
    fleet,
    middleware,
    monitor,
    openapi,
    realtime,
    system,
    uploads,
)
from gateway.http.appkeys import (
    ACCOUNTANT,
    ACTIVITY,
    AUTH_THROTTLE,
    BATCH_MANAGER,
    BATCH_QUEUE,
    DISPATCHER,
    EVAL_RUNNER,
    FLEET,
    JOB_FEED,
    KEYRING,
    NODE_REGISTRY,
    QUEUE_DEPTH_SAMPLER,
    REDIS,
    REDIS_KEYS,
    SETTINGS,
    SUPERVISOR,
    TRAFFIC,
    UPLOAD_SWEEPER,
    UPLOADS,
    UPSTREAM,
    UPSTREAM_POOL,
    USAGE,
)
from gateway.http.errors import retry_hint
from gateway.http.throttle import AuthThrottle
from gateway.keys import Keyring
from gateway.openai_batches.manager import BatchManager
from gateway.openai_batches.records import BatchRecords
from gateway.settings import Settings
from gateway.start_times import StartTimeStore
from gateway.uploads import UploadStore, UploadSweeper
from gateway.upstream import UpstreamPool
from gateway.usage_store import UsageStore

log = structlog.get_logger(component="bootstrap")

CleanupCtx = Callable[[web.Application], AsyncIterator[None]]


class Startable(Protocol):
    """What `actor_ctx` runs: a component with a start and a bounded stop (gateway/actors/base.py)."""

    async def start(self) -> None: ...

    async def stop(self, timeout: float = ...) -> None: ...


C = TypeVar("C", bound=Startable)


def actor_ctx(key: web.AppKey[C], factory: Callable[[web.Application], C],
              stop_timeout: float | Callable[[Settings], float]) -> CleanupCtx:
    """A cleanup context that builds a component with `factory`, stores it under `key`, starts it, and
    stops it within `stop_timeout` seconds (or a function of the settings) when the app shuts down."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        component = factory(app)
        app[key] = component
        await component.start()
        yield
        timeout = stop_timeout(app[SETTINGS]) if callable(stop_timeout) else stop_timeout
        await component.stop(timeout=timeout)

    return ctx


# --- resources (no loop of their own)
async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    # Short socket timeouts: a dead Redis must fail fast, never hang a request or an actor.
    app[REDIS] = await redis_client.open_client(settings, socket_timeout=5, socket_connect_timeout=2)
    app[BATCH_QUEUE] = JobQueue(app[REDIS], app[REDIS_KEYS], settings)
    app[USAGE] = UsageStore(app[REDIS], app[REDIS_KEYS], daily_ttl_days=settings.usage_daily_ttl_days)
    app[FLEET] = FleetStore(app[REDIS], app[REDIS_KEYS])
    yield
    await redis_client.close(app[REDIS])


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    connector = aiohttp.TCPConnector(limit=settings.upstream_max_connections, ttl_dns_cache=300,
                                     keepalive_timeout=30)
    timeout = aiohttp.ClientTimeout(total=None, connect=settings.upstream_connect_timeout,
                                    sock_read=settings.upstream_read_timeout)
    # auto_decompress off: bodies are relayed byte for byte.
    app[UPSTREAM] = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                          skip_auto_headers=("User-Agent",))
    app[UPSTREAM_POOL] = UpstreamPool(limit=settings.upstream_max_connections,
                                      connect_timeout=settings.upstream_connect_timeout,
                                      read_timeout=settings.upstream_read_timeout)
    yield
    app[UPSTREAM_POOL].close()
    await app[UPSTREAM].close()


def _upload_store(settings: Settings) -> UploadStore:
    store = UploadStore(settings.upload_dir, max_size=settings.upload_max_size,
                        key_quota=settings.upload_key_quota_bytes, expiry_seconds=settings.upload_expiry_seconds,
                        max_lifetime_seconds=settings.upload_max_lifetime_seconds,
                        key_max_uploads=settings.upload_key_max_uploads,
                        metadata_max_chars=settings.upload_metadata_max_bytes)
    store.load()
    return store


async def _signals_ctx(app: web.Application) -> AsyncIterator[None]:
    # SIGHUP reloads the keys file without dropping traffic; a bad file keeps the old keys.
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, app[KEYRING].reload)
        installed = True
    except (RuntimeError, NotImplementedError, ValueError):
        installed = False  # not the main thread (some test runners); reload stays available in-process
    yield
    if installed:
        loop.remove_signal_handler(signal.SIGHUP)


# --- drain: batch stops claiming as soon as the listeners close
_DRAIN_TASKS = web.AppKey("drain_tasks", list)


async def _begin_drain(app: web.Application) -> None:
    # on_shutdown runs once the listeners are closed and before aiohttp waits up to SHUTDOWN_TIMEOUT for
    # in-flight requests: batch stops claiming now, beside that wait, and hands its running jobs back.
    metrics.DRAINING.set(1)
    dispatcher = app.get(DISPATCHER)
    if dispatcher is not None and dispatcher.running:
        app[_DRAIN_TASKS].append(asyncio.create_task(dispatcher.stop(timeout=app[SETTINGS].shutdown_timeout),
                                                     name="drain:dispatcher"))


async def _drain_ctx(app: web.Application) -> AsyncIterator[None]:
    metrics.DRAINING.set(0)
    yield
    # Exits after the feature components' contexts and before the supervisor's: the runtime stays up
    # until the batch drain begun on shutdown has requeued its jobs.
    for task in app[_DRAIN_TASKS]:
        try:
            await task
        except Exception:
            log.exception("drain_failed", task=task.get_name())


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    # aiohttp would name itself and Python with their versions.
    response.headers["Server"] = "llm-gateway"


def _shutdown_timeout(settings: Settings) -> float:
    return settings.shutdown_timeout


def create_app(settings: Settings) -> web.Application:
    """Build the aiohttp application with every component wired in dependency order.

    Raises KeysFileError when the keys file cannot be used (start-up stops with that message).
    """
    with warnings.catch_warnings():
        # aiohttp marks a custom router deprecated, yet it is the one way to keep aiohttp from sending
        # `100 Continue` before the request is authorised (middleware.GatewayRouter).
        warnings.simplefilter("ignore", DeprecationWarning)
        app = web.Application(client_max_size=settings.max_body_bytes, router=middleware.GatewayRouter(),
                              middlewares=[middleware.request_context, middleware.authenticate,
                                           middleware.body_deadline])
    app[SETTINGS] = settings
    app.on_response_prepare.append(retry_hint)
    app[AUTH_THROTTLE] = AuthThrottle(settings.auth_fail_max, settings.auth_fail_window_seconds,
                                      settings.auth_fail_table_max, settings.trusted_proxy_networks)
    app.on_response_prepare.append(_server_header)
    keyring = Keyring(settings.auth_keys_file, refuse_demo_tokens=not settings.listens_on_loopback_only)
    keyring.load()
    app[KEYRING] = keyring
    app[REDIS_KEYS] = redis_client.keys_for(settings)
    app[ACTIVITY] = RealtimeActivity()
    app[_DRAIN_TASKS] = []

    ctx = app.cleanup_ctx
    ctx.append(_redis_ctx)  # the Redis client and the stores on it
    ctx.append(actor_ctx(ACCOUNTANT, lambda a: UsageAccountant(
        a[USAGE], buffer_max=settings.usage_buffer_max, flush_interval=settings.usage_flush_interval), 10))
    ctx.append(_upstream_ctx)
    ctx.append(actor_ctx(SUPERVISOR, lambda a: RuntimeSupervisor(
        settings, start_times=StartTimeStore(a[REDIS], a[REDIS_KEYS])), 10))
    ctx.append(_signals_ctx)
    ctx.append(_drain_ctx)
    app.on_shutdown.append(_begin_drain)
    # Feature components, after the resources they use (and so stopped before them):
    if settings.batch_dispatcher_enabled:
        ctx.append(actor_ctx(DISPATCHER, lambda a: BatchDispatcher(
            settings, a[BATCH_QUEUE], a[SUPERVISOR], a[ACTIVITY], a[ACCOUNTANT], a[FLEET]), _shutdown_timeout))
    # The node registry reads the dispatcher's status; it also checks that UPLOAD_DIR is the shared one.
    ctx.append(actor_ctx(NODE_REGISTRY, lambda a: NodeRegistry(
        settings, a[FLEET], a[SUPERVISOR], a[ACTIVITY], a.get(DISPATCHER)), 5))
    # One follower of the job event stream for every component that waits for job outcomes (below).
    ctx.append(actor_ctx(JOB_FEED, lambda a: JobEventFeed(a[BATCH_QUEUE]), 5))
    # The EvalRunner submits through the batch queue.
    ctx.append(actor_ctx(EVAL_RUNNER, lambda a: EvalRunner(
        settings, RunStore(a[REDIS], a[REDIS_KEYS]), a[BATCH_QUEUE], a[KEYRING], a[JOB_FEED]), _shutdown_timeout))
    ctx.append(actor_ctx(UPLOAD_SWEEPER, lambda a: _sweeper(a, settings), 5))
    # The Batches manager reads input files from the upload store and enqueues on the batch queue.
    ctx.append(actor_ctx(BATCH_MANAGER, lambda a: BatchManager(
        settings, BatchRecords(a[REDIS], a[REDIS_KEYS], settings.batch_job_ttl_seconds), a[BATCH_QUEUE],
        a[UPLOADS], a[JOB_FEED],
        uploads_shared=lambda: a[NODE_REGISTRY].uploads_shared), _shutdown_timeout))
    ctx.append(actor_ctx(QUEUE_DEPTH_SAMPLER, lambda a: QueueDepthSampler(a[BATCH_QUEUE], settings), 5))
    ctx.append(actor_ctx(TRAFFIC, lambda a: TrafficSampler(), 5))

    for routes in (system, realtime, batch, evals, uploads, files, batches, admin, monitor, fleet, dashboard,
                   openapi):
        routes.setup(app)
    return app


def _sweeper(app: web.Application, settings: Settings) -> UploadSweeper:
    # The store has no loop of its own: it is opened here and lives as long as its sweeper.
    app[UPLOADS] = _upload_store(settings)
    return UploadSweeper(app[UPLOADS], settings.upload_sweep_interval)
