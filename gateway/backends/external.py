"""External backend: a runtime the operator runs at RUNTIME_URL; the gateway only health-checks it."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import structlog

from gateway.backends.base import BackendError, ExitInfo, RuntimeBackend, probe
from gateway.flavours import Flavour, flavour_for
from gateway.settings import Settings


class ExternalBackend(RuntimeBackend):
    """Start means "probe"; stop does nothing; an instance "exits" when its health probe keeps failing."""

    kind = "external"
    can_swap = False
    probe_interval = 2.0
    failures_before_unhealthy = 2

    def __init__(self, settings: Settings, flavour: Flavour | None = None) -> None:
        self.settings = settings
        self.flavour = flavour or flavour_for(settings.runtime_type)
        self.base_url = settings.runtime_url.rstrip("/")
        self.log = structlog.get_logger(component="runtime.external")
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def adopt(self, model: str) -> str | None:
        """Nothing to adopt: the runtime is not ours."""
        return None

    async def start(self, model: str) -> str:
        """Check that the runtime answers and serves `model`; it is never launched by us."""
        session = self._client()
        if not await probe(session, self.base_url + self.flavour.health_path):
            raise BackendError(f"external runtime at {self.base_url} does not answer "
                               f"{self.flavour.health_path}")
        served = await self.served_models()
        if served is not None and model not in served:
            raise BackendError(f"external runtime at {self.base_url} serves {', '.join(served) or 'nothing'}, "
                               f"not {model}; RUNTIME_BACKEND=external cannot switch models")
        return self.base_url

    async def served_models(self) -> list[str] | None:
        """Model ids (and roots) listed by /v1/models, or None when it cannot be read."""
        try:
            async with self._client().get(self.base_url + self.flavour.models_path,
                                          timeout=aiohttp.ClientTimeout(total=5)) as resp:
                if resp.status != 200:
                    return None
                body = orjson.loads(await resp.read())
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
            return None
        names: list[str] = []
        for entry in body.get("data") or []:
            for key in ("id", "root"):
                if isinstance(entry.get(key), str) and entry[key] not in names:
                    names.append(entry[key])
        return names

    async def stop(self) -> None:
        """The runtime is not ours to stop."""

    async def logs(self, tail: int = 200) -> str:
        """No access to an external runtime's output."""
        return f"(no logs: the runtime at {self.base_url} is external)"

    async def wait_exit(self) -> ExitInfo:
        """Probe the health endpoint every `probe_interval` seconds until it fails repeatedly."""
        session = self._client()
        failures = 0
        while True:
            await asyncio.sleep(self.probe_interval)
            if await probe(session, self.base_url + self.flavour.health_path):
                failures = 0
                continue
            failures += 1
            if failures >= self.failures_before_unhealthy:
                return ExitInfo("unhealthy", None, f"{self.base_url}{self.flavour.health_path} stopped answering")

    async def close(self) -> None:
        """Close the probe session."""
        if self._session is not None:
            await self._session.close()
            self._session = None
