"""A real `python -m gateway serve` on a free port, for tests that need a live process (fuzz, logs, kill -9)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import REALTIME_MODEL, REDIS_URL, free_port, wait_http


def gateway_env(tmp_path: Path, redis_prefix: str, keys_file: Path, runtime_url: str,
                **extra: str) -> dict[str, str]:
    """The environment of a test gateway: external runtime, own Redis prefix, files under tmp_path."""
    return {**os.environ, "LISTEN_HOST": "127.0.0.1", "REDIS_URL": REDIS_URL, "REDIS_PREFIX": redis_prefix,
            "AUTH_KEYS_FILE": str(keys_file), "RUNTIME_BACKEND": "external", "RUNTIME_URL": runtime_url,
            "REALTIME_MODEL": REALTIME_MODEL, "LOG_FORMAT": "json", "LOG_LEVEL": "warning",
            "UPLOAD_DIR": str(tmp_path / "uploads"), "RUNTIME_FAILURE_DIR": str(tmp_path / "runtime_failures"),
            "EUROEVAL_DEBUG_LOG": str(tmp_path / "euroeval_debug.log"), "SHUTDOWN_TIMEOUT": "5", **extra}


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


def stop_gateway(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM (then SIGKILL after 20 s) and return the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


__all__ = ["REALTIME_MODEL", "gateway_env", "start_gateway", "stop_gateway"]
