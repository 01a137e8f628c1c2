"""The `llm-gateway` command line (also `python -m gateway`)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys

from aiohttp import web

from gateway import __version__
from gateway.http.auth import KeysFileError, hash_token
from gateway.logging import configure_logging, get_logger
from gateway.settings import SettingsError, load_settings


def _serve(args: argparse.Namespace) -> int:
    overrides: dict[str, object] = {}
    if args.host:
        overrides["listen_host"] = args.host
    if args.port is not None:
        overrides["listen_port"] = args.port
    settings = load_settings(**overrides)
    configure_logging(settings.log_level, settings.log_format)
    from gateway.http.app import create_app  # after logging is configured

    app = create_app(settings)
    # Start-up objects live for the whole process: freeze them out of the collector's way, and collect
    # young objects less often, which keeps GC pauses out of the proxy's tail latency.
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
    log = get_logger("cli")
    log.info("serving", host=settings.listen_host, port=settings.listen_port,
             backend=settings.runtime_backend.value, runtime_type=settings.runtime_type.value,
             model=settings.realtime_model, version=__version__)
    web.run_app(app, host=settings.listen_host, port=settings.listen_port, handler_cancellation=True,
                shutdown_timeout=settings.shutdown_timeout, access_log=None, print=None, loop=_new_loop())
    return 0


def _new_loop() -> asyncio.AbstractEventLoop:
    # uvloop roughly halves the per-request CPU cost of the proxy; plain asyncio where it is missing.
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()  # type: ignore[no-any-return]


def _hash(args: argparse.Namespace) -> int:
    print(hash_token(args.token))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["serve", *(argv or [])])
    try:
        return int(args.func(args))
    except (SettingsError, KeysFileError) as exc:
        print(f"llm-gateway: {exc}", file=sys.stderr)
        return 2
