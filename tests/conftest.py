"""Shared fixtures: isolated Redis prefix, test keys, settings, a simulator runtime, a gateway client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
from openai import AsyncOpenAI

from gateway.actors.supervisor import RuntimeSupervisor
from gateway.logging import configure_logging
from gateway.settings import Settings
from tests.polling import eventually  # noqa: F401 (tests import it from here)
from tests.runtimes import SIMULATOR_IMAGE, image_exists

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REALTIME_MODEL = "test-org/realtime-model"
ROOT = Path(__file__).resolve().parent.parent

# scope name (or role) -> (key id, token, scopes)
KEYS: dict[str, tuple[str, str, list[str]]] = {
    "realtime": ("k-realtime", "tok-realtime-0001", ["realtime"]),
    "batch": ("k-batch", "tok-batch-0001", ["batch"]),
    "batch2": ("k-batch2", "tok-batch-0002", ["batch"]),
    "eval": ("k-eval", "tok-eval-0001", ["eval"]),
    "upload": ("k-upload", "tok-upload-0001", ["upload"]),
    "upload2": ("k-upload2", "tok-upload-0002", ["upload"]),
    "monitor": ("k-monitor", "tok-monitor-0001", ["monitor"]),
    "all": ("k-all", "tok-all-scopes-0001", ["realtime", "batch", "eval", "upload", "monitor"]),
}
TOKENS: dict[str, str] = {name: token for name, (_, token, _) in KEYS.items()}
KEY_IDS: dict[str, str] = {name: key_id for name, (key_id, _, _) in KEYS.items()}

configure_logging("warning", "console")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Secrets are never logged, checked through the whole test run: a test whose captured logs or
    stderr (where the gateway logs) hold one of the test tokens fails, whatever it asserted itself."""
    outcome = yield
    report = outcome.get_result()
    for section, content in report.sections:
        if ("stderr" not in section and "log" not in section) or not section.endswith(report.when):
            continue  # sections accumulate over setup/call/teardown: judge each phase once
        leaked = [name for name, token in TOKENS.items() if token in content]
        if leaked and report.outcome != "failed":
            report.outcome = "failed"
            report.longrepr = f"the token of test key(s) {leaked} appears in '{section}'"


def auth(role: str) -> dict[str, str]:
    """Authorization header for one of the test keys."""
    return {"Authorization": f"Bearer {TOKENS[role]}"}


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_keys_file(path: Path) -> Path:
    """Write the test keys file and return its path."""
    path.write_text(json.dumps({"keys": [{"id": i, "token": t, "scopes": s} for i, t, s in KEYS.values()]}))
    return path


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until `url` answers 200 (or raise, with the process output if it died)."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def start_simulator(model: str = REALTIME_MODEL, *args: str,
                    port: int | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start `python -m gateway.simulator` on a free port and wait for /health."""
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway.simulator", "--model", model, "--host", "127.0.0.1",
                             "--port", str(port), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", proc=proc)
    return proc, url


@pytest.fixture(scope="session")
def sim_url() -> Iterator[str]:
    """A simulator at zero latency shared by the whole session (external runtime for most tests)."""
    proc, url = start_simulator(REALTIME_MODEL, "--served-model-name", REALTIME_MODEL)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A unique key prefix; every key under it is deleted after the test."""
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis_sync.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    """The test keys file."""
    return write_keys_file(tmp_path / "auth.keys.json")


@pytest.fixture
def make_settings(tmp_path: Path, redis_prefix: str, keys_file: Path, sim_url: str) -> Callable[..., Settings]:
    """Settings for a test: external runtime at the shared simulator unless overridden."""

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": REDIS_URL,
            "redis_prefix": redis_prefix,
            "auth_keys_file": str(keys_file),
            "realtime_model": REALTIME_MODEL,
            "runtime_backend": "external",
            "runtime_url": sim_url,
            "runtime_failure_dir": str(tmp_path / "runtime_failures"),
            "usage_flush_interval": 0.05,
            "euroeval_debug_log": str(tmp_path / "euroeval_debug.log"),
            "upload_dir": str(tmp_path / "uploads"),
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return build


async def wait_ready(app: Any, timeout: float = 30.0) -> None:
    """Wait until the app's runtime is ready with the realtime model."""
    from gateway.http.appkeys import SUPERVISOR

    await app[SUPERVISOR].wait_ready(timeout)


@pytest.fixture
async def gateway(aiohttp_client: Any, make_settings: Callable[..., Settings]) -> AsyncIterator[Any]:
    """A test client of a full gateway (external runtime = the shared simulator), runtime ready."""
    from gateway.bootstrap import create_app

    client = await aiohttp_client(create_app(make_settings()))
    await wait_ready(client.app)
    yield client


# --- runtime supervisors (process and Docker backends)


@pytest.fixture
async def supervisors() -> AsyncIterator[Callable[..., RuntimeSupervisor]]:
    """Build supervisors that are stopped after the test, whatever happened."""
    made: list[RuntimeSupervisor] = []

    def build(settings: Settings, **kwargs: Any) -> RuntimeSupervisor:
        sup = RuntimeSupervisor(settings, **kwargs)
        made.append(sup)
        return sup

    yield build
    for sup in made:
        await sup.stop()


@pytest.fixture
def proc_settings(make_settings: Callable[..., Settings], tmp_path: Path) -> Callable[..., Settings]:
    """Settings for the process backend running the simulator, with a private pid file."""

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"runtime_backend": "process", "runtime_pid_file": str(tmp_path / "runtime.pid"),
                                  "runtime_start_timeout": 30, "runtime_stop_timeout": 5}
        values.update(overrides)
        return make_settings(**values)

    return build


@pytest.fixture(scope="session")
def simulator_image() -> str:
    """The simulator image, built by scripts/build-test-images.sh when missing."""
    if not image_exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "build-test-images.sh")], check=True, timeout=1800)
    assert image_exists(), f"{SIMULATOR_IMAGE} is missing and scripts/build-test-images.sh did not build it"
    return SIMULATOR_IMAGE


@pytest.fixture
def container_name() -> Iterator[str]:
    """A unique container name; the container is force-removed after the test whatever happened."""
    name = f"llmgw-test-{uuid.uuid4().hex[:10]}"
    yield name
    subprocess.run(["docker", "rm", "-f", name], capture_output=True)


@pytest.fixture
def docker_settings(make_settings: Callable[..., Settings], simulator_image: str,
                    container_name: str) -> Callable[..., Settings]:
    """Settings for the docker backend running the simulator image."""

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"runtime_backend": "docker", "runtime_image": simulator_image,
                                  "runtime_container_name": container_name, "runtime_start_timeout": 60,
                                  "runtime_stop_timeout": 3}
        values.update(overrides)
        return make_settings(**values)

    return build


# --- the official openai SDK against a test gateway

_SDK_CLIENTS: list[AsyncOpenAI] = []


@pytest.fixture(autouse=True)
async def _close_sdk_clients() -> AsyncIterator[None]:
    yield
    while _SDK_CLIENTS:
        await _SDK_CLIENTS.pop().close()


def sdk_at(base_url: str, role: str = "batch") -> AsyncOpenAI:
    """The official SDK at `base_url` (…/v1) with a test key; closed after the test."""
    api = AsyncOpenAI(base_url=base_url, api_key=TOKENS[role], max_retries=0)
    _SDK_CLIENTS.append(api)
    return api


def sdk(client: Any, role: str = "batch") -> AsyncOpenAI:
    """The official SDK pointed at the test gateway (closed after the test)."""
    return sdk_at(str(client.make_url("/v1")), role)
