"""Faults: repeated kill -9 of the gateway during batch work, and a full upload disk.

Covered elsewhere: the runtime killed mid-stream (test_realtime.py), Redis down (test_redis_outage.py),
one kill -9 shared by two gateways (test_batch_kill.py). The Docker Engine restart comes last here: it
stops every container on the host, so it must not run beside other Docker tests."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aredis

from gateway.actors.supervisor import RuntimeState
from gateway.uploads.store import SHARED_MARKER
from tests.conftest import REALTIME_MODEL, REDIS_URL, auth, start_simulator, wait_ready
from tests.liveproc import gateway_env, start_gateway, stop_gateway
from tests.polling import wait_for_state
from tests.runtimes import inspect

pytestmark = pytest.mark.slow  # kill -9 loops and Docker Engine restarts

JOBS = 300
KILLS = 3


@pytest.fixture
def slow_sim() -> Iterator[str]:
    """A runtime with a little latency so 300 jobs take a few seconds and the kills land mid-work."""
    proc, url = start_simulator(REALTIME_MODEL, "--served-model-name", REALTIME_MODEL, "--sim-ttft", "0.05")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.mark.timeout(240)
async def test_repeated_kill_9_completes_every_job_exactly_once(tmp_path: Path, slow_sim: str, redis_prefix: str,
                                                                keys_file: Path) -> None:
    env = gateway_env(tmp_path, redis_prefix, keys_file, slow_sim, MAX_CONCURRENT_BATCH="4",
                      BATCH_LEASE_SECONDS="1")
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    print(f"kill points seed {seed}")
    proc, base, _ = start_gateway(tmp_path, "gw0", env)
    procs: list[subprocess.Popen[bytes]] = [proc]
    r = aredis.Redis.from_url(REDIS_URL)
    stream = f"{redis_prefix}{{batch}}:job_events"
    seen = {"last": "-", "completed": 0}

    async def completed_count() -> int:
        start = seen["last"] if seen["last"] == "-" else "(" + seen["last"]
        for entry_id, e in await r.xrange(stream, min=start, count=5000):
            seen["last"] = entry_id.decode()
            seen["completed"] += e[b"event"] == b"completed"
        return seen["completed"]

    try:
        ids: list[str] = []
        async with aiohttp.ClientSession(headers=auth("batch")) as http:
            sem = asyncio.Semaphore(16)

            async def enqueue(i: int) -> None:
                async with sem, http.post(base + "/v1/batch/completions",
                                          json={"model": REALTIME_MODEL, "prompt": f"job {i}", "max_tokens": 2,
                                                "priority": i % 5}) as resp:
                    assert resp.status == 202, await resp.text()
                    ids.append((await resp.json())["id"])

            await asyncio.gather(*(enqueue(i) for i in range(JOBS)))
        assert len(set(ids)) == JOBS

        kill_points = sorted(rng.sample(range(JOBS // 10, JOBS * 8 // 10), KILLS))
        kills_mid_work = 0
        for n, point in enumerate(kill_points, start=1):
            for _ in range(1200):
                if await completed_count() >= point:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(rng.random() * 0.05)  # land anywhere in the dispatch cycle
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            kills_mid_work += await completed_count() < JOBS
            proc, base, _ = start_gateway(tmp_path, f"gw{n}", env)
            procs.append(proc)
        assert kills_mid_work == KILLS, "the work finished before the kills; the test proves nothing"

        for _ in range(1200):
            if await completed_count() >= JOBS:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # a late duplicate completion (there must be none) would show up here

        pipe = r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(f"{redis_prefix}{{batch}}:job:{job_id}", "status")
        statuses = Counter(s.decode() for s in await pipe.execute())
        assert statuses == {"completed": JOBS}
        history: dict[str, list[str]] = defaultdict(list)
        for _, e in await r.xrange(stream):
            history[e[b"job_id"].decode()].append(e[b"event"].decode())
        completions = Counter({job_id: h.count("completed") for job_id, h in history.items()})
        assert set(completions) == set(ids)
        assert set(completions.values()) == {1}, {j: c for j, c in completions.items() if c != 1}
        assert sum(h.count("requeued") for h in history.values()) >= 1  # leases of the killed ones came back
        assert await r.zcard(f"{redis_prefix}{{batch}}:leases") == 0
    finally:
        await r.aclose()
        for p in procs[:-1]:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    assert stop_gateway(procs[-1]) == 0


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs for the upload directory (the test runs as root, as CI does)."""
    directory = tmp_path / "tiny_uploads"
    directory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(directory)], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


async def test_upload_disk_full_is_a_clean_error_and_consistent(aiohttp_client: Any, make_settings: Any,
                                                                tiny_disk: Path) -> None:
    from gateway.bootstrap import create_app

    client = await aiohttp_client(create_app(make_settings(upload_dir=str(tiny_disk), max_body_bytes=8 * 1024**2)))
    await wait_ready(client.app)
    tus = {**auth("upload"), "Tus-Resumable": "1.0.0"}
    resp = await client.post("/v1/upload", headers={**tus, "Upload-Length": str(4 * 1024**2)})
    assert resp.status == 201
    location = resp.headers["Location"]
    patch = {**tus, "Content-Type": "application/offset+octet-stream"}
    resp = await client.patch(location, headers={**patch, "Upload-Offset": "0"}, data=b"a" * (512 * 1024))
    assert resp.status == 204
    resp = await client.patch(location, headers={**patch, "Upload-Offset": "524288"}, data=b"b" * (3 * 1024**2))
    assert resp.status in (507, 413), resp.status
    error = (await resp.json())["error"]
    assert error["type"] and "space" in error["message"].lower()
    # Consistent: HEAD reports the bytes really stored, and the data file holds exactly those bytes.
    resp = await client.head(location, headers=tus)
    assert resp.status == 200
    offset = int(resp.headers["Upload-Offset"])
    upload_id = location.rstrip("/").rsplit("/", 1)[1]
    data = (tiny_disk / f"{upload_id}.bin").read_bytes()
    assert offset == 512 * 1024 and data[:offset] == b"a" * offset
    # Once space is freed (another upload deleted), the upload resumes from that offset and finishes.
    for f in tiny_disk.iterdir():
        # Nothing else was left behind (the fleet's shared-directory marker aside).
        assert f.name.startswith(upload_id) or f.name == SHARED_MARKER, f
    resp = await client.patch(location, headers={**patch, "Upload-Offset": str(offset)}, data=b"c" * 1024)
    assert resp.status == 204 and int(resp.headers["Upload-Offset"]) == offset + 1024
    assert os.path.getsize(tiny_disk / f"{upload_id}.bin") == offset + 1024


def _docker_answers() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@pytest.mark.docker
@pytest.mark.timeout(300)
async def test_docker_engine_restart_is_recovered(docker_settings: Any, supervisors: Any,
                                                  container_name: str) -> None:
    sup = supervisors(docker_settings())
    await sup.start()
    first = await sup.wait_ready(60)
    pid_file = Path("/var/run/docker.pid")
    pid = int(pid_file.read_text())
    # Restart the engine exactly as it runs now (scripts/ensure-docker.sh started it detached).
    command = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    os.kill(pid, signal.SIGTERM)
    try:
        for _ in range(300):
            if not Path(f"/proc/{pid}").exists():
                break
            await asyncio.sleep(0.1)
        assert not Path(f"/proc/{pid}").exists(), "dockerd did not stop"
        # The engine stopping took the runtime container down: the supervisor notices by itself.
        await wait_for_state(sup, lambda s: s.state is not RuntimeState.READY, timeout=60)
    finally:
        with open(os.environ.get("DOCKERD_LOG", "/var/log/dockerd.log"), "ab") as log:
            subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        for _ in range(600):
            if _docker_answers():
                break
            await asyncio.sleep(0.1)
    assert _docker_answers(), "dockerd did not come back"
    again = await wait_for_state(sup, lambda s: s.state is RuntimeState.READY, timeout=120)
    assert again.restarts >= first.restarts
    info = await inspect(container_name)
    assert info is not None and info["State"]["Running"]
    async with aiohttp.ClientSession() as http:
        async with http.post(again.base_url + "/v1/completions",
                             json={"model": REALTIME_MODEL, "prompt": "hi", "max_tokens": 2}) as resp:
            assert resp.status == 200
