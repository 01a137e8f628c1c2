"""A real local 3-master Redis Cluster for the tests, started from Debian's redis-server.

`LocalCluster.start(dir)` runs three `redis-server --cluster-enabled yes` on free local ports (no
persistence, in a temporary directory), joins them with `redis-cli --cluster create ... --cluster-yes`,
and waits until every node reports cluster_state:ok. `stop()` terminates them. conftest.py starts one
per test session, on the first test that asks for it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def _free_port() -> int:
    # A cluster node also listens on its port + 10000 (the cluster bus): both must be free.
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def _cli(port: int, *args: str, timeout: float = 10) -> str:
    return subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL).stdout


@dataclass
class LocalCluster:
    """Three cluster-enabled redis-server processes forming one cluster with no replicas."""

    directory: Path
    ports: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        """A URL of one node (the cluster client discovers the others)."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    @classmethod
    def start(cls, directory: Path, masters: int = 3) -> LocalCluster:
        """Start the nodes, create the cluster and wait for cluster_state:ok (raises on failure)."""
        server = shutil.which("redis-server")
        if server is None or shutil.which("redis-cli") is None:
            raise RuntimeError("redis-server and redis-cli are needed for the Redis Cluster tests "
                               "(apt-get install redis-server)")
        cluster = cls(directory)
        try:
            for _ in range(masters):
                port = _free_port()
                node_dir = directory / f"node-{port}"
                node_dir.mkdir(parents=True)
                cluster.ports.append(port)
                cluster.procs.append(subprocess.Popen(
                    [server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                     "--cluster-config-file", str(node_dir / "nodes.conf"), "--cluster-node-timeout", "5000",
                     "--dir", str(node_dir), "--save", "", "--appendonly", "no", "--protected-mode", "no"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL))
            for port in cluster.ports:
                cluster._wait(lambda p=port: _cli(p, "ping").strip() == "PONG", f"node {port} to answer")
            created = subprocess.run(
                ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in cluster.ports),
                 "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-2000:]}{created.stderr}")
            for port in cluster.ports:
                cluster._wait(lambda p=port: "cluster_state:ok" in _cli(p, "cluster", "info"),
                              f"node {port} to report cluster_state:ok")
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _wait(self, check: object, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"a redis-server of the test cluster exited ({proc.returncode})")
            try:
                if callable(check) and check():
                    return
            except (OSError, subprocess.SubprocessError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"waited {timeout} s for {what}")

    def stop(self) -> None:
        """Terminate every node (and kill the ones that do not stop)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
