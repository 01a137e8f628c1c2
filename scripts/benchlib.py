"""Helpers shared by the benchmark and load scripts in this folder (run them as `python scripts/<name>.py`).

`LocalCluster` (a local 3-master Redis Cluster from Debian's redis-server) is also what the tests start
(tests/helpers_cluster.py imports it from here), so the benchmarks and the tests run on the same cluster.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import redis


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0 to 1) of `values`: the value at rank int(q * n) of the sorted list; 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_up(url: str, timeout: float = 60) -> None:
    """Poll `url` until it answers 200, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(url)


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (0 once it has gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def stop_processes(procs: list[subprocess.Popen[bytes]], timeout: float = 15) -> None:
    """Terminate every process, then wait for each (killing one that outlives `timeout`)."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()


def delete_prefix(redis_url: str, prefix: str, cluster: LocalCluster | None = None) -> None:
    """Delete every Redis key under `prefix` (what a run left behind), a thousand at a time.

    On a cluster every master is scanned on its own, and keys are deleted one per command (a multi-key
    DEL is refused across hash slots, even on one node)."""
    urls = [f"redis://127.0.0.1:{port}/0" for port in cluster.ports] if cluster else [redis_url]
    for url in urls:
        client = redis.Redis.from_url(url)
        try:
            stale = list(client.scan_iter(match=f"{prefix}*", count=1000))
            for start in range(0, len(stale), 1000):
                chunk = stale[start:start + 1000]
                if cluster is None:
                    client.delete(*chunk)
                    continue
                pipe = client.pipeline(transaction=False)
                for key in chunk:
                    pipe.delete(key)
                pipe.execute()
        finally:
            client.close()


def _cluster_port() -> int:
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
            raise RuntimeError("redis-server and redis-cli are needed for a local Redis Cluster "
                               "(apt-get install redis-server)")
        cluster = cls(directory)
        try:
            for _ in range(masters):
                port = _cluster_port()
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
                    raise RuntimeError(f"a redis-server of the local cluster exited ({proc.returncode})")
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
