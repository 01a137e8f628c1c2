"""The real `python -m gateway serve` process: SIGHUP key reload, SIGTERM, logs, cold start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.bootstrap import create_app
from tests.conftest import REALTIME_MODEL, REDIS_URL, auth, free_port, wait_http, wait_ready
from tests.liveproc import http_status

pytestmark = pytest.mark.slow  # gateway processes: signals, reloads, cold starts


def test_sighup_reloads_keys_and_sigterm_stops(tmp_path: Path, sim_url: str, redis_prefix: str) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"id": "old", "token": "old-token-1234-xxxxxxx", "scopes": ["realtime"]}]}))
    port = free_port()
    env = {**os.environ, "LISTEN_HOST": "127.0.0.1", "LISTEN_PORT": str(port), "REDIS_URL": REDIS_URL,
           "REDIS_PREFIX": redis_prefix, "AUTH_KEYS_FILE": str(keys), "RUNTIME_BACKEND": "external",
           "RUNTIME_URL": sim_url, "REALTIME_MODEL": REALTIME_MODEL, "LOG_FORMAT": "json", "LOG_LEVEL": "info"}
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], cwd=tmp_path, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/ready", timeout=30, proc=proc)
        body = {"model": REALTIME_MODEL, "prompt": "x", "max_tokens": 2}
        url = base + "/v1/completions"
        assert http_status(url, "old-token-1234-xxxxxxx", body) == 200
        assert http_status(url, "new-token-5678-xxxxxxx", body) == 401

        new_key = {"id": "new", "token": "new-token-5678-xxxxxxx", "scopes": ["realtime"]}
        keys.write_text(json.dumps({"keys": [new_key]}))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while http_status(url, "new-token-5678-xxxxxxx", body) != 200:
            assert time.monotonic() < deadline, "SIGHUP did not load the new key"
            time.sleep(0.05)
        assert http_status(url, "old-token-1234-xxxxxxx", body) == 401

        keys.write_text("{ this is not json")
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert http_status(url, "new-token-5678-xxxxxxx", body) == 200, "a bad keys file must keep the old keys"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    logs = log_path.read_text()
    assert "keys_reload_failed" in logs and "keys_reloaded" in logs
    for token in ("old-token-1234-xxxxxxx", "new-token-5678-xxxxxxx"):
        assert token not in logs, "a token reached the logs"
    # JSON logs, one object a line, with request ids on request lines.
    records = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert records and all("event" in r for r in records)


async def test_cold_start_answers_503_with_retry_after(aiohttp_client: Any, make_settings: Any) -> None:
    settings = make_settings(runtime_backend="process", runtime_url="",
                             runtime_args="--sim-start-delay 2", runtime_expected_start_seconds=7)
    client = await aiohttp_client(create_app(settings))
    body = {"model": REALTIME_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    resp = await client.post("/v1/chat/completions", headers=auth("realtime"), json=body)
    assert resp.status == 503
    retry_after = int(resp.headers["Retry-After"])
    assert 1 <= retry_after <= 7
    error = (await resp.json())["error"]
    assert error["code"] == "runtime_starting" and "retry in" in error["message"]
    models = await client.get("/v1/models", headers=auth("realtime"))
    assert models.status == 503 and "Retry-After" in models.headers
    await wait_ready(client.app, timeout=30)
    resp = await client.post("/v1/chat/completions", headers=auth("realtime"), json=body)
    assert resp.status == 200
