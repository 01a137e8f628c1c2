"""The `llm-gateway` command line (also `python -m gateway`).

Sub-commands: serve, hash-token, keys (create/list/revoke), jobs (list/show/cancel/requeue), usage
(top/days) and runtime (status/restart/swap). `keys` edits AUTH_KEYS_FILE, `jobs` and `usage` work on
Redis directly (the same settings as the service), `runtime` talks to a running gateway over HTTP with
a monitor token. docs/operations.md is the reference.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from gateway import __version__, systemd
from gateway.commands import CliError
from gateway.keys import KeysFileError, hash_token
from gateway.logging import configure_logging, get_logger
from gateway.settings import Settings, SettingsError, load_settings


def _serve(args: argparse.Namespace) -> int:
    overrides: dict[str, object] = {}
    if args.host:
        overrides["listen_host"] = args.host
    if args.port is not None:
        overrides["listen_port"] = args.port
    settings = load_settings(**overrides)
    configure_logging(settings.log_level, settings.log_format)
    from gateway.bootstrap import create_app  # after logging is configured

    # Taken out of the environment before anything starts a subprocess (the runtime must not see them).
    notifier, watchdog = systemd.from_environment()
    app = create_app(settings)
    # Start-up objects live for the whole process: freeze them out of the collector's way, and collect
    # young objects less often, which keeps GC pauses out of the proxy's tail latency.
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
    log = get_logger("cli")
    log.info("serving", host=settings.listen_host, port=settings.listen_port,
             backend=settings.runtime_backend.value, runtime_type=settings.runtime_type.value,
             model=settings.realtime_model, version=__version__, systemd_notify=notifier.enabled,
             watchdog_interval=watchdog)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_run_service(app, settings, notifier, watchdog))
    notifier.close()
    return 0


async def _run_service(app: web.Application, settings: Settings, notifier: systemd.Notifier,
                       watchdog: float | None) -> None:
    """Serve until SIGTERM/SIGINT, then drain: see docs/operations.md ("Drain semantics")."""
    from gateway import metrics
    from gateway.http.appkeys import ACCOUNTANT, DISPATCHER, SUPERVISOR

    log = get_logger("cli")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # aiohttp: on SIGTERM the listeners close, on_shutdown runs (batch drain starts), in-flight handlers
    # get SHUTDOWN_TIMEOUT to finish and are cancelled after it, then the cleanup contexts stop the actors.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=settings.shutdown_timeout,
                           keepalive_timeout=settings.client_header_timeout)
    cleaned = False
    try:
        await runner.setup()
        site = web.TCPSite(runner, settings.listen_host, settings.listen_port)
        try:
            await site.start()
        except OSError as exc:
            raise CliError(f"cannot listen on {settings.listen_host}:{settings.listen_port} (LISTEN_HOST, "
                           f"LISTEN_PORT): {exc.strerror or exc}") from None

        def status() -> str:
            snap = app[SUPERVISOR].snapshot
            text = f"serving on {settings.listen_host}:{settings.listen_port}; runtime {snap.state.value}" + \
                (f" ({snap.model})" if snap.model else "")
            dispatcher = app.get(DISPATCHER)
            queued = sum(metrics.QUEUE_DEPTH.rows.values())
            held = dispatcher.status().in_flight if dispatcher is not None else 0
            if dispatcher is not None and (held or queued):
                text += f"; batch {held} running, {queued} queued"
            return text

        def healthy() -> bool:
            return app[SUPERVISOR].running and app[ACCOUNTANT].running

        # READY once the port accepts and the supervisor runs; the runtime may still be loading (it can
        # take many minutes): requests get 503 + Retry-After meanwhile and /ready tells when it serves.
        ready_status = status()
        notifier.ready(ready_status)
        log.info("listening", host=settings.listen_host, port=settings.listen_port)
        async with asyncio.TaskGroup() as tasks:
            pinger = None
            if watchdog is not None:
                pinger = tasks.create_task(systemd.run_watchdog(notifier, watchdog, healthy, status,
                                                                ready_status),
                                           name="systemd:watchdog")
            await stop.wait()
            notifier.stopping(f"draining: in-flight requests get {settings.shutdown_timeout:g} s")
            log.info("draining", shutdown_timeout=settings.shutdown_timeout)
            cleaned = True
            try:
                await runner.cleanup()
            finally:
                if pinger is not None:
                    pinger.cancel()
    finally:
        if not cleaned:
            await runner.cleanup()  # a failed start: stop whatever actors did start
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    # uvloop roughly halves the per-request CPU cost of the proxy; plain asyncio where it is missing.
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop  # type: ignore[no-any-return, unused-ignore]


def _hash(args: argparse.Namespace) -> int:
    print(hash_token(args.token))
    return 0


def _async(command: Callable[[argparse.Namespace], Coroutine[Any, Any, int]]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return asyncio.run(command(args))

    return run


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    from gateway import commands

    parser = argparse.ArgumentParser(prog="llm-gateway", description="LLM gateway for one GPU node.")
    parser.add_argument("--version", action="version", version=f"llm-gateway {__version__}")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the gateway (default)")
    serve.add_argument("--host", help="listen address (LISTEN_HOST)")
    serve.add_argument("--port", type=int, help="listen port (LISTEN_PORT)")
    serve.set_defaults(func=_serve)
    hasher = sub.add_parser("hash-token", help="print the sha256 of a token, for token_sha256 in the keys file")
    hasher.add_argument("token")
    hasher.set_defaults(func=_hash)
    commands.add_commands(sub, _async)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["serve", *(argv or [])])
    if getattr(args, "func", None) is None:
        parser.parse_args([args.command, "--help"])  # a group without its sub-command: show its usage
    try:
        return int(args.func(args))
    except (SettingsError, KeysFileError, CliError) as exc:
        print(f"llm-gateway: {exc}", file=sys.stderr)
        return 2 if not isinstance(exc, CliError) else 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `llm-gateway jobs list | head`: the reader left; not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
