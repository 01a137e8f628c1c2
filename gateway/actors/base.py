"""The Actor base class every long-lived component of the gateway builds on."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Final

import structlog

from gateway import metrics

STOP: Final = object()
"""Sentinel put in an inbox to end the run loop after the messages before it."""


class Actor:
    """An `asyncio.Queue` inbox drained by one supervised run loop.

    Subclasses implement `handle(message)` (or override `run()` for a custom loop) and expose small
    async methods that put messages in the inbox. A crashed loop is logged and restarted with
    exponential backoff; `stop()` drains up to a sentinel, then cancels after a timeout.
    """

    name: str = "actor"
    restart_backoff_initial: float = 0.1
    restart_backoff_max: float = 30.0

    def __init__(self, inbox_size: int = 0) -> None:
        self.inbox: asyncio.Queue[Any] = asyncio.Queue(inbox_size)
        self.log = structlog.get_logger(component=self.name)
        self._task: asyncio.Task[None] | None = None
        self.stopping = False

    # --- lifecycle
    async def start(self) -> None:
        """Start the supervised run loop (idempotent)."""
        if self._task is None:
            self.stopping = False
            self._task = asyncio.create_task(self._supervise(), name=f"actor:{self.name}")

    async def stop(self, timeout: float = 10.0) -> None:
        """Ask the loop to finish what is queued, then cancel it if it takes longer than `timeout`."""
        if self._task is None:
            return
        self.stopping = True
        with contextlib.suppress(asyncio.QueueFull):
            self.inbox.put_nowait(STOP)
        task, self._task = self._task, None
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            self.log.warning("actor_stop_timeout", timeout=timeout)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.on_stop()

    @property
    def running(self) -> bool:
        """True while the run loop is alive."""
        return self._task is not None and not self._task.done()

    def tell(self, message: Any) -> None:
        """Put a message in the inbox without waiting (the inbox is unbounded unless sized)."""
        self.inbox.put_nowait(message)

    # --- for subclasses
    async def run(self) -> None:
        """Default loop: hand each message to `handle` until the STOP sentinel."""
        while True:
            message = await self.inbox.get()
            if message is STOP:
                return
            structlog.contextvars.bind_contextvars(actor=self.name)
            try:
                await self.handle(message)
            finally:
                structlog.contextvars.unbind_contextvars("actor")

    async def handle(self, message: Any) -> None:
        """Process one message."""
        raise NotImplementedError

    async def on_stop(self) -> None:
        """Called once after the loop has ended (or been cancelled) on stop."""

    async def receive(self, timeout: float | None) -> Any:
        """Next inbox message, or None when `timeout` seconds pass without one."""
        try:
            return await asyncio.wait_for(self.inbox.get(), timeout)
        except TimeoutError:
            return None

    # --- supervision
    async def _supervise(self) -> None:
        backoff = self.restart_backoff_initial
        while True:
            try:
                await self.run()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                if self.stopping:
                    self.log.exception("actor_crashed_while_stopping")
                    return
                metrics.ACTOR_RESTARTS.labels(self.name).inc()
                self.log.exception("actor_crashed", restart_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.restart_backoff_max)
