"""systemd integration against a real notify socket: READY, WATCHDOG, STOPPING, and the SIGTERM drain."""

from __future__ import annotations

import asyncio
import configparser
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync

from gateway import systemd
from tests.conftest import (
    REALTIME_MODEL,
    REDIS_URL,
    ROOT,
    TOKENS,
    free_port,
    start_simulator,
    wait_http,
    write_keys_file,
)

pytestmark = pytest.mark.slow  # gateway processes under a fake systemd notify socket

TOKENS_OUT = 24


class NotifySocket:
    """The systemd side: an AF_UNIX datagram socket that collects what the service sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, value: str = "1", timeout: float = 30.0, *, contains: bool = False) -> dict[str, str]:
        """Receive until a message sets `key=value` (or a value containing `value`); returns that message."""

        def match(message: dict[str, str]) -> bool:
            got = message.get(key)
            return got is not None and (value in got if contains else got == value)

        for message in self.messages:
            if match(message):
                return message
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {key}={value} within {timeout} s; got {self.messages}"
            self.sock.settimeout(remaining)
            try:
                raw = self.sock.recv(65536).decode()
            except TimeoutError:
                continue
            message = dict(line.split("=", 1) for line in raw.split("\n") if "=" in line)
            self.messages.append(message)
            if match(message):
                return message

    def wait_count(self, key: str, n: int, timeout: float = 10.0) -> None:
        """Receive until `n` messages carry `key`."""
        deadline = time.monotonic() + timeout
        while self.count(key) < n:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"fewer than {n} {key} messages within {timeout} s: {self.messages}"
            self.sock.settimeout(remaining)
            try:
                raw = self.sock.recv(65536).decode()
            except TimeoutError:
                continue
            self.messages.append(dict(line.split("=", 1) for line in raw.split("\n") if "=" in line))

    def count(self, key: str) -> int:
        return sum(1 for m in self.messages if key in m)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def start_gateway(tmp_path: Path, sim_url: str, redis_prefix: str, notify: NotifySocket,
                  **extra: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {**os.environ, "LISTEN_HOST": "127.0.0.1", "LISTEN_PORT": str(port), "REDIS_URL": REDIS_URL,
           "REDIS_PREFIX": redis_prefix, "AUTH_KEYS_FILE": str(write_keys_file(tmp_path / "keys.json")),
           "RUNTIME_BACKEND": "external", "RUNTIME_URL": sim_url, "REALTIME_MODEL": REALTIME_MODEL,
           "LOG_FORMAT": "json", "UPLOAD_DIR": str(tmp_path / "uploads"), "NOTIFY_SOCKET": str(notify.path),
           "WATCHDOG_USEC": "400000", "SHUTDOWN_TIMEOUT": "20", **extra}
    env.pop("WATCHDOG_PID", None)
    log = (tmp_path / "gateway.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    log.close()
    return proc, port


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_ready_watchdog_stopping_and_drain_of_a_streaming_request(tmp_path: Path, redis_prefix: str,
                                                                  notify_socket: NotifySocket) -> None:
    # 24 tokens at 0.2 s each: a stream that is still running when SIGTERM arrives and the listener closes.
    sim, sim_url = start_simulator(REALTIME_MODEL, "--sim-itl", "0.2", "--sim-output-tokens", str(TOKENS_OUT))
    proc, port = start_gateway(tmp_path, sim_url, redis_prefix, notify_socket)
    try:
        ready = notify_socket.wait_for("READY")
        assert ready["MAINPID"] == str(proc.pid)
        assert ready["STATUS"].startswith(f"serving on 127.0.0.1:{port}")
        # READY means the port accepts: no retry loop needed for this request.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
        wait_http(f"http://127.0.0.1:{port}/ready", proc=proc)
        notify_socket.wait_for("WATCHDOG")
        notify_socket.wait_for("STATUS", f"serving on 127.0.0.1:{port}; runtime ready ({REALTIME_MODEL})")
        notify_socket.wait_count("WATCHDOG", 3)  # pings keep coming every WATCHDOG_USEC / 2

        lines: list[str] = []
        first_chunk = threading.Event()
        errors: list[BaseException] = []

        def stream() -> None:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                body = json.dumps({"model": REALTIME_MODEL, "stream": True, "max_tokens": TOKENS_OUT,
                                   "messages": [{"role": "user", "content": "count slowly"}]})
                conn.request("POST", "/v1/chat/completions", body=body,
                             headers={"Authorization": f"Bearer {TOKENS['realtime']}",
                                      "Content-Type": "application/json"})
                resp = conn.getresponse()
                assert resp.status == 200
                for raw in resp:
                    line = raw.decode().strip()
                    if line.startswith("data:"):
                        lines.append(line)
                        first_chunk.set()
                conn.close()
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)
                first_chunk.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first_chunk.wait(20)
        assert not errors
        proc.send_signal(signal.SIGTERM)
        stopping = notify_socket.wait_for("STOPPING")
        assert "draining" in stopping.get("STATUS", "")
        # Stop accepting: new connections are refused while the old stream goes on.
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except ConnectionRefusedError:
                break
            assert time.monotonic() < deadline, "the gateway still accepts connections after SIGTERM"
            time.sleep(0.05)
        assert reader.is_alive(), "the stream ended before the listener closed: the test proves nothing"
        reader.join(30)
        assert not errors, errors
        assert lines[-1] == "data: [DONE]"
        contents = [json.loads(line[5:])["choices"][0]["delta"].get("content") for line in lines[:-1]
                    if json.loads(line[5:]).get("choices")]
        assert len([c for c in contents if c]) == TOKENS_OUT, "the in-flight stream was cut short by the drain"
        assert proc.wait(30) == 0
    finally:
        stop(proc)
        sim.terminate()
        sim.wait(10)
    logs = (tmp_path / "gateway.log").read_text()
    assert '"event":"draining"' in logs and '"event":"stopped"' in logs


def test_sigterm_hands_a_running_batch_job_back_to_the_queue(tmp_path: Path, redis_prefix: str,
                                                            notify_socket: NotifySocket) -> None:
    # The runtime takes a minute to answer, so the job is still running when the drain ends.
    sim, sim_url = start_simulator(REALTIME_MODEL, "--sim-ttft", "60")
    proc, port = start_gateway(tmp_path, sim_url, redis_prefix, notify_socket, SHUTDOWN_TIMEOUT="2",
                               BATCH_LEASE_SECONDS="30")
    client = redis_sync.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        notify_socket.wait_for("READY")
        wait_http(f"http://127.0.0.1:{port}/ready", proc=proc)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/batch/completions", headers={"Authorization": f"Bearer {TOKENS['batch']}",
                                                               "Content-Type": "application/json"},
                     body=json.dumps({"model": REALTIME_MODEL, "prompt": "slow", "max_tokens": 4}))
        resp = conn.getresponse()
        assert resp.status == 202
        job_id = json.loads(resp.read())["id"]
        conn.close()
        job_key = f"{redis_prefix}{{batch}}:job:{job_id}"
        deadline = time.monotonic() + 20
        # Claimed (running) first, then sent: the attempt counts from the send.
        while client.hmget(job_key, ["status", "attempt"]) != ["running", "1"]:
            assert time.monotonic() < deadline, "the job was never sent"
            time.sleep(0.05)
        notify_socket.wait_for("STATUS", "; batch 1 running, 0 queued", contains=True)  # systemctl status shows it
        proc.send_signal(signal.SIGTERM)
        notify_socket.wait_for("STOPPING")
        assert proc.wait(30) == 0
        job = client.hgetall(job_key)
        assert job["status"] == "queued" and job["requeue_reason"] == "shutdown"
        assert job["attempt"] == "0", "a drain must not use up one of the job's attempts"
        assert client.zscore(f"{redis_prefix}{{batch}}:ready:{REALTIME_MODEL}", job_id) is not None
        assert client.zcard(f"{redis_prefix}{{batch}}:leases") == 0
        events = [e["event"] for _, e in client.xrange(f"{redis_prefix}{{batch}}:job_events")]
        assert events[-1] == "requeued"
    finally:
        client.close()
        stop(proc)
        sim.terminate()
        sim.wait(10)


def test_notifier_sends_to_abstract_and_path_sockets(tmp_path: Path) -> None:
    name = f"llm-gateway-test-{os.getpid()}-{time.monotonic_ns()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    server.settimeout(5)
    try:
        notifier = systemd.Notifier("@" + name)
        assert notifier.enabled
        assert notifier.status("line one\nline two")
        assert server.recv(1024) == b"STATUS=line one line two"
        assert notifier.stopping("bye")
        assert server.recv(1024) == b"STOPPING=1\nSTATUS=bye"
        notifier.close()
    finally:
        server.close()
    # A socket nobody listens on any more: a failed send is reported, never raised.
    gone = systemd.Notifier(str(tmp_path / "nobody.sock"))
    assert gone.enabled and gone.watchdog() is False
    disabled = systemd.Notifier(None)
    assert not disabled.enabled and disabled.ready() is False


def test_environment_is_read_once_and_removed() -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid()),
           "OTHER": "x"}
    notifier, interval = systemd.from_environment(env)
    assert notifier.enabled and interval == 15.0
    assert env == {"OTHER": "x"}, "children (the runtime process) must not inherit the notify socket"
    notifier.close()
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, pid=4242) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "4242"}, pid=4242) == 1.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "nonsense"}) is None
    assert systemd.watchdog_interval({}) is None


async def test_watchdog_pings_only_while_healthy(tmp_path: Path) -> None:
    receiver = NotifySocket(tmp_path / "wd.sock")
    receiver.sock.setblocking(False)
    healthy = True
    notifier = systemd.Notifier(str(receiver.path))
    task = asyncio.create_task(systemd.run_watchdog(notifier, 0.02, lambda: healthy, lambda: "fine"))

    def drain() -> list[bytes]:
        got = []
        while True:
            try:
                got.append(receiver.sock.recv(1024))
            except BlockingIOError:
                return got

    try:
        await asyncio.sleep(0.3)
        first = drain()
        assert first.count(b"WATCHDOG=1") >= 2 and first.count(b"STATUS=fine") == 1
        healthy = False
        await asyncio.sleep(0.1)
        turning = drain()  # a ping may have been on its way when the health changed
        assert b"STATUS=unhealthy: fine" in turning
        await asyncio.sleep(0.3)
        sick = drain()
        assert b"WATCHDOG=1" not in sick
        healthy = True
        await asyncio.sleep(0.3)
        assert b"WATCHDOG=1" in drain()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        notifier.close()
        receiver.close()


def test_unit_file_is_a_notify_service_with_watchdog_reload_and_hardening() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    text = (ROOT / "config" / "llm-gateway.service").read_text()
    parser.read_string(text)
    service: Any = parser["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert int(service["WatchdogSec"].rstrip("s")) > 0
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["ExecStart"].split()[-1] == "serve"
    assert service["EnvironmentFile"].lstrip("-").startswith("/etc/")
    # Stopping must outlast the drain (SHUTDOWN_TIMEOUT, 30 s by default) plus the runtime's stop.
    assert int(service["TimeoutStopSec"].rstrip("s")) >= 60
    assert service["KillMode"] == "mixed"
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert "docker" in service["SupplementaryGroups"].split()
    assert "/run/docker.sock" in service["ReadWritePaths"]
    assert "AF_UNIX" in service["RestrictAddressFamilies"].split()
    assert parser["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    # verify checks every directive and that ExecStart exists: point it at this checkout's entry point.
    unit = tmp_path / "llm-gateway.service"
    text = (ROOT / "config" / "llm-gateway.service").read_text()
    entry = Path(sys.executable).parent / "llm-gateway"
    assert entry.exists()
    unit.write_text(text.replace("/opt/llm-gateway/.venv/bin/llm-gateway", str(entry)))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Unknown" not in result.stderr and "ignoring" not in result.stderr, result.stderr


def test_no_ready_when_the_port_is_taken(tmp_path: Path, redis_prefix: str, notify_socket: NotifySocket,
                                         sim_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc, _ = start_gateway(tmp_path, sim_url, redis_prefix, notify_socket, LISTEN_PORT=str(port))
        try:
            assert proc.wait(60) == 1
        finally:
            stop(proc)
    logs = (tmp_path / "gateway.log").read_text()
    assert f"llm-gateway: cannot listen on 127.0.0.1:{port}" in logs and "Traceback" not in logs
    notify_socket.sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        notify_socket.sock.recv(1024)  # systemd never heard READY=1: the start fails
