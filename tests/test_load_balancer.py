"""config/haproxy.cfg in front of three live gateways on one Redis: one swaps, one is killed, realtime holds.

HAProxy (Debian's package, scripts/ensure-haproxy.sh) runs the example file itself, with the test's ports
given through the environment variables the file reads. Realtime clients send streamed and non-streamed
chat completions at a steady rate through it while node1 swaps to a batch model for queued jobs and node2
is killed with kill -9.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import REALTIME_MODEL, ROOT, TOKENS, free_port, start_simulator, wait_http
from tests.liveproc import gateway_env, start_gateway, stop_gateway

pytestmark = pytest.mark.slow

OTHER = "test-org/batch-model"
RATE = 12.0  # realtime requests per second, half of them streamed
ITL = 0.01  # simulated inter-token latency: a 16-token stream lasts about 0.2 s
SIM_ARGS = ("--sim-ttft", "0.02", "--sim-itl", str(ITL))
BATCH_JOBS = 6


@dataclass
class Outcome:
    """One realtime request as its client saw it."""

    stream: bool
    started: float
    ended: float = 0.0
    status: int = 0
    node: str = ""
    error: str = ""
    chunk_times: list[float] = field(default_factory=list)


def haproxy_bin() -> str:
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
    assert found, "haproxy is not installed: run scripts/ensure-haproxy.sh (make test does)"
    return found


@pytest.fixture
def simulators() -> Iterator[list[str]]:
    """The external runtimes of node2 and node3 (node1 manages its own, to be able to swap)."""
    procs, urls = [], []
    for _ in range(2):
        proc, url = start_simulator(REALTIME_MODEL, "--served-model-name", REALTIME_MODEL, *SIM_ARGS)
        procs.append(proc)
        urls.append(url)
    yield urls
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def stats(stats_url: str) -> dict[tuple[str, str], dict[str, str]]:
    """HAProxy's per-server CSV statistics, keyed by (backend, server)."""
    import urllib.request

    with urllib.request.urlopen(stats_url + ";csv", timeout=5) as resp:
        text = resp.read().decode()
    rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
    return {(r["pxname"], r["svname"]): r for r in rows}


async def wait_status(stats_url: str, backend: str, server: str, want: str, timeout: float) -> float:
    """Wait until HAProxy reports `server` of `backend` with status `want`; return when it did."""
    deadline = time.monotonic() + timeout
    while True:
        status = (await asyncio.to_thread(stats, stats_url))[(backend, server)]["status"]
        if status.startswith(want):
            return time.monotonic()
        assert time.monotonic() < deadline, f"{backend}/{server} is {status}, not {want}, after {timeout} s"
        await asyncio.sleep(0.05)


async def realtime_call(http: aiohttp.ClientSession, lb: str, i: int, stream: bool) -> Outcome:
    """One chat completion through the balancer, recording what the client got."""
    out = Outcome(stream=stream, started=time.monotonic())
    body: dict[str, Any] = {"model": REALTIME_MODEL, "messages": [{"role": "user", "content": f"hello {i}"}],
                            "max_tokens": 16, "stream": stream}
    try:
        async with http.post(lb + "/v1/chat/completions", json=body) as resp:
            out.status = resp.status
            out.node = resp.headers.get("X-Gateway-Node", "")
            if resp.status != 200:
                out.error = f"{resp.status}: {(await resp.text())[:300]}"
            elif stream:
                done = False
                async for line in resp.content:
                    if line.startswith(b"data: "):
                        out.chunk_times.append(time.monotonic())
                        done = done or line.strip() == b"data: [DONE]"
                if not done:
                    out.error = "stream ended without data: [DONE]"
            else:
                data = orjson.loads(await resp.read())
                if not data.get("choices"):
                    out.error = f"no choices in {data}"
    except (TimeoutError, aiohttp.ClientError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    out.ended = time.monotonic()
    return out


async def test_realtime_sees_no_error_while_a_node_swaps_and_another_is_killed(
        tmp_path: Path, simulators: list[str], redis_prefix: str, keys_file: Path) -> None:
    common = {"MAX_CONCURRENT_BATCH": "2", "BATCH_LEASE_SECONDS": "2", "BATCH_POLL_INTERVAL": "0.2"}
    # node1 manages its runtime (the simulator as a process) and swaps as soon as realtime has been idle
    # for a moment; node2 and node3 use external runtimes, which cannot swap, so only node1 takes the
    # batch model's jobs.
    env1 = gateway_env(tmp_path, redis_prefix, keys_file, "", RUNTIME_BACKEND="process",
                       RUNTIME_ARGS=" ".join(SIM_ARGS), RUNTIME_PID_FILE=str(tmp_path / "node1-runtime.pid"),
                       SWAP_REALTIME_IDLE_SECONDS="0.05", REALTIME_MIN_RESIDENCY_SECONDS="0",
                       SWAP_GRACE_SECONDS="0", **common)
    nodes: list[subprocess.Popen[bytes]] = []
    haproxy: subprocess.Popen[bytes] | None = None
    try:
        node1, url1, _ = start_gateway(tmp_path, "node1", env1)
        nodes.append(node1)
        node2, url2, _ = start_gateway(tmp_path, "node2", gateway_env(tmp_path, redis_prefix, keys_file,
                                                                        simulators[0], **common))
        nodes.append(node2)
        node3, url3, _ = start_gateway(tmp_path, "node3", gateway_env(tmp_path, redis_prefix, keys_file,
                                                                        simulators[1], **common))
        nodes.append(node3)

        lb_port, stats_port = free_port(), free_port()
        lb, stats_url = f"http://127.0.0.1:{lb_port}", f"http://127.0.0.1:{stats_port}/stats"
        lb_env = {**os.environ, "LB_BIND": f"127.0.0.1:{lb_port}", "LB_STATS_BIND": f"127.0.0.1:{stats_port}",
                  "GATEWAY_NODE1": url1.removeprefix("http://"), "GATEWAY_NODE2": url2.removeprefix("http://"),
                  "GATEWAY_NODE3": url3.removeprefix("http://")}
        cfg = ROOT / "config" / "haproxy.cfg"
        check = subprocess.run([haproxy_bin(), "-c", "-f", str(cfg)], env=lb_env, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        with (tmp_path / "haproxy.log").open("ab") as log:
            haproxy = subprocess.Popen([haproxy_bin(), "-db", "-f", str(cfg)], env=lb_env, stdout=log,
                                       stderr=subprocess.STDOUT)
        wait_http(stats_url, timeout=10, proc=haproxy)
        for server in ("node1", "node2", "node3"):
            await wait_status(stats_url, "realtime", server, "UP", timeout=10)

        outcomes: list[Outcome] = []
        stop = asyncio.Event()
        realtime_headers = {"Authorization": f"Bearer {TOKENS['realtime']}"}
        async with aiohttp.ClientSession(headers=realtime_headers,
                                         timeout=aiohttp.ClientTimeout(total=30)) as http:

            async def drive() -> None:
                """Steady open-loop traffic: a request every 1/RATE s, whatever the previous ones do."""
                tasks: list[asyncio.Task[Outcome]] = []
                start, i = time.monotonic(), 0
                while not stop.is_set():
                    tasks.append(asyncio.create_task(realtime_call(http, lb, i, stream=i % 2 == 0)))
                    i += 1
                    await asyncio.sleep(max(0.0, start + i / RATE - time.monotonic()))
                outcomes.extend(await asyncio.gather(*tasks))

            driver = asyncio.create_task(drive())
            await asyncio.sleep(2)

            # Jobs for a second model: only node1 can run them, and swaps its runtime to do so.
            batch = {"Authorization": f"Bearer {TOKENS['batch']}"}
            job_ids = []
            for i in range(BATCH_JOBS):
                async with http.post(lb + "/v1/batch/chat/completions", headers=batch,
                                     json={"model": OTHER, "max_tokens": 4,
                                           "messages": [{"role": "user", "content": f"batch {i}"}]}) as resp:
                    assert resp.status == 202, await resp.text()
                    job_ids.append((await resp.json())["id"])
            swapped_out_at = await wait_status(stats_url, "realtime", "node1", "DOWN", timeout=30)

            # While node1 is out of the realtime pool, node2 dies without a word.
            await asyncio.sleep(0.3)
            killed_at = time.monotonic()
            node2.send_signal(signal.SIGKILL)
            node2.wait(10)
            await wait_status(stats_url, "realtime", "node2", "DOWN", timeout=10)

            # The batch model's jobs complete (on node1) and node1 comes back to the realtime pool.
            async def job_done(job_id: str) -> str:
                while True:
                    async with http.get(f"{lb}/v1/jobs/{job_id}", headers=batch) as resp:
                        assert resp.status == 200, await resp.text()
                        job = await resp.json()
                    if job["status"] in ("completed", "failed", "cancelled"):
                        return str(job["status"])
                    await asyncio.sleep(0.2)

            finals = await asyncio.wait_for(asyncio.gather(*(job_done(j) for j in job_ids)), 40)
            back_at = await wait_status(stats_url, "realtime", "node1", "UP", timeout=30)
            await asyncio.sleep(1.5)
            stop.set()
            await driver

        # node1 really served the batch model while it was out of the realtime pool.
        assert finals == ["completed"] * BATCH_JOBS, finals
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKENS['monitor']}"}) as mon:
            async with mon.get(url1 + "/monitor/runtime") as resp:
                history = (await resp.json())["history"]
        assert any(e["model"] == OTHER and e["state"] == "ready" for e in history), history
        final_stats = await asyncio.to_thread(stats, stats_url)
        # The batch API stayed on node1 all along: its backend checks /health, not /ready.
        assert final_stats[("api", "node1")]["chkdown"] == "0", final_stats[("api", "node1")]

        # Zero errors for realtime clients. The one thing no proxy can save is a stream whose node dies
        # after its first bytes went out: the client already holds part of the answer. Those are only
        # streams node2 was serving at the kill; every other request (non-streamed ones in flight at the
        # kill included, replayed on another node) must have succeeded.
        cut = [o for o in outcomes if o.error and o.stream and o.node == "node2"
               and o.started < killed_at <= o.ended]
        errors = [o for o in outcomes if o.error and o not in cut]
        assert not errors, [(o.node, o.stream, o.error) for o in errors][:10]
        assert len(cut) <= 3, [(o.node, o.error) for o in cut]
        served = Counter(o.node for o in outcomes if not o.error)
        assert set(served) == {"node1", "node2", "node3"}, served
        # node1 took realtime again once it had swapped back.
        assert any(o.node == "node1" and o.started > back_at and not o.error for o in outcomes)
        # A second after the kill the dead node is out of the pool for good; node3 (and node1 once back)
        # serve everything.
        after = Counter(o.node for o in outcomes if o.started > killed_at + 1 and not o.error)
        assert after["node3"] > 0 and after["node2"] == 0, after
        assert swapped_out_at < killed_at
        # SSE passes unbuffered: a stream's events reach the client spread over its generation time, not
        # in one piece at the end (16 tokens at ITL apart take at least 15 * ITL).
        spreads = sorted(o.chunk_times[-1] - o.chunk_times[0] for o in outcomes if o.stream and not o.error)
        assert spreads[len(spreads) // 2] >= 15 * ITL * 0.5, spreads[:5]
        retried = final_stats[("realtime", "BACKEND")]
        print(f"\nrealtime requests {len(outcomes)}, served by {dict(served)}, streams cut by the kill {len(cut)}, "
              f"HAProxy retries {retried['wretr']}, redispatches {retried['wredis']}; node1 out of the pool "
              f"{back_at - swapped_out_at:.1f} s")
    finally:
        if haproxy is not None:
            haproxy.terminate()
            haproxy.wait(10)
        for proc in nodes:
            stop_gateway(proc)
