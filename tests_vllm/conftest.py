"""Fixtures for the real-vLLM tier: one gateway on a real vLLM CPU server for the whole session.

`make test-vllm` builds what this needs first (scripts/build-vllm-env.sh, scripts/make_tiny_models.py):
the vLLM venv (VLLM_VENV) and two tiny random-weight models under TINY_MODELS_DIR. The gateway is the
in-process app from create_app() on an aiohttp test server, with the `process` runtime backend and
RUNTIME_TYPE=vllm, so every code path is the production one. vLLM takes ~30 s to start and ~3 GB, so
the gateway (and with it the runtime) is started once; each test begins by waiting until the realtime
model is served again, which makes the tests independent of the order they run in. Only one vLLM
server runs at a time (a model swap stops one before starting the other).

Redis keys live under a prefix of their own, deleted at the end; usage assertions compare counters
before and after, since the session shares them.
"""

from __future__ import annotations

import json
import os
import shlex
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import redis as redis_sync
from aiohttp.test_utils import TestClient, TestServer
from openai import AsyncOpenAI

from gateway.actors.supervisor import RuntimeSupervisor
from gateway.bootstrap import create_app
from gateway.http.appkeys import ACCOUNTANT, REDIS, REDIS_KEYS, SUPERVISOR
from gateway.logging import configure_logging
from gateway.settings import Settings
from tests.polling import eventually

CACHE_DIR = Path(os.environ.get("LLM_GATEWAY_CACHE_DIR", "/var/cache/llm-gateway"))
VLLM_VENV = Path(os.environ.get("VLLM_VENV", str(CACHE_DIR / "vllm-venv")))
MODELS_DIR = Path(os.environ.get("TINY_MODELS_DIR", str(CACHE_DIR / "models")))
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# vLLM serves a model under the path given to --model; the gateway passes REALTIME_MODEL (or the batch
# job's model) as that path, so the directory paths are the model names clients use. --served-model-name
# in RUNTIME_ARGS would rename every model the runtime loads, batch models included, so it is not used.
REALTIME_MODEL = str(MODELS_DIR / "tiny-llama-a")
OTHER_MODEL = str(MODELS_DIR / "tiny-llama-b")
MAX_MODEL_LEN = 1024
# Auto tool choice with the hermes parser: vLLM 0.32 refuses a named tool_choice without a --tool-call-parser.
RUNTIME_ARGS = (f"--max-model-len {MAX_MODEL_LEN} --dtype float32 --enforce-eager "
                "--enable-auto-tool-choice --tool-call-parser hermes")
# VLLM_SERVER_DEV_MODE=1 exposes /sleep, /wake_up and /is_sleeping (--enable-sleep-mode refuses to start
# on the CPU); the rest keeps vLLM offline and small.
RUNTIME_ENV = ("VLLM_CPU_KVCACHE_SPACE=1 VLLM_SERVER_DEV_MODE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "
               "VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_LOGGING_LEVEL=INFO")
START_TIMEOUT = 600.0  # a cold first start on a loaded 2-core machine; usually ~30 s
READY_TIMEOUT = 300.0

KEYS: dict[str, tuple[str, str, list[str]]] = {
    "realtime": ("v-realtime", "tok-vllm-realtime-0001", ["realtime"]),
    "batch": ("v-batch", "tok-vllm-batch-0001-testkey", ["batch"]),
    "monitor": ("v-monitor", "tok-vllm-monitor-0001", ["monitor"]),
    "all": ("v-all", "tok-vllm-all-0001-testkey", ["realtime", "batch", "monitor"]),
}
TOKENS = {role: token for role, (_, token, _) in KEYS.items()}
KEY_IDS = {role: key_id for role, (key_id, _, _) in KEYS.items()}

configure_logging(os.environ.get("TEST_LOG_LEVEL", "warning"), "console")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run every test in the session's event loop (the gateway fixture lives there) with a long timeout."""
    loop_marker = pytest.mark.asyncio(loop_scope="session")
    for item in items:
        if pytest_asyncio.is_async_test(item):
            item.add_marker(loop_marker, append=False)
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(900))


def auth(role: str) -> dict[str, str]:
    """Authorization header for one of the test keys."""
    return {"Authorization": f"Bearer {TOKENS[role]}"}


def vllm_command() -> str:
    """RUNTIME_COMMAND for the vLLM venv (`vllm serve` would look up the metadata of a package named
    "vllm"; the CPU build is named vllm-cpu, so the server module is run directly)."""
    return f"{shlex.quote(str(VLLM_VENV / 'bin' / 'python'))} -m vllm.entrypoints.openai.api_server"


def check_prerequisites() -> None:
    """Fail (never skip) with what to run when the vLLM venv or the models are missing."""
    missing = [str(p) for p in (VLLM_VENV / "bin" / "python", Path(REALTIME_MODEL) / "config.json",
                                Path(OTHER_MODEL) / "config.json", MODELS_DIR / "tiny-llama-embed" / "config.json")
               if not p.exists()]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run `make test-vllm` (it builds the vLLM venv and the "
                    "tiny models before running these tests)", pytrace=False)


@dataclass
class Gateway:
    """The session's gateway: test client, app and settings, plus a few helpers the tests share."""

    client: TestClient
    settings: Settings
    tmp: Path

    @property
    def app(self) -> Any:
        """The aiohttp application."""
        return self.client.app

    @property
    def supervisor(self) -> RuntimeSupervisor:
        """The runtime supervisor."""
        return self.app[SUPERVISOR]

    @property
    def runtime_url(self) -> str:
        """Base URL of the vLLM server now serving (asserts that one is ready)."""
        snap = self.supervisor.snapshot
        assert snap.ready and snap.base_url, snap
        return snap.base_url

    def sdk(self, role: str = "realtime") -> AsyncOpenAI:
        """The official openai SDK pointed at the gateway (no retries: tests see every status)."""
        return AsyncOpenAI(base_url=str(self.client.make_url("/v1")), api_key=TOKENS[role], max_retries=0)

    async def post(self, path: str, body: Any, role: str = "realtime") -> aiohttp.ClientResponse:
        """POST JSON to the gateway as `role`."""
        return await self.client.post(path, json=body, headers=auth(role))

    async def usage(self, role: str) -> dict[str, int]:
        """The all-time usage hash of a test key, once the accountant has flushed."""
        await eventually(lambda: self.app[ACCOUNTANT].buffered == 0, timeout=10)
        raw = await self.app[REDIS].hgetall(self.app[REDIS_KEYS].key_usage(KEY_IDS[role]))
        return {k.decode(): int(float(v)) for k, v in raw.items() if k != b"last_used_at"}

    async def job_events(self) -> list[dict[str, str]]:
        """The whole job event stream."""
        raw = await self.app[REDIS].xrange(self.app[REDIS_KEYS].job_events)
        return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in raw]

    async def submit(self, body: dict[str, Any], path: str = "/v1/batch/completions") -> dict[str, Any]:
        """Queue a batch job and return its view."""
        resp = await self.post(path, body, role="batch")
        assert resp.status == 202, await resp.text()
        return await resp.json()

    async def job(self, job_id: str) -> dict[str, Any]:
        """A job's view."""
        resp = await self.client.get(f"/v1/jobs/{job_id}", headers=auth("batch"))
        assert resp.status == 200, await resp.text()
        return await resp.json()

    async def wait_job(self, job_id: str, statuses: set[str], timeout: float = 120.0) -> dict[str, Any]:
        """Poll a job until its status is one of `statuses`."""
        async def check() -> dict[str, Any] | None:
            resp = await self.client.get(f"/v1/jobs/{job_id}", headers=auth("batch"))
            if resp.status == 503:  # Redis slow to answer on a starved machine: retry, as a client would
                assert resp.headers["Retry-After"], await resp.text()
                return None
            assert resp.status == 200, await resp.text()
            job = await resp.json()
            return job if job["status"] in statuses else None

        return await eventually(check, timeout=timeout, interval=0.2)

    async def wait_realtime_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait until the runtime is READY with the realtime model, no batch group holds it, and it answers
        its health path (right after a runtime is killed the supervisor may not have noticed yet)."""
        from gateway.http.appkeys import DISPATCHER

        dispatcher = self.app.get(DISPATCHER)

        async def ready() -> bool:
            snap = self.supervisor.snapshot
            if not (snap.ready and snap.model == REALTIME_MODEL and snap.base_url
                    and (dispatcher is None or dispatcher.group is None)):
                return False
            try:
                async with aiohttp.ClientSession() as session, session.get(
                        snap.base_url + "/health", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    return resp.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return False

        await eventually(ready, timeout=timeout, interval=0.2)


@pytest.fixture(scope="session")
def session_prefix() -> Iterator[str]:
    """A Redis key prefix for the session; every key under it is deleted at the end."""
    prefix = f"test-vllm:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis_sync.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory for the session's keys file, pid file and crash logs."""
    return tmp_path_factory.mktemp("vllm")


def gateway_settings(tmp: Path, prefix: str, **overrides: Any) -> Settings:
    """Settings of a gateway on a real vLLM with the process backend (swaps tuned to be quick)."""
    keys = tmp / "auth.keys.json"
    keys.write_text(json.dumps({"keys": [{"id": i, "token": t, "scopes": s} for i, t, s in KEYS.values()]}))
    values: dict[str, Any] = {
        "redis_url": REDIS_URL,
        "redis_prefix": prefix,
        "auth_keys_file": str(keys),
        "realtime_model": REALTIME_MODEL,
        "runtime_backend": "process",
        "runtime_type": "vllm",
        "runtime_command": vllm_command(),
        "runtime_args": RUNTIME_ARGS,
        "runtime_env": RUNTIME_ENV,
        "runtime_pid_file": str(tmp / "runtime.pid"),
        "runtime_failure_dir": str(tmp / "runtime_failures"),
        "runtime_start_timeout": START_TIMEOUT,
        "runtime_expected_start_seconds": 30,
        "runtime_restart_backoff_max": 5,
        "usage_flush_interval": 0.05,
        "max_concurrent_batch": 2,
        "batch_retry_backoff_seconds": 1.0,  # the default
        "batch_request_timeout": 120,
        "swap_realtime_idle_seconds": 1.0,
        "realtime_min_residency_seconds": 0,
        "swap_grace_seconds": 0,
        "batch_max_residency_seconds": 600,
        "upload_dir": str(tmp / "uploads"),
        "euroeval_debug_log": str(tmp / "euroeval_debug.log"),
        "batch_models": OTHER_MODEL,  # the swap tests' second model (a local path, so named exactly)
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def session_gateway(session_tmp: Path, session_prefix: str) -> AsyncIterator[Gateway]:
    """The gateway and its real vLLM runtime, started once for the session."""
    check_prerequisites()
    settings = gateway_settings(session_tmp, session_prefix)
    client = TestClient(TestServer(create_app(settings), host="127.0.0.1"))
    await client.start_server()
    gateway = Gateway(client, settings, session_tmp)
    try:
        started = time.monotonic()
        await gateway.supervisor.wait_ready(START_TIMEOUT)
        print(f"\n[test-vllm] vLLM ready with {REALTIME_MODEL} after {time.monotonic() - started:.1f} s")
        yield gateway
    finally:
        await client.close()


@pytest_asyncio.fixture(loop_scope="session")
async def gw(session_gateway: Gateway) -> Gateway:
    """The session's gateway, once it serves the realtime model again (after a swap or a crash)."""
    await session_gateway.wait_realtime_ready()
    return session_gateway
