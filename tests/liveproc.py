"""A real `python -m gateway serve` on a free port, for tests that need a live process (fuzz, logs, kill -9)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import REALTIME_MODEL, REDIS_URL, free_port, wait_http


def gateway_env(tmp_path: Path, redis_prefix: str, keys_file: Path, runtime_url: str,
                **extra: str) -> dict[str, str]:
    """The environment of a test gateway: external runtime, own Redis prefix, files under tmp_path."""
    return {**os.environ, "LISTEN_HOST": "127.0.0.1", "REDIS_URL": REDIS_URL, "REDIS_PREFIX": redis_prefix,
            "AUTH_KEYS_FILE": str(keys_file), "RUNTIME_BACKEND": "external", "RUNTIME_URL": runtime_url,
            "REALTIME_MODEL": REALTIME_MODEL, "LOG_FORMAT": "json", "LOG_LEVEL": "warning",
            "UPLOAD_DIR": str(tmp_path / "uploads"), "RUNTIME_FAILURE_DIR": str(tmp_path / "runtime_failures"),
            "EUROEVAL_DEBUG_LOG": str(tmp_path / "euroeval_debug.log"), "SHUTDOWN_TIMEOUT": "5",
            "BATCH_MODELS": "*", **extra}


def start_gateway(tmp_path: Path, name: str, env: dict[str, str],
                  port: int | None = None) -> tuple[subprocess.Popen[bytes], str, Path]:
    """Start a gateway whose stdout+stderr go to tmp_path/<name>.log; wait for /ready."""
    port = port or free_port()
    log_path = tmp_path / f"{name}.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], cwd=tmp_path,
                                env={**env, "LISTEN_PORT": str(port)}, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/ready", timeout=60, proc=proc)
    except Exception:
        stop_gateway(proc)
        raise RuntimeError(f"gateway {name} did not start:\n{log_path.read_text()[-3000:]}") from None
    return proc, base, log_path


def stop_gateway(proc: subprocess.Popen[bytes], timeout: float = 20) -> int:
    """SIGTERM (then SIGKILL after `timeout` seconds) and return the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


__all__ = ["REALTIME_MODEL", "gateway_env", "start_gateway", "stop_gateway"]


def http_status(url: str, token: str, body: dict[str, Any] | None = None) -> int:
    """The status of a GET (or, with a body, a JSON POST) to a live gateway, as `token`."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Authorization": f"Bearer {token}",
                                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
