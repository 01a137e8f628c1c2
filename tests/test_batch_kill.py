"""kill -9 of a real `python -m gateway serve` in the middle of 1,000 jobs shared by two gateways."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aredis

from tests.conftest import REALTIME_MODEL, REDIS_URL, TOKENS, start_simulator
from tests.liveproc import gateway_env, start_gateway, stop_gateway

pytestmark = pytest.mark.slow  # kills a gateway mid-queue (1000 jobs, two gateway processes)

JOBS = 1000


@pytest.fixture
def kill_sim() -> Iterator[str]:
    """The runtime both gateways use (external): a little latency so the work takes a few seconds."""
    proc, url = start_simulator(REALTIME_MODEL, "--served-model-name", REALTIME_MODEL, "--sim-ttft", "0.02")
    yield url
    proc.terminate()
    proc.wait(10)


async def test_kill_9_mid_queue_loses_nothing_and_completes_nothing_twice(
        tmp_path: Path, kill_sim: str, redis_prefix: str, keys_file: Path) -> None:
    env = gateway_env(tmp_path, redis_prefix, keys_file, kill_sim, MAX_CONCURRENT_BATCH="8", BATCH_LEASE_SECONDS="1")
    victim, _, _ = start_gateway(tmp_path, "victim", env)
    survivor, survivor_url, _ = start_gateway(tmp_path, "survivor", env)
    r = aredis.Redis.from_url(REDIS_URL)
    stream = f"{redis_prefix}{{batch}}:job_events"
    try:
        headers = {"Authorization": f"Bearer {TOKENS['batch']}"}
        ids: list[str] = []
        seen = {"last": "-", "completed": 0}

        async def completed_count() -> int:
            # Incremental read of the stream, as an outside consumer would follow it.
            start = seen["last"] if seen["last"] == "-" else "(" + seen["last"]
            for entry_id, e in await r.xrange(stream, min=start, count=5000):
                seen["last"] = entry_id.decode()
                seen["completed"] += e[b"event"] == b"completed"
            return seen["completed"]

        async def kill_mid_work() -> None:
            # Kill the victim in the middle of the work, while it holds leases: both gateways work the
            # shared queue while it is being filled, so the watch starts with the first submission.
            for _ in range(1200):
                if await completed_count() >= JOBS // 4:
                    break
                await asyncio.sleep(0.05)
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)

        async with aiohttp.ClientSession(headers=headers) as http:
            async def enqueue(i: int) -> None:
                # Through the survivor: the victim claims from the same queue and dies mid-way.
                async with http.post(survivor_url + "/v1/batch/completions",
                                     json={"model": REALTIME_MODEL, "prompt": f"job {i}", "max_tokens": 2,
                                           "priority": i % 10}) as resp:
                    assert resp.status == 202, await resp.text()
                    ids.append((await resp.json())["id"])

            sem = asyncio.Semaphore(32)

            async def bounded(i: int) -> None:
                async with sem:
                    await enqueue(i)

            killer = asyncio.create_task(kill_mid_work())
            await asyncio.gather(*(bounded(i) for i in range(JOBS)))
            await killer
        assert len(set(ids)) == JOBS

        killed_at = await completed_count()
        assert killed_at < JOBS, "the work finished before the kill; the test proves nothing"

        for _ in range(600):
            if await completed_count() >= JOBS:
                break
            await asyncio.sleep(0.1)

        # Nothing lost: every job completed, each exactly once.
        pipe = r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(f"{redis_prefix}{{batch}}:job:{job_id}", "status")
        statuses = Counter(s.decode() for s in await pipe.execute())
        assert statuses == {"completed": JOBS}
        history: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for _, e in await r.xrange(stream):
            history[e[b"job_id"].decode()].append((e[b"event"].decode(), e.get(b"reason", b"").decode()))
        completions = Counter(job_id for job_id, h in history.items() for ev, _ in h if ev == "completed")
        assert set(completions) == set(ids) and set(completions.values()) == {1}
        # The victim's in-flight jobs came back through lease expiry; no job started twice without
        # having been taken back in between (never two holders at once).
        requeued = [job_id for job_id, h in history.items() if ("requeued", "lease_expired") in h]
        assert requeued
        for job_id, h in history.items():
            holding = False
            for ev, _ in h:
                if ev == "started":
                    assert not holding, (job_id, h)
                    holding = True
                elif ev == "requeued":
                    holding = False
        assert await r.zcard(f"{redis_prefix}{{batch}}:leases") == 0
    finally:
        await r.aclose()
        stop_gateway(victim)
        stop_gateway(survivor)
    assert survivor.returncode == 0
