"""The interface every runtime backend (docker, process, external) offers the RuntimeSupervisor.

A backend runs at most one runtime instance at a time. It knows how to start one for a model, how to
stop it, how to fetch its last log lines, and how to wait for it to exit on its own. Policy (when to
start, restart, back off, write crash logs) lives in the supervisor, not here.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Literal

import aiohttp

ExitReason = Literal["exit", "oom", "unhealthy"]


class BackendError(Exception):
    """A backend could not do what was asked (image missing, port taken, runtime unreachable...)."""


@dataclass(frozen=True, slots=True)
class ExitInfo:
    """Why a runtime instance stopped running without being asked to."""

    reason: ExitReason
    code: int | None = None
    detail: str = ""

    def describe(self) -> str:
        """One human-readable line, e.g. "exited with code 1" or "killed by the OOM killer"."""
        if self.reason == "oom":
            text = "killed by the out-of-memory killer"
        elif self.reason == "unhealthy":
            text = "became unhealthy"
        elif self.code is not None and self.code < 0:
            text = f"killed by signal {-self.code}"
        else:
            text = f"exited with code {self.code}"
        return f"{text}: {self.detail}" if self.detail else text


class RuntimeBackend(abc.ABC):
    """Starts, stops and watches one runtime instance."""

    kind: str = "backend"
    can_swap: bool = True
    """False when the backend cannot change the served model (external runtimes)."""

    @abc.abstractmethod
    async def adopt(self, model: str) -> str | None:
        """Take over a runtime left by a previous gateway if it serves `model` with the current
        configuration, returning its base URL; otherwise remove any leftover and return None."""

    @abc.abstractmethod
    async def start(self, model: str) -> str:
        """Start a runtime serving `model` (replacing any instance) and return its base URL at once,
        without waiting for readiness. Raises BackendError when it cannot even be started."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop and clean up the current instance (idempotent; a no-op when none is running)."""

    @abc.abstractmethod
    async def logs(self, tail: int = 200) -> str:
        """The instance's last `tail` lines of output (empty when unavailable)."""

    @abc.abstractmethod
    async def wait_exit(self) -> ExitInfo:
        """Return when the current instance stops serving without having been asked to stop."""

    async def remove_leftover(self) -> None:  # noqa: B027 (an optional hook: external runtimes leave nothing)
        """Stop a runtime left by a previous gateway (killed -9) without starting one."""

    async def close(self) -> None:  # noqa: B027 (an optional hook: most backends hold nothing to release)
        """Release client resources (not the runtime: call stop() for that)."""


async def probe(session: aiohttp.ClientSession, url: str, timeout: float = 2.0) -> bool:
    """True when GET `url` answers 2xx within `timeout` seconds."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            await resp.read()
            return 200 <= resp.status < 300
    except (aiohttp.ClientError, TimeoutError):
        return False
