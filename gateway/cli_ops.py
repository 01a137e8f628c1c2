"""Operator sub-commands of `llm-gateway`: keys, jobs, usage, runtime (docs/operations.md, "CLI").

keys edit AUTH_KEYS_FILE (atomically, under a lock; new tokens are printed once and stored as sha256);
jobs and usage read and change Redis directly with the service's settings (REDIS_URL, REDIS_PREFIX);
runtime talks to a running gateway's HTTP API with a monitor token.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import itertools
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.http.auth import KeysFileError, Scope, hash_token, parse_keys
from gateway.redis_keys import RedisKeys
from gateway.settings import Settings, load_settings

AsyncCommand = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


class CliError(Exception):
    """A failure the user can act on: printed as one line, exit code 1."""


# ---------------------------------------------------------------- output helpers
def _table(rows: list[list[str]], headers: list[str], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(), file=out)
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


def _json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n")


def _when(ts: str | float | None) -> str:
    if ts in (None, ""):
        return "-"
    return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M:%S")


class Progress:
    """One status line for a long wait: a spinner redrawn in place on a terminal, plain lines otherwise.

    Plain mode prints when the message changes and every `every` seconds, so logs of a non-interactive
    run (CI, `| tee`) show progress without a carriage-return mess.
    """

    def __init__(self, stream: TextIO | None = None, every: float = 10.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every
        self.started = time.monotonic()
        self._spinner = itertools.cycle("|/-\\")
        self._last_message: str | None = None
        self._last_print = 0.0
        self._width = 0

    def update(self, message: str) -> None:
        """Show `message` with the elapsed time."""
        elapsed = time.monotonic() - self.started
        line = f"{message} ({elapsed:.0f}s elapsed)"
        if self.tty:
            text = f"\r{next(self._spinner)} {line}"
            self.stream.write(text.ljust(self._width))
            self._width = len(text)
            self.stream.flush()
        elif message != self._last_message or time.monotonic() - self._last_print >= self.every:
            print(line, file=self.stream, flush=True)
            self._last_print = time.monotonic()
        self._last_message = message

    def done(self, message: str) -> None:
        """End the status line with a final message."""
        elapsed = time.monotonic() - self.started
        if self.tty:
            self.stream.write("\r" + " " * self._width + "\r")
        print(f"{message} ({elapsed:.1f}s)", file=self.stream, flush=True)


# ---------------------------------------------------------------- keys
@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock beside the keys file, so two CLI runs never lose each other's change."""
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_keys(path: Path, *, missing_ok: bool) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return {"keys": []}
        raise CliError(f"AUTH_KEYS_FILE {path} does not exist") from None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise CliError(f"AUTH_KEYS_FILE {path} is not valid JSON: {exc}") from None
    if isinstance(data, list):
        data = {"keys": data}
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise CliError(f"AUTH_KEYS_FILE {path}: expected {{\"keys\": [...]}}")
    return data


def write_keys_atomically(path: Path, data: dict[str, Any]) -> None:
    """Validate, then replace the keys file in one rename (a reader sees the old or the new file)."""
    parse_keys(data, str(path))  # never write a file the gateway would refuse
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o640
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _keys_path(args: argparse.Namespace) -> Path:
    if args.keys_file:
        return Path(args.keys_file)
    return Path(load_settings().auth_keys_file)


def _reload(args: argparse.Namespace) -> None:
    pid: int | None = args.reload_pid
    if args.reload_pid_file:
        try:
            pid = int(Path(args.reload_pid_file).read_text().strip())
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot read a pid from {args.reload_pid_file}: {exc}") from None
    if pid is None:
        print("The keys file changed; a running gateway picks it up on `systemctl reload llm-gateway` "
              "(or `kill -HUP <pid>`, `docker compose kill -s HUP orchestrator`).", file=sys.stderr)
        return
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        raise CliError(f"keys file written, but SIGHUP to pid {pid} failed: {exc.strerror}") from None
    print(f"Sent SIGHUP to pid {pid}: the gateway reloads the keys.", file=sys.stderr)


def _parse_scopes(raw: str) -> list[str]:
    scopes = sorted({s.strip().lower() for s in raw.split(",") if s.strip()})
    valid = {s.value for s in Scope}
    bad = [s for s in scopes if s not in valid]
    if not scopes or bad:
        raise CliError(f"--scopes must be a comma list of: {', '.join(s.value for s in Scope)}"
                       + (f" (unknown: {', '.join(bad)})" if bad else ""))
    return scopes


def keys_create(args: argparse.Namespace) -> int:
    """Add a key with a new random token; print the token once, store only its sha256."""
    path = _keys_path(args)
    scopes = _parse_scopes(args.scopes)
    key_id = args.id.strip()
    if not key_id:
        raise CliError("the key id must not be empty")
    token = f"{args.prefix}{secrets.token_urlsafe(32)}"
    with _locked(path):
        data = _read_keys(path, missing_ok=True)
        if any(isinstance(e, dict) and e.get("id") == key_id for e in data["keys"]):
            raise CliError(f"a key with id {key_id!r} already exists in {path}; revoke it first or pick another id")
        entry: dict[str, Any] = {"id": key_id, "token_sha256": hash_token(token), "scopes": scopes,
                                 "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
        if args.description:
            entry["description"] = args.description
        data["keys"].append(entry)
        try:
            write_keys_atomically(path, data)
        except KeysFileError as exc:
            raise CliError(str(exc)) from None
    print(f"Created key {key_id!r} with scopes {', '.join(scopes)} in {path}. The token is shown only now:",
          file=sys.stderr)
    print(token)
    _reload(args)
    return 0


def keys_list(args: argparse.Namespace) -> int:
    """List the keys (ids, scopes, how each token is stored; never a token)."""
    path = _keys_path(args)
    data = _read_keys(path, missing_ok=False)
    try:
        parse_keys(data, str(path))
    except KeysFileError as exc:
        print(f"warning: the gateway would refuse this file: {exc}", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    for entry in data["keys"]:
        if not isinstance(entry, dict):
            continue
        rows.append({"id": str(entry.get("id")), "scopes": entry.get("scopes") or [],
                     "stored": "sha256" if "token_sha256" in entry else "plain",
                     "disabled": entry.get("disabled") is True, "created_at": entry.get("created_at"),
                     "description": entry.get("description")})
    if args.json:
        _json(rows)
    else:
        _table([[r["id"], ",".join(r["scopes"]), r["stored"], "yes" if r["disabled"] else "no",
                 r["created_at"] or "-"] for r in rows], ["ID", "SCOPES", "TOKEN", "DISABLED", "CREATED"])
    return 0


def keys_revoke(args: argparse.Namespace) -> int:
    """Remove a key from the file (its token stops working once the gateway reloads)."""
    path = _keys_path(args)
    with _locked(path):
        data = _read_keys(path, missing_ok=False)
        kept = [e for e in data["keys"] if not (isinstance(e, dict) and e.get("id") == args.id)]
        if len(kept) == len(data["keys"]):
            raise CliError(f"no key with id {args.id!r} in {path}")
        data["keys"] = kept
        try:
            write_keys_atomically(path, data)
        except KeysFileError as exc:
            raise CliError(str(exc)) from None
    print(f"Revoked key {args.id!r} in {path}.", file=sys.stderr)
    _reload(args)
    return 0


# ---------------------------------------------------------------- Redis-backed commands
@contextlib.asynccontextmanager
async def _redis(settings: Settings) -> AsyncIterator[Redis]:
    client = Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5)
    try:
        yield client
    except (RedisError, OSError) as exc:
        raise CliError(f"Redis at {settings.redis_url} failed: {exc}") from None
    finally:
        await client.aclose()


def _queue(redis: Redis, settings: Settings) -> Any:
    from gateway.batch.queue import JobQueue

    return JobQueue(redis, RedisKeys(settings.redis_prefix), settings)


async def _job_owner_ids(redis: Redis, keys: RedisKeys) -> list[str]:
    # There is one job index per key; an operator command may afford a SCAN to find them all.
    marker = keys.job_index("")
    found = {k.decode()[len(marker):] async for k in redis.scan_iter(match=marker + "*", count=1000)}
    return sorted(found)


async def jobs_list(args: argparse.Namespace) -> int:
    """Jobs of every key (or one), newest first."""
    settings = load_settings()
    async with _redis(settings) as redis:
        queue = _queue(redis, settings)
        owners = [args.key] if args.key else await _job_owner_ids(redis, queue.keys)
        jobs: list[dict[str, str]] = []
        for owner in owners:
            page = await queue.list(owner, limit=args.limit, status=args.status, model=args.model)
            jobs.extend(page.jobs)
    jobs.sort(key=lambda j: j.get("id", ""), reverse=True)  # ids sort by creation time
    jobs = jobs[: args.limit]
    if args.json:
        _json(jobs)
        return 0
    _table([[j.get("id", ""), j.get("key_id", ""), j.get("status", ""), j.get("model", ""),
             j.get("priority", "0"), f"{j.get('attempt', '0')}/{j.get('max_attempts', '?')}",
             _when(j.get("created_at")), (j.get("error") or "")[:60]] for j in jobs],
           ["ID", "KEY", "STATUS", "MODEL", "PRI", "ATTEMPT", "CREATED (UTC)", "ERROR"])
    return 0


async def jobs_show(args: argparse.Namespace) -> int:
    """One job as the API shows it (plus the key id, and the request body with --request)."""
    from gateway.batch.jobs import job_view

    settings = load_settings()
    async with _redis(settings) as redis:
        job = await _queue(redis, settings).get(args.job_id)
    if job is None:
        raise CliError(f"no job {args.job_id!r} (wrong id, REDIS_PREFIX, or expired after BATCH_JOB_TTL_SECONDS)")
    view = job_view(job)
    view["key_id"] = job.get("key_id")
    view["owner"] = job.get("owner") or None
    view["requeue_reason"] = job.get("requeue_reason") or None
    if args.request:
        view["request"] = orjson.loads(job["request"]) if job.get("request") else None
    _json(view)
    return 0


async def jobs_cancel(args: argparse.Namespace) -> int:
    """Cancel queued or running jobs (a running one is stopped by whichever gateway holds it)."""
    settings = load_settings()
    failures = 0
    async with _redis(settings) as redis:
        queue = _queue(redis, settings)
        for job_id in args.job_ids:
            job = await queue.get(job_id)
            if job is None:
                print(f"{job_id}: no such job", file=sys.stderr)
                failures += 1
                continue
            outcome, _ = await queue.cancel(job_id, job.get("key_id", ""))
            if outcome == "cancelled":
                print(f"{job_id}: cancelled")
            else:
                print(f"{job_id}: not cancelled, it is {outcome.removeprefix('already:')}", file=sys.stderr)
                failures += 1
    return 1 if failures else 0


async def jobs_requeue(args: argparse.Namespace) -> int:
    """Put failed jobs back in the queue with fresh attempts."""
    settings = load_settings()
    failures = 0
    async with _redis(settings) as redis:
        queue = _queue(redis, settings)
        job_ids = list(args.job_ids)
        if args.all_failed:
            owners = [args.key] if args.key else await _job_owner_ids(redis, queue.keys)
            for owner in owners:
                after: str | None = None
                while True:
                    page = await queue.list(owner, limit=500, after=after, status="failed", model=args.model)
                    job_ids.extend(j["id"] for j in page.jobs)
                    if page.next_cursor is None:
                        break
                    after = page.next_cursor
        if not job_ids:
            raise CliError("name job ids, or use --all-failed")
        for job_id in job_ids:
            outcome = await queue.requeue_failed(job_id, "operator")
            if outcome == "requeued":
                print(f"{job_id}: requeued")
            elif outcome == "missing":
                print(f"{job_id}: no such job", file=sys.stderr)
                failures += 1
            else:
                print(f"{job_id}: not requeued, it is {outcome} (only failed jobs are)", file=sys.stderr)
                failures += 1
    return 1 if failures else 0


def _day(raw: str) -> str:
    if raw == "today":
        return datetime.now(UTC).strftime("%Y%m%d")
    if raw == "yesterday":
        return (datetime.now(UTC) - timedelta(days=1)).strftime("%Y%m%d")
    if len(raw) != 8 or not raw.isdigit():
        raise argparse.ArgumentTypeError("use YYYYMMDD, today or yesterday")
    return raw


async def usage_top(args: argparse.Namespace) -> int:
    """The busiest keys, all-time or on one UTC day."""
    from gateway.actors.usage import read_key_usage

    settings = load_settings()
    async with _redis(settings) as redis:
        rows = await read_key_usage(redis, RedisKeys(settings.redis_prefix), limit=args.limit, bucket=args.day)
    if args.json:
        _json(rows)
        return 0
    _table([[str(r["key_id"]), str(r["requests"]), str(r["successes"]), str(r["errors"]), str(r["prompt_tokens"]),
             str(r["completion_tokens"]), _when(r.get("last_used_at"))] for r in rows],  # type: ignore[arg-type]
           ["KEY", "REQUESTS", "OK", "ERRORS", "PROMPT_TOKENS", "COMPLETION_TOKENS", "LAST_USED (UTC)"])
    return 0


async def usage_days(args: argparse.Namespace) -> int:
    """Usage per UTC day over the last N days, for one key or summed over all keys."""
    settings = load_settings()
    keys = RedisKeys(settings.redis_prefix)
    today = datetime.now(UTC).date()
    days = [(today - timedelta(days=n)).strftime("%Y%m%d") for n in range(args.days)]
    fields = ("requests", "successes", "errors", "prompt_tokens", "completion_tokens")
    async with _redis(settings) as redis:
        if args.key:
            owners = {day: [args.key] for day in days}
        else:
            pipe = redis.pipeline(transaction=False)
            for day in days:
                pipe.smembers(keys.key_usage_day_ids(day))
            owners = {day: sorted(k.decode() for k in members)
                      for day, members in zip(days, await pipe.execute(), strict=True)}
        pipe = redis.pipeline(transaction=False)
        plan = [(day, key_id) for day in days for key_id in owners[day]]
        for day, key_id in plan:
            pipe.hmget(keys.key_usage_day(key_id, day), fields)
        values = await pipe.execute() if plan else []
    totals: dict[str, dict[str, int]] = {day: dict.fromkeys(fields, 0) for day in days}
    for (day, _), row in zip(plan, values, strict=True):
        for name, value in zip(fields, row, strict=True):
            totals[day][name] += int(value or 0)
    rows = [{"day": day, "key_id": args.key, **totals[day]} for day in days]
    if args.json:
        _json(rows)
        return 0
    _table([[r["day"], str(r["requests"]), str(r["successes"]), str(r["errors"]), str(r["prompt_tokens"]),
             str(r["completion_tokens"])] for r in rows],
           ["DAY (UTC)", "REQUESTS", "OK", "ERRORS", "PROMPT_TOKENS", "COMPLETION_TOKENS"])
    return 0


# ---------------------------------------------------------------- runtime (HTTP to a running gateway)
def _base_url(args: argparse.Namespace) -> str:
    if args.url:
        return args.url.rstrip("/")
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
        _json(state)
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


# ---------------------------------------------------------------- parser
def add_commands(sub: Any, run_async: Callable[[AsyncCommand], Callable[[argparse.Namespace], int]]) -> None:
    """Add keys, jobs, usage and runtime to the `llm-gateway` sub-parsers."""
    keys = sub.add_parser("keys", help="create, list and revoke API keys in AUTH_KEYS_FILE")
    keys_sub = keys.add_subparsers(dest="keys_command")

    def keys_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = keys_sub.add_parser(name, help=help_text)
        p.add_argument("--keys-file", help="the keys file (default: AUTH_KEYS_FILE)")
        return p

    def reload_options(p: argparse.ArgumentParser) -> None:
        group = p.add_mutually_exclusive_group()
        group.add_argument("--reload-pid", type=int, help="send SIGHUP to this gateway pid afterwards")
        group.add_argument("--reload-pid-file", help="send SIGHUP to the pid written in this file")

    create = keys_parser("create", "add a key; prints its new token once (only its sha256 is stored)")
    create.add_argument("id", help="key id (what usage, metrics and logs show)")
    create.add_argument("--scopes", required=True, help=f"comma list of: {', '.join(s.value for s in Scope)}")
    create.add_argument("--description", help="free text kept beside the key")
    create.add_argument("--prefix", default="llmgw-", help="token prefix (default llmgw-)")
    reload_options(create)
    create.set_defaults(func=keys_create)
    listing = keys_parser("list", "list key ids and scopes (never tokens)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=keys_list)
    revoke = keys_parser("revoke", "remove a key")
    revoke.add_argument("id")
    reload_options(revoke)
    revoke.set_defaults(func=keys_revoke)

    jobs = sub.add_parser("jobs", help="batch jobs in Redis: list, show, cancel, requeue")
    jobs_sub = jobs.add_subparsers(dest="jobs_command")
    jl = jobs_sub.add_parser("list", help="jobs of all keys, newest first")
    jl.add_argument("--key", help="only this key id")
    jl.add_argument("--status", choices=["queued", "running", "completed", "failed", "cancelled"])
    jl.add_argument("--model")
    jl.add_argument("--limit", type=int, default=50)
    jl.add_argument("--json", action="store_true")
    jl.set_defaults(func=run_async(jobs_list))
    js = jobs_sub.add_parser("show", help="one job as JSON")
    js.add_argument("job_id")
    js.add_argument("--request", action="store_true", help="include the request body")
    js.set_defaults(func=run_async(jobs_show))
    jc = jobs_sub.add_parser("cancel", help="cancel queued or running jobs")
    jc.add_argument("job_ids", nargs="+")
    jc.set_defaults(func=run_async(jobs_cancel))
    jr = jobs_sub.add_parser("requeue", help="put failed jobs back in the queue with fresh attempts")
    jr.add_argument("job_ids", nargs="*")
    jr.add_argument("--all-failed", action="store_true", help="every failed job (of --key / --model)")
    jr.add_argument("--key")
    jr.add_argument("--model")
    jr.set_defaults(func=run_async(jobs_requeue))

    usage = sub.add_parser("usage", help="per-key usage from Redis")
    usage_sub = usage.add_subparsers(dest="usage_command")
    ut = usage_sub.add_parser("top", help="busiest keys (all-time, or one UTC day with --day)")
    ut.add_argument("--day", type=_day, help="YYYYMMDD, today or yesterday")
    ut.add_argument("--limit", type=int, default=20)
    ut.add_argument("--json", action="store_true")
    ut.set_defaults(func=run_async(usage_top))
    ud = usage_sub.add_parser("days", help="usage per UTC day (one key, or all keys summed)")
    ud.add_argument("--key")
    ud.add_argument("--days", type=int, default=30)
    ud.add_argument("--json", action="store_true")
    ud.set_defaults(func=run_async(usage_days))

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
