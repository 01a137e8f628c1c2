"""Helpers shared by the benchmark and load scripts in this folder (run them as `python scripts/<name>.py`)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
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


def delete_prefix(redis_url: str, prefix: str) -> None:
    """Delete every Redis key under `prefix` (what a run left behind), a thousand at a time."""
    client = redis.Redis.from_url(redis_url)
    try:
        stale = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(stale), 1000):
            client.delete(*stale[start:start + 1000])
    finally:
        client.close()
