"""What the `llm-gateway` operator commands share: the error type, output helpers, a Redis client."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
from redis.asyncio import Redis

from gateway.redis_client import REDIS_OR_OS_ERRORS, classify, open_client
from gateway.settings import Settings

AsyncCommand = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]
RunAsync = Callable[[AsyncCommand], Callable[[argparse.Namespace], int]]


class CliError(Exception):
    """A failure the user can act on: printed as one line, exit code 1."""


# ---------------------------------------------------------------- output helpers
def table(rows: list[list[str]], headers: list[str], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(), file=out)
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


def print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n")


def when(ts: str | float | None) -> str:
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



@contextlib.asynccontextmanager
async def redis_client(settings: Settings) -> AsyncIterator[Redis]:
    """A Redis client for one command; a Redis failure becomes a CliError naming REDIS_URL."""
    client = await open_client(settings, socket_timeout=10, socket_connect_timeout=5)
    try:
        yield client
    except REDIS_OR_OS_ERRORS as exc:
        kind = "Redis Cluster" if settings.redis_cluster else "Redis"
        raise CliError(f"{kind} at {settings.redis_url} failed: {classify(exc).message} ({exc})") from None
    finally:
        await client.aclose()
