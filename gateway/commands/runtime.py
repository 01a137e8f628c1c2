"""`llm-gateway runtime`: status, restart and swap of a running gateway's runtime, over its HTTP API
with a monitor token."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from gateway.commands.common import CliError, Progress, RunAsync, print_json
from gateway.settings import load_settings


def _base_url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    if os.environ.get("LLM_GATEWAY_URL"):
        return os.environ["LLM_GATEWAY_URL"].rstrip("/")
    settings = load_settings()
    host = settings.listen_host if settings.listen_host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return f"http://{host}:{settings.listen_port}"


def _token(args: argparse.Namespace) -> str:
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise CliError(f"cannot read {args.token_file}: {exc.strerror}") from None
    else:
        token = os.environ.get("LLM_GATEWAY_TOKEN", "")
    if not token:
        raise CliError("a monitor token is needed: set LLM_GATEWAY_TOKEN or pass --token-file")
    return token


async def _call(session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    try:
        async with session.request(method, url, **kwargs) as resp:
            body = await resp.read()
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise CliError(f"cannot reach the gateway at {url}: {exc or type(exc).__name__}") from None
    try:
        data = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        data = body.decode(errors="replace")
    if status == 401:
        raise CliError(f"the gateway refused the token: {_error_message(data)}")
    return status, data


def _error_message(data: Any) -> str:
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return str(data["error"].get("message"))
    return str(data)


def _describe(state: dict[str, Any]) -> str:
    text = f"runtime {state.get('state')}"
    if state.get("model"):
        text += f" ({state['model']})"
    if state.get("state") == "failed" and state.get("last_error"):
        text += f": {state['last_error']}"
    return text


async def _follow(session: aiohttp.ClientSession, base: str, headers: dict[str, str], model: str | None,
                  timeout: float, after: float, interval: float = 0.5) -> int:
    """Poll /monitor/runtime until it is ready (with `model` when given) after time `after`."""
    progress = Progress()
    deadline = time.monotonic() + timeout
    while True:
        status, state = await _call(session, "GET", base + "/monitor/runtime", headers=headers)
        if status != 200 or not isinstance(state, dict):
            raise CliError(f"GET /monitor/runtime answered {status}: {_error_message(state)}")
        fresh = float(state.get("since") or 0) >= after
        if state.get("state") == "ready" and (model is None or state.get("model") == model) and fresh:
            progress.done(f"done: {_describe(state)}")
            return 0
        if state.get("state") == "failed" and fresh:
            progress.done(f"failed: {_describe(state)}; the supervisor retries on its own"
                          + (f"; crash log: {state['last_crash_log']}" if state.get("last_crash_log") else ""))
            return 1
        if time.monotonic() >= deadline:
            progress.done(f"gave up waiting after {timeout:g} s: {_describe(state)}")
            return 1
        eta = state.get("ready_eta")
        hint = f", ready in ~{max(0, round(float(eta) - time.time()))}s" if eta else ""
        progress.update(f"waiting: {_describe(state)}{hint}")
        await asyncio.sleep(interval)


async def runtime_status(args: argparse.Namespace) -> int:
    """The runtime's state as the gateway sees it."""
    base, headers = _base_url(args), {"Authorization": f"Bearer {_token(args)}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        status, state = await _call(session, "GET", base + "/monitor/runtime", headers=headers)
    if status != 200 or not isinstance(state, dict):
        raise CliError(f"GET /monitor/runtime answered {status}: {_error_message(state)}")
    if args.json:
        print_json(state)
        return 0
    for name in ("state", "model", "realtime_model", "uptime_seconds", "restarts", "last_error", "last_crash_log"):
        print(f"{name:15} {state.get(name) if state.get(name) is not None else '-'}")
    return 0


async def _action(args: argparse.Namespace, path: str, body: dict[str, Any] | None, model: str | None) -> int:
    base, headers = _base_url(args), {"Authorization": f"Bearer {_token(args)}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        asked = time.time()
        status, state = await _call(session, "POST", base + path, headers=headers, json=body or {},
                                    params={"wait": "0"})
        if status not in (200, 202) or not isinstance(state, dict):
            raise CliError(f"POST {path} answered {status}: {_error_message(state)}")
        if status == 200:  # nothing to wait for (e.g. a swap to the model already served)
            print(f"done: {_describe(state)}", file=sys.stderr)
            return 0
        print(f"accepted: {_describe(state)}", file=sys.stderr)
        if args.no_wait:
            return 0
        # The server's clock stamps `since`; allow for a little skew against ours.
        return await _follow(session, base, headers, model, args.timeout, after=min(asked, float(state["since"])) - 1)


async def runtime_restart(args: argparse.Namespace) -> int:
    """Restart the runtime and wait until it serves again."""
    return await _action(args, "/monitor/runtime/restart", None, None)


async def runtime_swap(args: argparse.Namespace) -> int:
    """Load another model (or the realtime one back) and wait until it serves."""
    return await _action(args, "/monitor/runtime/swap", {"model": args.model}, args.model)




def add_parser(sub: Any, run_async: RunAsync) -> None:
    """Add `runtime status|restart|swap`."""
    runtime = sub.add_parser("runtime", help="the runtime of a running gateway (monitor token)")
    runtime_sub = runtime.add_subparsers(dest="runtime_command")

    def runtime_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = runtime_sub.add_parser(name, help=help_text)
        p.add_argument("--url", help="gateway base URL (default: LLM_GATEWAY_URL, else LISTEN_HOST:LISTEN_PORT)")
        p.add_argument("--token-file", help="file holding a monitor token (default: $LLM_GATEWAY_TOKEN)")
        return p

    rs = runtime_parser("status", "state, model, uptime, restarts, last error")
    rs.add_argument("--json", action="store_true")
    rs.set_defaults(func=run_async(runtime_status))
    for name, func, help_text in (("restart", runtime_restart, "restart the runtime and wait until it serves"),
                                  ("swap", runtime_swap, "load a model and wait until it serves")):
        p = runtime_parser(name, help_text)
        if name == "swap":
            p.add_argument("model")
        p.add_argument("--no-wait", action="store_true", help="return once the gateway accepted")
        p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait (default 1800)")
        p.set_defaults(func=run_async(func))
