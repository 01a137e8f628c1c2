"""`create_app(settings)`: builds the whole service from one settings object (tests do the same)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import aiohttp
import structlog
from aiohttp import web
from redis.asyncio import Redis

from gateway import metrics
from gateway.activity import RealtimeActivity
from gateway.actors.supervisor import RuntimeSupervisor
from gateway.actors.usage import UsageAccountant
from gateway.http import (admin, batch, batches, dashboard, evals, files, middleware, openapi, realtime, system,
                          uploads)
from gateway.http.appkeys import (ACCOUNTANT, ACTIVITY, DISPATCHER, KEYRING, REDIS, REDIS_KEYS, SETTINGS,
                                  SUPERVISOR, UPSTREAM, UPSTREAM_POOL)
from gateway.http.auth import Keyring
from gateway.http.upstream import UpstreamPool
from gateway.redis_keys import RedisKeys
from gateway.settings import Settings

log = structlog.get_logger(component="app")


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    # Short socket timeouts: a dead Redis must fail fast, never hang a request or an actor.
    app[REDIS] = Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2,
                                health_check_interval=30)
    yield
    await app[REDIS].aclose()


async def _accountant_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    accountant = UsageAccountant(app[REDIS], app[REDIS_KEYS], buffer_max=settings.usage_buffer_max,
                                 flush_interval=settings.usage_flush_interval,
                                 daily_ttl_days=settings.usage_daily_ttl_days)
    app[ACCOUNTANT] = accountant
    await accountant.start()
    yield
    await accountant.stop(timeout=10)


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


async def _supervisor_ctx(app: web.Application) -> AsyncIterator[None]:
    supervisor = RuntimeSupervisor(app[SETTINGS])
    app[SUPERVISOR] = supervisor
    await supervisor.start()
    yield
    await supervisor.stop()


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
    # Exits after the feature contexts and before the supervisor's: the runtime stays up until the
    # batch drain begun on shutdown has requeued its jobs.
    for task in app[_DRAIN_TASKS]:
        try:
            await task
        except Exception:
            log.exception("drain_failed", task=task.get_name())


def create_app(settings: Settings) -> web.Application:
    """Build the aiohttp application with every actor wired in dependency order.

    Raises KeysFileError when the keys file cannot be used (start-up stops with that message).
    """
    app = web.Application(client_max_size=settings.max_body_bytes,
                          middlewares=[middleware.request_context, middleware.authenticate,
                                       middleware.body_deadline])
    app[SETTINGS] = settings
    keyring = Keyring(settings.auth_keys_file)
    keyring.load()
    app[KEYRING] = keyring
    app[REDIS_KEYS] = RedisKeys(settings.redis_prefix)
    app[ACTIVITY] = RealtimeActivity()

    # Started in this order, stopped in reverse: whatever uses a resource stops before it.
    app.cleanup_ctx.append(_redis_ctx)
    app.cleanup_ctx.append(_accountant_ctx)
    app.cleanup_ctx.append(_upstream_ctx)
    app.cleanup_ctx.append(_supervisor_ctx)
    app.cleanup_ctx.append(_signals_ctx)
    app.cleanup_ctx.append(_drain_ctx)
    app[_DRAIN_TASKS] = []
    app.on_shutdown.append(_begin_drain)

    system.setup(app)
    realtime.setup(app)
    # Feature route families (each adds its routes and its own cleanup contexts):
    batch.setup(app)
    evals.setup(app)  # after batch: the EvalRunner submits through the batch queue
    uploads.setup(app)
    files.setup(app)
    batches.setup(app)  # after batch and uploads: the manager uses the queue and the store
    admin.setup(app)
    dashboard.setup(app)  # the /dashboard pages and the /monitor/* JSON behind them
    openapi.setup(app)  # GET /openapi.json
    return app
