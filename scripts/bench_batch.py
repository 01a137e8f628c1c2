#!/usr/bin/env python3
"""Batch queue benchmark: the figures of docs/batch.md#benchmark, measured in one run on this machine.

1. enqueue rate over HTTP at concurrency 32 (dispatcher off, so only the API and Redis are measured);
2. with the simulator at zero latency: completed jobs per second through the queue against the same
   requests sent straight to the runtime at the same concurrency (MAX_CONCURRENT_BATCH);
3. slot utilisation while the queue holds work (sampled in-flight count / slots);
4. dispatcher overhead per job (slot time per job through the queue minus straight to the runtime);
5. time from "realtime request arrives during a batch group" to "realtime served", restart swap vs
   sleep mode, on the simulator's start / sleep / wake timings.

Needs Redis at REDIS_URL (default redis://127.0.0.1:6379/0); uses its own key prefix and removes it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aredis
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import delete_prefix, free_port, stop_processes, wait_up  # noqa: E402

from gateway import metrics  # noqa: E402
from gateway.bootstrap import create_app  # noqa: E402
from gateway.http.appkeys import DISPATCHER, SUPERVISOR  # noqa: E402
from gateway.logging import configure_logging  # noqa: E402
from gateway.settings import Settings  # noqa: E402

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
MODEL = "bench/realtime"
OTHER = "bench/batch-model"
BATCH_TOKEN = "bench-batch-token-0001"
REALTIME_TOKEN = "bench-realtime-token-0001"


class Gateway:
    """One in-process gateway on a free port."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        self.runner = web.AppRunner(self.app, access_log=None)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Gateway:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        await self.app[SUPERVISOR].wait_ready(120)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


def settings_for(prefix: str, keys: Path, tmp: Path, **extra: Any) -> Settings:
    values: dict[str, Any] = {"redis_url": REDIS_URL, "redis_prefix": prefix, "auth_keys_file": str(keys),
                              "realtime_model": MODEL, "runtime_failure_dir": str(tmp / "failures"),
                              "runtime_pid_file": str(tmp / "runtime.pid"), "log_level": "warning"}
    values.update(extra)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


async def enqueue(http: aiohttp.ClientSession, base: str, n: int, concurrency: int, model: str = MODEL,
                  max_tokens: int = 16) -> tuple[float, list[str]]:
    sem = asyncio.Semaphore(concurrency)
    ids: list[str] = []

    async def one(i: int) -> None:
        async with sem:
            async with http.post(base + "/v1/batch/completions",
                                 json={"model": model, "prompt": f"benchmark prompt number {i}",
                                       "max_tokens": max_tokens, "priority": i % 10},
                                 headers={"Authorization": f"Bearer {BATCH_TOKEN}"}) as resp:
                if resp.status != 202:
                    raise RuntimeError(f"enqueue answered {resp.status}: {await resp.text()}")
                ids.append((await resp.json())["id"])

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - started, ids


async def direct(http: aiohttp.ClientSession, runtime: str, n: int, concurrency: int) -> float:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            async with http.post(runtime + "/v1/completions",
                                 json={"model": MODEL, "prompt": f"benchmark prompt number {i}",
                                       "max_tokens": 16}) as resp:
                await resp.read()
                assert resp.status == 200

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - started


async def throughput(args: argparse.Namespace, tmp: Path, keys: Path, ttft: float = 0.0, jobs: int = 0) -> None:
    jobs = jobs or args.jobs
    label = "simulator at zero latency" if not ttft else f"simulator time to first token {ttft * 1000:g} ms"
    print(f"--- throughput, {jobs} jobs, {args.slots} slots, {label}")
    sim_port = free_port()
    sim = subprocess.Popen([sys.executable, "-m", "gateway.simulator", "--model", MODEL, "--host", "127.0.0.1",
                            "--port", str(sim_port), "--sim-ttft", str(ttft)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runtime = f"http://127.0.0.1:{sim_port}"
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    r = aredis.Redis.from_url(REDIS_URL)
    try:
        await wait_up(runtime + "/health", timeout=30)
        common = {"runtime_backend": "external", "runtime_url": runtime, "max_concurrent_batch": args.slots}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as http:
            # Direct first, as a warm-up of the simulator too.
            direct_s = await direct(http, runtime, jobs, args.slots)
            async with Gateway(settings_for(prefix, keys, tmp, batch_dispatcher_enabled=False, **common)) as api:
                await enqueue(http, api.url, 200, 32)  # warm-up, drained below with the rest
                enqueue_s, _ = await enqueue(http, api.url, jobs, 32)
            total = jobs + 200
            print(f"enqueue over HTTP, concurrency 32: {jobs / enqueue_s:,.0f} jobs/s "
                  f"({jobs} jobs in {enqueue_s:.2f} s)")

            stream = f"{prefix}{{batch}}:job_events"
            async with Gateway(settings_for(prefix, keys, tmp, **common)) as worker:
                dispatcher = worker.app[DISPATCHER]
                profiler = _profiler(args.profile) if not ttft else None
                started = time.perf_counter()
                cpu_started = time.process_time()
                samples: list[float] = []
                ready_key = f"{prefix}{{batch}}:ready:{MODEL}"
                completed = metrics.BATCH_JOBS.labels("completed")
                base = completed._value.get()  # in-process counter: watching costs the gateway nothing
                next_check = 0.0
                queue_has_work = True
                while completed._value.get() - base < total:
                    now = time.perf_counter()
                    if now >= next_check:
                        next_check = now + 0.05
                        queue_has_work = await r.zcard(ready_key) > 0
                    if queue_has_work:
                        samples.append(dispatcher.status().sending / dispatcher.slots)
                    await asyncio.sleep(0.002)
                drain_s = time.perf_counter() - started
                cpu_s = time.process_time() - cpu_started
                if profiler is not None:
                    profiler.stop()
                    Path(args.profile).write_text(profiler.output_text(show_all=False))
                    print(f"profile of the drain (whole process, this loop): {args.profile}")
                busy = dispatcher.slot_busy_seconds
                events = await r.xlen(stream)
                if events < 3 * total:
                    raise RuntimeError(f"only {events} events for {total} jobs")
        batch_rate = total / drain_s
        direct_rate = jobs / direct_s
        print(f"completed through the queue: {batch_rate:,.0f} jobs/s; straight to the runtime at the same "
              f"concurrency: {direct_rate:,.0f} req/s; ratio {batch_rate / direct_rate:.2f}")
        util = sum(samples) / len(samples) if samples else 0.0
        print(f"slot utilisation while the queue held work: {util * 100:.1f}% "
              f"({len(samples)} samples); busy slot-seconds / (slots x drain time): "
              f"{busy / (args.slots * drain_s) * 100:.1f}%")
        per_job_batch = args.slots * drain_s / total
        per_job_direct = args.slots * direct_s / jobs
        print(f"slot time per job: {per_job_batch * 1000:.2f} ms through the queue, "
              f"{per_job_direct * 1000:.2f} ms straight; dispatcher overhead "
              f"{(per_job_batch - per_job_direct) * 1000:.2f} ms per job")
        print(f"gateway CPU per job (dispatcher, Redis and runtime clients; the benchmark's own sampling "
              f"included): {cpu_s / total * 1000:.2f} ms")
    finally:
        stop_processes([sim], timeout=10)
        delete_prefix(REDIS_URL, prefix)
        await r.aclose()


def _profiler(path: str | None) -> Any:
    """A started pyinstrument profiler (pip install pyinstrument) when --profile is given."""
    if not path:
        return None
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0005, async_mode="disabled")
    profiler.start()
    return profiler


async def swap_latency(args: argparse.Namespace, tmp: Path, keys: Path, sleep_mode: bool) -> float:
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    sim_args = (f"--sim-start-delay {args.start_delay} --sim-sleep-delay {args.sleep_delay} "
                f"--sim-wake-delay {args.wake_delay} --sim-ttft 0.5")
    settings = settings_for(prefix, keys, tmp, runtime_backend="process", runtime_args=sim_args,
                            runtime_sleep_mode=sleep_mode, max_concurrent_batch=4,
                            swap_realtime_idle_seconds=0.2, realtime_min_residency_seconds=0,
                            swap_grace_seconds=args.grace, runtime_expected_start_seconds=args.start_delay,
                            log_level=args.log_level)
    try:
        async with Gateway(settings) as gw, aiohttp.ClientSession() as http:
            await enqueue(http, gw.url, 40, 8, model=OTHER, max_tokens=8)
            dispatcher = gw.app[DISPATCHER]
            deadline = time.monotonic() + 120
            while not (dispatcher.status().group == OTHER and dispatcher.status().in_flight):
                if time.monotonic() > deadline:
                    raise TimeoutError("the batch group did not start")
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            arrived = time.perf_counter()
            body = {"model": MODEL, "prompt": "realtime!", "max_tokens": 4}
            headers = {"Authorization": f"Bearer {REALTIME_TOKEN}"}
            while True:
                async with http.post(gw.url + "/v1/completions", json=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status == 200:
                        return time.perf_counter() - arrived
                if time.perf_counter() - arrived > 120:
                    raise TimeoutError("realtime was not served")
                await asyncio.sleep(0.05)  # a client retrying faster than Retry-After asks
    finally:
        delete_prefix(REDIS_URL, prefix)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=3000, help="jobs for the throughput runs")
    parser.add_argument("--slots", type=int, default=16, help="MAX_CONCURRENT_BATCH for the throughput runs")
    parser.add_argument("--start-delay", type=float, default=5.0, help="simulated cold start of a model (s)")
    parser.add_argument("--sleep-delay", type=float, default=0.5, help="simulated /sleep time (s)")
    parser.add_argument("--wake-delay", type=float, default=1.0, help="simulated /wake_up time (s)")
    parser.add_argument("--grace", type=float, default=1.0, help="SWAP_GRACE_SECONDS for the swap runs")
    parser.add_argument("--ttft", type=float, default=0.05,
                        help="runtime latency (s) of the second throughput run, where slot utilisation matters")
    parser.add_argument("--skip-swaps", action="store_true")
    parser.add_argument("--profile", metavar="FILE",
                        help="profile the zero-latency drain with pyinstrument (not a dependency: pip install it) "
                             "and write the text report to FILE")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--log-level", default="error")
    args = parser.parse_args()
    configure_logging(args.log_level, "console")
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        keys = tmp / "keys.json"
        keys.write_text(json.dumps({"keys": [
            {"id": "bench-batch", "token": BATCH_TOKEN, "scopes": ["batch"]},
            {"id": "bench-realtime", "token": REALTIME_TOKEN, "scopes": ["realtime"]}]}))
        print(f"machine: {os.cpu_count()} CPUs; Redis {REDIS_URL}")
        if not args.skip_throughput:
            await throughput(args, tmp, keys)
            await throughput(args, tmp, keys, ttft=args.ttft, jobs=max(16, int(args.jobs / 3)))
        if not args.skip_swaps:
            timings = (f"cold start {args.start_delay:g} s, sleep {args.sleep_delay:g} s, "
                       f"wake {args.wake_delay:g} s, grace {args.grace:g} s")
            restart = await swap_latency(args, tmp, keys, sleep_mode=False)
            print(f"realtime arrives during a batch group -> served: {restart:.2f} s with a restart swap ({timings})")
            sleep = await swap_latency(args, tmp, keys, sleep_mode=True)
            print(f"realtime arrives during a batch group -> served: {sleep:.2f} s with sleep mode ({timings})")


if __name__ == "__main__":
    asyncio.run(main())
