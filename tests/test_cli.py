"""The `llm-gateway` CLI as a subprocess against real Redis and a real gateway."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.actors.usage import UsageAccountant, UsageEvent
from gateway.batch.jobs import Endpoint, parse_submission
from gateway.batch.queue import JobQueue
from gateway.bootstrap import create_app
from gateway.commands.common import Progress
from gateway.keys import hash_token
from gateway.redis_keys import RedisKeys
from gateway.usage_store import UsageStore
from tests.conftest import (
    KEY_IDS,
    REALTIME_MODEL,
    TOKENS,
    RedisBackend,
    auth,
    free_port,
    wait_http,
    wait_ready,
    write_keys_file,
)
from tests.liveproc import http_status, stop_gateway

pytestmark = pytest.mark.slow  # the CLI against live gateway processes


def cli(*args: str, env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def cli_env(tmp_path: Path, redis_prefix: str, test_redis: RedisBackend) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_GATEWAY_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env.update({"REDIS_URL": test_redis.url, "REDIS_CLUSTER": str(test_redis.cluster).lower(),
                "REDIS_PREFIX": redis_prefix, "LOG_FORMAT": "json",
                "AUTH_KEYS_FILE": str(write_keys_file(tmp_path / "keys.json"))})
    return env


@pytest.fixture
def running_gateway(tmp_path: Path, cli_env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`llm-gateway serve` with the process backend (the simulator), so the runtime can restart and swap."""
    port = free_port()
    env = {**cli_env, "LISTEN_HOST": "127.0.0.1", "LISTEN_PORT": str(port), "RUNTIME_BACKEND": "process",
           "REALTIME_MODEL": REALTIME_MODEL, "RUNTIME_PID_FILE": str(tmp_path / "runtime.pid"), "BATCH_MODELS": "*",
           "RUNTIME_FAILURE_DIR": str(tmp_path / "failures"), "BATCH_DISPATCHER_ENABLED": "false",
           "UPLOAD_DIR": str(tmp_path / "uploads"), "RUNTIME_EXPECTED_START_SECONDS": "2"}
    log = (tmp_path / "gateway.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    log.close()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/ready", timeout=60, proc=proc)
        yield proc, base
    finally:
        stop_gateway(proc, timeout=30)


def test_keys_create_list_revoke_with_reload(tmp_path: Path, cli_env: dict[str, str],
                                             running_gateway: tuple[subprocess.Popen[bytes], str]) -> None:
    proc, base = running_gateway
    keys_file = Path(cli_env["AUTH_KEYS_FILE"])
    created = cli("keys", "create", "ops-new", "--scopes", "monitor,realtime", "--description", "test key",
                  "--reload-pid", str(proc.pid), env=cli_env, cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("llmgw-") and len(token) > 40 and "\n" not in token
    assert "shown only now" in created.stderr and token not in created.stderr
    stored = json.loads(keys_file.read_text())
    entry = next(k for k in stored["keys"] if k["id"] == "ops-new")
    assert entry["token_sha256"] == hash_token(token) and "token" not in entry
    assert entry["scopes"] == ["monitor", "realtime"]
    assert token not in keys_file.read_text()
    assert oct(keys_file.stat().st_mode & 0o777) == oct(os.stat(keys_file).st_mode & 0o777)
    # The running gateway got SIGHUP and accepts the new token.
    deadline = time.monotonic() + 10
    while http_status(base + "/monitor/runtime", token) != 200:
        assert time.monotonic() < deadline, "the new key was not loaded"
        time.sleep(0.05)

    listed = cli("keys", "list", "--json", env=cli_env, cwd=tmp_path)
    assert listed.returncode == 0
    rows = {r["id"]: r for r in json.loads(listed.stdout)}
    assert rows["ops-new"]["stored"] == "sha256" and rows["k-monitor"]["stored"] == "plain"
    table = cli("keys", "list", env=cli_env, cwd=tmp_path)
    assert "ops-new" in table.stdout and "monitor,realtime" in table.stdout
    assert TOKENS["monitor"] not in table.stdout + listed.stdout and token not in table.stdout

    duplicate = cli("keys", "create", "ops-new", "--scopes", "monitor", env=cli_env, cwd=tmp_path)
    assert duplicate.returncode == 1 and "already exists" in duplicate.stderr
    bad_scope = cli("keys", "create", "x", "--scopes", "monitor,admin", env=cli_env, cwd=tmp_path)
    assert bad_scope.returncode == 1 and "unknown: admin" in bad_scope.stderr
    bad_id = cli("keys", "create", "x::20261202", "--scopes", "batch", env=cli_env, cwd=tmp_path)
    assert bad_id.returncode == 1 and "letters, digits" in bad_id.stderr
    assert json.loads(keys_file.read_text()) == stored, "a refused command must not touch the file"

    revoked = cli("keys", "revoke", "ops-new", "--reload-pid", str(proc.pid), env=cli_env, cwd=tmp_path)
    assert revoked.returncode == 0, revoked.stderr
    deadline = time.monotonic() + 10
    while http_status(base + "/monitor/runtime", token) != 401:
        assert time.monotonic() < deadline, "the revoked key still works"
        time.sleep(0.05)
    assert "ops-new" not in keys_file.read_text()
    missing = cli("keys", "revoke", "ops-new", env=cli_env, cwd=tmp_path)
    assert missing.returncode == 1 and "no key" in missing.stderr
    # Without --reload-pid the CLI says how to reload.
    quiet = cli("keys", "create", "later", "--scopes", "batch", env=cli_env, cwd=tmp_path)
    assert quiet.returncode == 0 and "systemctl reload llm-gateway" in quiet.stderr
    assert not list(tmp_path.glob(".keys.json.*.tmp")), "a temporary file was left behind"


def test_runtime_status_restart_and_swap(tmp_path: Path, cli_env: dict[str, str],
                                         running_gateway: tuple[subprocess.Popen[bytes], str]) -> None:
    _, base = running_gateway
    env = {**cli_env, "LLM_GATEWAY_TOKEN": TOKENS["monitor"]}
    status = cli("runtime", "status", "--url", base, "--json", env=env, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout)
    assert state["state"] == "ready" and state["model"] == REALTIME_MODEL

    swapped = cli("runtime", "swap", "other-org/other-model", "--url", base, env=env, cwd=tmp_path)
    assert swapped.returncode == 0, swapped.stderr
    assert "done: runtime ready (other-org/other-model)" in swapped.stderr
    state = json.loads(cli("runtime", "status", "--url", base, "--json", env=env, cwd=tmp_path).stdout)
    assert state["model"] == "other-org/other-model" and state["state"] == "ready"
    back = cli("runtime", "swap", REALTIME_MODEL, "--url", base, env=env, cwd=tmp_path)
    assert back.returncode == 0, back.stderr
    assert "accepted: runtime swapping" in back.stderr or "accepted: runtime starting" in back.stderr
    same = cli("runtime", "swap", REALTIME_MODEL, "--url", base, "--timeout", "5", env=env, cwd=tmp_path)
    assert same.returncode == 0 and f"done: runtime ready ({REALTIME_MODEL})" in same.stderr

    before = json.loads(cli("runtime", "status", "--url", base, "--json", env=env, cwd=tmp_path).stdout)
    token_file = tmp_path / "monitor.token"
    token_file.write_text(TOKENS["monitor"] + "\n")
    env_without = {k: v for k, v in env.items() if k != "LLM_GATEWAY_TOKEN"}
    restarted = cli("runtime", "restart", "--url", base, "--token-file", str(token_file), env=env_without,
                    cwd=tmp_path)
    assert restarted.returncode == 0, restarted.stderr
    assert "accepted: runtime" in restarted.stderr and "done: runtime ready" in restarted.stderr
    after = json.loads(cli("runtime", "status", "--url", base, "--json", env=env, cwd=tmp_path).stdout)
    assert after["since"] > before["since"] and after["state"] == "ready"

    wrong = cli("runtime", "status", "--url", base, env={**env, "LLM_GATEWAY_TOKEN": TOKENS["realtime"]},
                cwd=tmp_path)
    assert wrong.returncode == 1 and "refused the token" in wrong.stderr and "monitor" in wrong.stderr
    none = cli("runtime", "status", "--url", base, env=env_without, cwd=tmp_path)
    assert none.returncode == 1 and "LLM_GATEWAY_TOKEN" in none.stderr
    down = cli("runtime", "status", "--url", f"http://127.0.0.1:{free_port()}", env=env, cwd=tmp_path)
    assert down.returncode == 1 and "cannot reach the gateway" in down.stderr


async def test_operator_routes_refuse_what_cannot_be_done(aiohttp_client: Any, make_settings: Any) -> None:
    client = await aiohttp_client(create_app(make_settings()))  # external runtime: cannot switch models
    await wait_ready(client.app)
    resp = await client.post("/monitor/runtime/swap", headers=auth("monitor"), json={"model": "another"})
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "runtime_not_swappable"
    resp = await client.post("/monitor/runtime/swap", headers=auth("monitor"), json={"model": ""})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "model"
    resp = await client.post("/monitor/runtime/swap?wait=abc", headers=auth("monitor"), json={"model": REALTIME_MODEL})
    assert resp.status == 400
    resp = await client.post("/monitor/runtime/swap", headers=auth("monitor"), json={"model": REALTIME_MODEL})
    assert resp.status == 200 and (await resp.json())["state"] == "ready"
    resp = await client.post("/monitor/runtime/restart", headers=auth("realtime"))
    assert resp.status == 401


async def _make_jobs(settings: Any, test_redis: RedisBackend) -> tuple[dict[str, str], dict[str, str]]:
    """A queued job and a failed one (claimed and failed through the queue, as the dispatcher does)."""
    redis = test_redis.async_client()
    try:
        queue = JobQueue(redis, RedisKeys(settings.redis_prefix), settings)

        def submission(priority: int) -> Any:
            return parse_submission({"model": "cli-model", "prompt": "hi", "max_tokens": 2, "priority": priority},
                                    Endpoint.COMPLETIONS, max_metadata_items=16)

        failing = await queue.enqueue(KEY_IDS["batch"], submission(3))
        queued = await queue.enqueue(KEY_IDS["batch2"], submission(1))
        held = await queue.claim("cli-model", 1, "test-owner")
        assert [j.id for j in held] == [failing["id"]]
        await queue.finish(held[0], {"status": "failed", "claim": "", "finished_at": repr(time.time()),
                                     "error": "boom", "error_code": "runtime_4xx", "flags": "runtime_4xx"}, "failed")
        return queued, failing
    finally:
        await redis.aclose()


@pytest.mark.usefixtures("redis_backend")  # the CLI honours REDIS_CLUSTER
async def test_jobs_list_show_cancel_requeue(tmp_path: Path, cli_env: dict[str, str], make_settings: Any,
                                            redis_prefix: str, test_redis: RedisBackend) -> None:
    settings = make_settings()
    queued, failing = await _make_jobs(settings, test_redis)
    ready_key = f"{redis_prefix}{{batch}}:ready:cli-model"
    client = test_redis.sync_client(decode_responses=True)
    try:
        listed = cli("jobs", "list", "--json", env=cli_env, cwd=tmp_path)
        assert listed.returncode == 0, listed.stderr
        jobs = json.loads(listed.stdout)
        assert [j["id"] for j in jobs] == [queued["id"], failing["id"]]  # newest first, over both keys
        table = cli("jobs", "list", "--status", "failed", env=cli_env, cwd=tmp_path)
        assert failing["id"] in table.stdout and queued["id"] not in table.stdout and "boom" in table.stdout
        only_key = json.loads(cli("jobs", "list", "--key", KEY_IDS["batch2"], "--json", env=cli_env,
                                  cwd=tmp_path).stdout)
        assert [j["id"] for j in only_key] == [queued["id"]]

        shown = cli("jobs", "show", failing["id"], "--request", env=cli_env, cwd=tmp_path)
        assert shown.returncode == 0
        view = json.loads(shown.stdout)
        assert view["status"] == "failed" and view["error"]["message"] == "boom"
        assert view["key_id"] == KEY_IDS["batch"] and view["request"]["prompt"] == "hi"
        assert cli("jobs", "show", "job_nope", env=cli_env, cwd=tmp_path).returncode == 1

        requeued = cli("jobs", "requeue", failing["id"], env=cli_env, cwd=tmp_path)
        assert requeued.returncode == 0, requeued.stderr
        job = client.hgetall(f"{redis_prefix}{{batch}}:job:{failing['id']}")
        assert job["status"] == "queued" and job["attempt"] == "0" and job["error"] == ""
        assert job["requeue_reason"] == "operator" and client.ttl(f"{redis_prefix}{{batch}}:job:{failing['id']}") == -1
        assert client.zscore(ready_key, failing["id"]) == float(failing["score"]), "back at its original place"
        events = [e for _, e in client.xrange(f"{redis_prefix}{{batch}}:job_events")]
        assert events[-1]["event"] == "requeued" and events[-1]["reason"] == "operator"
        again = cli("jobs", "requeue", failing["id"], env=cli_env, cwd=tmp_path)
        assert again.returncode == 1 and "it is queued" in again.stderr

        cancelled = cli("jobs", "cancel", queued["id"], failing["id"], env=cli_env, cwd=tmp_path)
        assert cancelled.returncode == 0, cancelled.stderr
        assert client.hget(f"{redis_prefix}{{batch}}:job:{queued['id']}", "status") == "cancelled"
        assert client.zcard(ready_key) == 0
        twice = cli("jobs", "cancel", queued["id"], env=cli_env, cwd=tmp_path)
        assert twice.returncode == 1 and "it is cancelled" in twice.stderr
        nothing = cli("jobs", "requeue", "--all-failed", env=cli_env, cwd=tmp_path)
        assert nothing.returncode == 1 and "--all-failed" in nothing.stderr
    finally:
        client.close()


@pytest.mark.usefixtures("redis_backend")
async def test_usage_top_and_days(tmp_path: Path, cli_env: dict[str, str], make_settings: Any,
                                  test_redis: RedisBackend) -> None:
    settings = make_settings()
    redis = test_redis.async_client()
    accountant = UsageAccountant(UsageStore(redis, RedisKeys(settings.redis_prefix)), flush_interval=0.05)
    try:
        for _ in range(3):
            accountant.record(UsageEvent("busy-key", True, 10, 5))
        accountant.record(UsageEvent("quiet-key", False, 1, 0))
        await accountant.flush()
    finally:
        await redis.aclose()
    top = cli("usage", "top", "--json", env=cli_env, cwd=tmp_path)
    assert top.returncode == 0, top.stderr
    rows = json.loads(top.stdout)
    assert [r["key_id"] for r in rows] == ["busy-key", "quiet-key"]
    assert rows[0]["requests"] == 3 and rows[0]["prompt_tokens"] == 30 and rows[1]["errors"] == 1
    today = cli("usage", "top", "--day", "today", "--limit", "1", env=cli_env, cwd=tmp_path)
    assert "busy-key" in today.stdout and "quiet-key" not in today.stdout
    days = json.loads(cli("usage", "days", "--days", "3", "--json", env=cli_env, cwd=tmp_path).stdout)
    assert len(days) == 3 and days[0]["requests"] == 4 and days[1]["requests"] == 0
    one = json.loads(cli("usage", "days", "--key", "quiet-key", "--days", "2", "--json", env=cli_env,
                         cwd=tmp_path).stdout)
    assert one[0]["requests"] == 1 and one[0]["key_id"] == "quiet-key"
    bad = cli("usage", "top", "--day", "2026-11-27", env=cli_env, cwd=tmp_path)
    assert bad.returncode == 2 and "YYYYMMDD" in bad.stderr


def test_progress_redraws_on_a_terminal_and_prints_lines_otherwise() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Terminal()
    progress = Progress(tty)
    progress.update("waiting: runtime starting")
    progress.update("waiting: runtime starting")
    progress.done("done: runtime ready")
    text = tty.getvalue()
    assert text.count("\r") >= 3 and "\n" not in text.rstrip("\n").split("done")[0]
    assert text.rstrip().endswith("s)") and "done: runtime ready" in text

    plain = io.StringIO()
    progress = Progress(plain, every=3600)
    for _ in range(5):
        progress.update("waiting: runtime starting")
    progress.update("waiting: runtime ready")
    progress.done("done")
    lines = plain.getvalue().splitlines()
    assert "\r" not in plain.getvalue()
    assert len(lines) == 3 and lines[0].startswith("waiting: runtime starting (") and lines[2].startswith("done (")
