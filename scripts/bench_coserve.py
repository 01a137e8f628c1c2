#!/usr/bin/env python3
"""Co-serving benchmark: a realtime trace on top of a saturating batch backlog, policy against policy.

Every policy replays the same seeded realtime trace against a fresh runtime while batch workers keep it
busy, and the figures are compared in one run:

    baseline      realtime alone (no batch): the reference every ratio is taken against
    static-cap    N batch workers at fixed concurrency, runtime FCFS (today's MAX_CONCURRENT_BATCH)
    priority      the same N workers, runtime --scheduling-policy priority, realtime 0 and batch 10
    (capacity)    batch alone with N workers: the denominator of harvest, not a policy

Per policy it prints realtime TTFT p50/p99 and ITL p99 (absolute and as ratios against the baseline), SLO
attainment (the share of realtime requests with TTFT <= --ttft-slo-ms and mean ITL <= --itl-slo-ms),
batch throughput (output tokens/s of batch requests completed in the measured window) and harvest:
batch throughput / (capacity - realtime output tokens/s of the baseline).

The runtime is the simulator with its contention model (``--sim-profile gpu-like`` by default, see
docs/co-serving.md), started once per policy, reached over HTTP as a client would. ``--virtual`` runs the
same engine model in simulated time instead (no processes, no sleeping: seconds for the whole run, and
figures that do not depend on this machine's load).

Load (seeded by --seed):
- realtime: Poisson arrivals at --rate requests/s, at 3x that rate during bursts (--burst-seconds long,
  one per 60 s of trace, the first after 10 s); prompt tokens lognormal (median 512, sigma 0.8, clipped to
  16..2048), output tokens lognormal (median 128, sigma 0.6, clipped to 8..512); streamed.
- batch: a backlog that never runs dry; prompt tokens lognormal (median 1024, sigma 0.5, 64..3000),
  output tokens lognormal (median 256, sigma 0.5, 32..1000); not streamed.

    .venv/bin/python scripts/bench_coserve.py [--quick] [--virtual] [--json FILE]

A policy is a `Policy` (how the runtime is started, which priorities go upstream, how batch is fed);
one that goes through the gateway (adaptive admission with priority) adds a Policy whose `runner` starts
a gateway in front of the runtime and submits batch jobs to its queue instead of calling the runtime.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aredis
from benchlib import delete_prefix, free_port, stop_processes, wait_up

from gateway.batch.coserve import AdmissionController, ControllerConfig, LatencyWindow, RuntimeLoad
from gateway.sim_engine import PROFILES, Engine, ManualClock, Sequence

ROOT = Path(__file__).resolve().parent.parent
MODEL = "bench/coserve-model"
MAX_MODEL_LEN = 4096
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
REALTIME_TOKEN = "bench-coserve-realtime-0001"
BATCH_TOKEN = "bench-coserve-batch-0001"


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One request: when it arrives (realtime only, seconds from the trace start) and its sizes."""

    at: float
    prompt_tokens: int
    output_tokens: int


def lognormal(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    """An integer from a lognormal distribution with this median, clipped to [low, high]."""
    return max(low, min(high, int(round(rng.lognormvariate(math.log(median), sigma)))))


def burst_windows(duration: float, burst_seconds: float) -> list[tuple[float, float]]:
    """One burst per 60 s of trace (at least one), the first starting after 10 s."""
    count = max(1, int(duration // 60))
    windows = []
    for i in range(count):
        start = 10.0 + i * 60.0
        if start >= duration:
            break
        windows.append((start, min(duration, start + burst_seconds)))
    return windows


@dataclass(frozen=True)
class Load:
    """Request sizes: (median, sigma, low, high) of lognormal token counts."""

    realtime_prompt: tuple[float, float, int, int]
    realtime_output: tuple[float, float, int, int]
    batch_prompt: tuple[float, float, int, int]
    batch_output: tuple[float, float, int, int]


LOADS = {
    # A chat service on a 7-8B model (the GPU-like profile's load).
    "gpu": Load((512, 0.8, 16, 2048), (128, 0.6, 8, 512), (1024, 0.5, 64, 3000), (256, 0.5, 32, 1000)),
    # The CPU tier (tiny-llama-a, --max-model-len 1024): realtime streams of 48 tokens, batch jobs of 128
    # (the figures of issue 13).
    "cpu-tier": Load((64, 0.5, 16, 256), (48, 0.0, 48, 48), (128, 0.5, 32, 512), (128, 0.0, 128, 128)),
}
LOAD = LOADS["gpu"]


def realtime_trace(duration: float, rate: float, burst_seconds: float, seed: int) -> list[Job]:
    """Poisson arrivals at `rate`, 3x inside the burst windows (thinning of a 3x-rate process)."""
    rng = random.Random(seed)
    bursts = burst_windows(duration, burst_seconds)
    jobs: list[Job] = []
    t = 0.0
    peak = 3.0 * rate
    while True:
        t += rng.expovariate(peak)
        if t >= duration:
            return jobs
        in_burst = any(a <= t < b for a, b in bursts)
        if not in_burst and rng.random() > 1 / 3:
            continue
        jobs.append(Job(t, lognormal(rng, *LOAD.realtime_prompt), lognormal(rng, *LOAD.realtime_output)))


class BatchBacklog:
    """An endless, seeded backlog of batch jobs."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed + 1)

    def next(self) -> Job:
        """The next job in the backlog."""
        return Job(0.0, lognormal(self.rng, *LOAD.batch_prompt), lognormal(self.rng, *LOAD.batch_output))


# --------------------------------------------------------------------------------------------
# Policies and what one run measures
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """How one policy runs: the runtime's scheduling policy, batch workers and upstream priorities."""

    name: str
    scheduling_policy: str = "fcfs"
    realtime: bool = True
    batch_workers: int = 0
    realtime_priority: int | None = None
    batch_priority: int | None = None
    adaptive: bool = False
    """Through the gateway, its co-serving controller on: batch is submitted to the gateway's queue, and the
    dispatcher's AIMD limit decides how many batch requests reach the runtime (--virtual: the same
    controller, gateway/batch/coserve.py, driven on the simulated clock)."""


def policies(batch_workers: int) -> list[Policy]:
    """The policies compared, in order; the capacity run comes last."""
    return [
        Policy("baseline"),
        Policy("static-cap", batch_workers=batch_workers),
        Policy("priority", scheduling_policy="priority", batch_workers=batch_workers, realtime_priority=0,
               batch_priority=10),
        Policy("adaptive", scheduling_policy="priority", batch_workers=batch_workers, realtime_priority=0,
               batch_priority=10, adaptive=True),
        Policy("capacity", realtime=False, batch_workers=batch_workers),
    ]


@dataclass
class RunResult:
    """Raw figures of one policy's run."""

    ttft: list[float] = field(default_factory=list)  # per realtime request, seconds
    tpot: list[float] = field(default_factory=list)  # per realtime request: mean inter-token latency
    complete: list[bool] = field(default_factory=list)  # per realtime request: finished within the grace
    itl: list[float] = field(default_factory=list)  # every realtime inter-token gap
    realtime_tokens: int = 0
    batch_tokens: int = 0  # output tokens of batch requests completed inside the window
    batch_requests: int = 0
    limits: list[tuple[float, int, str]] = field(default_factory=list)  # adaptive, --virtual: (t, limit, reason)
    limit_changes: int = 0  # adaptive: how often the controller changed the batch limit
    window: float = 0.0
    errors: int = 0
    preemptions: float = 0.0

    def record_stream(self, arrived: float, token_times: list[float], complete: bool = True,
                      now: float = 0.0) -> None:
        """Record one realtime request from the times its tokens appeared.

        One cut off by the end of the grace period counts as an SLO miss; without a first token its TTFT
        is the time it had waited (a lower bound).
        """
        self.ttft.append((token_times[0] if token_times else now) - arrived)
        gaps = [b - a for a, b in zip(token_times, token_times[1:], strict=False)]
        self.itl.extend(gaps)
        self.tpot.append(sum(gaps) / len(gaps) if gaps else 0.0)
        self.complete.append(complete)
        self.realtime_tokens += len(token_times)


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0 to 1), nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# --------------------------------------------------------------------------------------------
# Runners: the simulator over HTTP, or the engine model in simulated time
# --------------------------------------------------------------------------------------------


async def run_http(policy: Policy, trace: list[Job], args: argparse.Namespace) -> RunResult:
    """Start the contention simulator for this policy and replay the load against it over HTTP."""
    if policy.adaptive:
        return await run_gateway(policy, trace, args)
    procs, base = await start_runtime(policy, args)
    result = RunResult(window=args.duration)
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=900)) as http:
            await _replay_http(http, base, policy, trace, args, result)
            async with http.get(base + "/metrics") as response:
                for line in (await response.text()).splitlines():
                    if line.startswith("vllm:num_preemptions_total"):
                        result.preemptions = float(line.rsplit(" ", 1)[1])
    finally:
        stop_processes(procs)
    return result


def _pinned(cmd: list[str], cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus, *cmd] if cpus else cmd


async def start_runtime(policy: Policy, args: argparse.Namespace) -> tuple[list[subprocess.Popen[bytes]], str]:
    """The runtime of one policy: the contention simulator, a fresh vLLM (--start-vllm) with the policy's
    scheduling policy, or the external --runtime-url (whose own scheduling policy applies to every policy)."""
    if args.runtime_url:
        await wait_up(args.runtime_url + "/health", timeout=60)
        return [], args.runtime_url
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    if args.start_vllm:
        python = Path(os.environ.get("VLLM_VENV", "/var/cache/llm-gateway/vllm-venv")) / "bin" / "python"
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", args.model, "--host",
               "127.0.0.1", "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN), "--dtype", "float32",
               "--enforce-eager", "--scheduling-policy", policy.scheduling_policy]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        proc = subprocess.Popen(_pinned(cmd, args.runtime_cpus), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        timeout = 900.0
    else:
        cmd = [sys.executable, "-m", "gateway.simulator", "--model", args.model, "--host", "127.0.0.1", "--port",
               str(port), "--sim-profile", args.profile, "--scheduling-policy", policy.scheduling_policy,
               "--max-model-len", str(MAX_MODEL_LEN)]
        proc = subprocess.Popen(_pinned(cmd, args.runtime_cpus), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        timeout = 30.0
    try:
        await wait_up(base + "/health", timeout=timeout)
    except BaseException:
        stop_processes([proc])
        raise
    return [proc], base


async def run_gateway(policy: Policy, trace: list[Job], args: argparse.Namespace) -> RunResult:
    """The simulator behind a real gateway (its own process, as deployed): realtime streams go through the
    gateway's /v1/completions, batch is a backlog of jobs in its queue, and the dispatcher's co-serving
    controller (COSERVE_ADAPTIVE) decides how many of them reach the runtime at once, out of
    MAX_CONCURRENT_BATCH = N. The gateway sets the upstream priorities itself (RUNTIME_PRIORITY_SCHEDULING)."""
    gw_port = free_port()
    procs, runtime = await start_runtime(policy, args)
    base = f"http://127.0.0.1:{gw_port}"
    prefix = f"bench:coserve:{uuid.uuid4().hex[:8]}:"
    result = RunResult(window=args.duration)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        (tmp / "keys.json").write_text(json.dumps({"keys": [
            {"id": "bench-realtime", "token": REALTIME_TOKEN, "scopes": ["realtime"]},
            {"id": "bench-batch", "token": BATCH_TOKEN, "scopes": ["batch"]}]}))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "REDIS_URL": REDIS_URL, "REDIS_PREFIX": prefix,
               "AUTH_KEYS_FILE": str(tmp / "keys.json"), "REALTIME_MODEL": args.model, "RUNTIME_BACKEND": "external",
               "RUNTIME_URL": runtime, "LISTEN_HOST": "127.0.0.1", "LISTEN_PORT": str(gw_port),
               "MAX_CONCURRENT_BATCH": str(policy.batch_workers), "COSERVE_ADAPTIVE": "true",
               "RUNTIME_PRIORITY_SCHEDULING": "on", "REALTIME_TTFT_SLO_MS": str(args.ttft_slo_ms),
               "REALTIME_ITL_SLO_MS": str(args.itl_slo_ms),
               "LOG_LEVEL": "info" if args.gateway_log else "warning",
               "RUNTIME_FAILURE_DIR": str(tmp / "failures"), "RUNTIME_PID_FILE": str(tmp / "runtime.pid")}
        gateway = subprocess.Popen(_pinned([sys.executable, "-m", "gateway", "serve"], args.gateway_cpus),
                                   cwd=tmp, env=env,
                                   stdout=subprocess.DEVNULL, stderr=open(args.gateway_log or os.devnull, "wb"),
                                   stdin=subprocess.DEVNULL)
        procs.append(gateway)
        r = aredis.Redis.from_url(REDIS_URL)
        try:
            await wait_up(base + "/ready", timeout=60)
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector,
                                             timeout=aiohttp.ClientTimeout(total=900)) as http:
                feeder = _GatewayBacklog(http, base, r, prefix, policy, args, result)
                await _replay_http(http, base, policy, trace, args, result, feeder=feeder,
                                   headers={"Authorization": f"Bearer {REALTIME_TOKEN}"})
                async with http.get(runtime + "/metrics") as response:
                    for line in (await response.text()).splitlines():
                        if line.startswith("vllm:num_preemptions_total"):
                            result.preemptions = float(line.rsplit(" ", 1)[1])
                async with http.get(base + "/metrics") as response:
                    for line in (await response.text()).splitlines():
                        if line.startswith("llm_gateway_coserve_limit_changes_total{"):
                            reason = line.split('reason="', 1)[1].split('"', 1)[0]
                            if reason != "start":
                                result.limit_changes += int(float(line.rsplit(" ", 1)[1]))
        finally:
            stop_processes(procs)
            await r.aclose()
            delete_prefix(REDIS_URL, prefix)
    return result


class _GatewayBacklog:
    """Keeps the gateway's batch queue from running dry: a job is submitted for every one that completes
    (read from the job event stream), so queued + running stays above MAX_CONCURRENT_BATCH."""

    def __init__(self, http: aiohttp.ClientSession, base: str, redis: Any, prefix: str, policy: Policy,
                 args: argparse.Namespace, result: RunResult) -> None:
        self.http, self.base, self.redis, self.policy, self.args, self.result = http, base, redis, policy, args, result
        self.stream = f"{prefix}job_events"
        self.backlog = BatchBacklog(args.seed)
        self.tokens: dict[str, int] = {}

    async def submit(self, n: int) -> None:
        sem = asyncio.Semaphore(32)

        async def one() -> None:
            job = self.backlog.next()
            async with sem, self.http.post(self.base + "/v1/batch/completions", json=_body(job, None, False),
                                           headers={"Authorization": f"Bearer {BATCH_TOKEN}"}) as response:
                if response.status != 202:
                    self.result.errors += 1
                    return
                self.tokens[(await response.json())["id"]] = job.output_tokens

        await asyncio.gather(*(one() for _ in range(n)))

    async def run(self, start: float, end: float, stop: asyncio.Event) -> None:
        """Fill the queue, then top it up and count completed tokens until `stop`."""
        loop = asyncio.get_running_loop()
        last = "$"
        await self.submit(self.policy.batch_workers + 64)
        while not stop.is_set():
            reply = await self.redis.xread({self.stream: last}, count=500, block=200)
            done = 0
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    event = fields.get(b"event", b"").decode()
                    job_id = fields.get(b"job_id", b"").decode()
                    if event == "completed" and job_id in self.tokens:
                        done += 1
                        tokens = self.tokens.pop(job_id)
                        if start <= loop.time() <= end:
                            self.result.batch_tokens += tokens
                            self.result.batch_requests += 1
                    elif event == "failed":
                        self.result.errors += 1
                        done += 1
            if done:
                await self.submit(done)


def _body(job: Job, priority: int | None, stream: bool) -> dict[str, Any]:
    # ignore_eos: random-weight models (the CPU tier) would end early; the simulator never does.
    body: dict[str, Any] = {"model": MODEL, "prompt": [7] * job.prompt_tokens, "max_tokens": job.output_tokens,
                            "stream": stream, "ignore_eos": True}
    if priority is not None:
        body["priority"] = priority
    return body


async def _replay_http(http: aiohttp.ClientSession, base: str, policy: Policy, trace: list[Job],
                       args: argparse.Namespace, result: RunResult, *, feeder: _GatewayBacklog | None = None,
                       headers: dict[str, str] | None = None) -> None:
    loop = asyncio.get_running_loop()
    url = base + "/v1/completions"
    backlog = BatchBacklog(args.seed)
    warmup = args.warmup if policy.batch_workers else 0.0
    start = loop.time() + warmup  # the trace's t=0; batch runs from now, to reach a steady state first
    end = start + args.duration
    stop_batch = asyncio.Event()

    async def batch_worker() -> None:
        while not stop_batch.is_set():
            job = backlog.next()
            try:
                async with http.post(url, json=_body(job, policy.batch_priority, False)) as response:
                    payload = await response.json()
                    if response.status != 200:
                        result.errors += 1
                        continue
            except aiohttp.ClientError:
                result.errors += 1
                continue
            if start <= loop.time() <= end:
                result.batch_tokens += int(payload["usage"]["completion_tokens"])
                result.batch_requests += 1

    async def realtime(job: Job) -> None:
        delay = start + job.at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        arrived = loop.time()
        times: list[float] = []
        try:
            body = _body(job, None if feeder else policy.realtime_priority, True)
            async with http.post(url, json=body, headers=headers) as response:
                if response.status != 200:
                    result.errors += 1
                    return
                buffer = b""
                async for data in response.content.iter_any():
                    now = loop.time()
                    buffer += data
                    while b"\n\n" in buffer:
                        event, buffer = buffer.split(b"\n\n", 1)
                        if event.startswith(b"data: {") and b'"text":""' not in event:
                            times.append(now)
        except aiohttp.ClientError:
            result.errors += 1
            return
        except asyncio.CancelledError:
            result.record_stream(arrived, times, complete=False, now=loop.time())
            raise
        result.record_stream(arrived, times)

    if feeder is not None:
        workers = [asyncio.create_task(feeder.run(start, end, stop_batch))]
    else:
        workers = [asyncio.create_task(batch_worker()) for _ in range(policy.batch_workers)]
    streams = [asyncio.create_task(realtime(job)) for job in trace] if policy.realtime else []
    remaining = end - loop.time()
    if remaining > 0:
        await asyncio.sleep(remaining)
    if streams:
        _, late = await asyncio.wait(streams, timeout=max(0.0, end + args.grace - loop.time()))
        for task in late:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
    stop_batch.set()
    for task in workers:
        task.cancel()
    await asyncio.gather(*workers, return_exceptions=True)


def run_virtual(policy: Policy, trace: list[Job], args: argparse.Namespace) -> RunResult:
    """The same load on the engine model in simulated time (the trace's t=0 is clock 0)."""
    warmup = args.warmup if policy.batch_workers else 0.0
    clock = ManualClock(-warmup)
    engine = Engine(PROFILES[args.profile].with_overrides(policy=policy.scheduling_policy), clock=clock)
    backlog = BatchBacklog(args.seed)
    result = RunResult(window=args.duration)
    token_times: dict[Sequence, list[float]] = {}
    arrivals = {}
    pending = list(trace) if policy.realtime else []
    pending.reverse()
    batch: set[Sequence] = set()
    # Adaptive: the gateway's controller on the simulated clock, fed what the gateway measures (TTFT at the
    # first token, each stream's mean ITL at its end, the oldest stream still waiting for its first token,
    # the runtime's gauges); batch requests reach the engine only while fewer than the limit run.
    controller = AdmissionController(ControllerConfig(
        max_limit=policy.batch_workers, ttft_slo=args.ttft_slo_ms / 1000, itl_slo=args.itl_slo_ms / 1000),
        clock=clock) if policy.adaptive else None
    ttft_window, itl_window = LatencyWindow(10.0, clock=clock), LatencyWindow(10.0, clock=clock)
    limit = policy.batch_workers
    next_control = clock.now
    last_realtime = float("-inf")

    def add_batch() -> None:
        job = backlog.next()
        seq = Sequence(job.prompt_tokens, job.output_tokens, policy.batch_priority or 0)
        batch.add(seq)
        engine.add(seq)

    def fill_batch() -> None:
        while len(batch) < limit:
            add_batch()

    fill_batch()
    live_realtime = 0
    while clock.now < args.duration or (live_realtime and clock.now < args.duration + args.grace):
        while pending and pending[-1].at <= clock.now:
            job = pending.pop()
            seq = Sequence(job.prompt_tokens, job.output_tokens, policy.realtime_priority or 0,
                           arrival_time=job.at)
            token_times[seq] = []
            arrivals[seq] = job.at
            engine.add(seq)
            live_realtime += 1
            last_realtime = clock.now
        if controller is not None and clock.now >= next_control:
            next_control = clock.now + controller.config.interval
            waits = [clock.now - arrivals[s] for s, times in token_times.items() if not times and not s.finished]
            decision = controller.step(ttft_window, itl_window, RuntimeLoad(
                engine.num_waiting, engine.num_running, engine.kv_cache_usage),
                realtime_active=bool(live_realtime) or clock.now - last_realtime < 10.0,
                priority=policy.scheduling_policy == "priority", first_token_wait=max(waits, default=0.0))
            if decision.limit != limit:
                result.limits.append((clock.now, decision.limit, decision.reason))
                result.limit_changes += 1
                if decision.limit < limit:
                    # The dispatcher stops the newest in-flight batch requests beyond the limit (requeued).
                    for victim in sorted(batch, key=lambda s: s.seq_no)[decision.limit:]:
                        engine.abort(victim)
                        batch.discard(victim)
                limit = decision.limit
            fill_batch()
        if not engine.has_work():
            if not pending:
                if controller is None or clock.now >= args.duration:
                    break
                clock.now = next_control
                continue
            clock.now = pending[-1].at if controller is None else min(pending[-1].at, next_control)
            continue
        step = engine.schedule()
        clock.advance(step.duration)
        output = engine.complete(step)
        for seq in output.emitted:
            times = token_times.get(seq)
            if times is not None:
                if not times:
                    ttft_window.add(clock.now - arrivals[seq])
                times.append(clock.now)
        for seq in output.finished:
            if seq in batch:
                batch.discard(seq)
                if 0.0 <= clock.now <= args.duration:
                    result.batch_tokens += seq.output_tokens
                    result.batch_requests += 1
                fill_batch()  # a worker takes the next job from the backlog at once
            else:
                live_realtime -= 1
                last_realtime = clock.now
                times = token_times[seq]
                if len(times) >= 3:
                    itl_window.add((times[-1] - times[0]) / (len(times) - 1))
                result.record_stream(arrivals[seq], times)
        if clock.now >= args.duration and not live_realtime:
            break
    for seq, times in token_times.items():
        if not seq.finished:  # cut off by the end of the grace period
            result.record_stream(arrivals[seq], times, complete=False, now=clock.now)
    result.preemptions = engine.num_preemptions
    return result


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def summarize(results: dict[str, RunResult], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """The printed figures, by policy (names as in --json)."""
    base = results["baseline"]
    capacity = results["capacity"].batch_tokens / args.duration
    realtime_use = base.realtime_tokens / args.duration
    out: dict[str, dict[str, float]] = {}
    b_p50, b_p99, b_itl = pct(base.ttft, 0.5), pct(base.ttft, 0.99), pct(base.itl, 0.99)
    for name, r in results.items():
        if name == "capacity":
            continue
        within = sum(1 for t, g, done in zip(r.ttft, r.tpot, r.complete, strict=False)
                     if done and t * 1e3 <= args.ttft_slo_ms and g * 1e3 <= args.itl_slo_ms)
        batch_tps = r.batch_tokens / args.duration
        p50, p99, itl = pct(r.ttft, 0.5), pct(r.ttft, 0.99), pct(r.itl, 0.99)
        out[name] = {
            "realtime_requests": float(len(r.ttft)),
            "realtime_cut_off": float(r.complete.count(False)),
            "ttft_p50_ms": p50 * 1e3, "ttft_p99_ms": p99 * 1e3, "itl_p99_ms": itl * 1e3,
            "ttft_p50_ratio": p50 / b_p50 if b_p50 else 0.0,
            "ttft_p99_ratio": p99 / b_p99 if b_p99 else 0.0,
            "itl_p99_ratio": itl / b_itl if b_itl else 0.0,
            "slo_attainment": within / len(r.ttft) if r.ttft else 0.0,
            "batch_tokens_per_s": batch_tps,
            "harvest": batch_tps / (capacity - realtime_use) if capacity > realtime_use else 0.0,
            "preemptions": r.preemptions,
            "limit_changes": float(r.limit_changes),
            "errors": float(r.errors),
        }
    out["capacity"] = {"batch_tokens_per_s": capacity, "realtime_tokens_per_s": realtime_use,
                       "preemptions": results["capacity"].preemptions}
    return out


def print_table(summary: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    """The comparison as a markdown table."""
    print()
    where = ("simulated time" if args.virtual else f"vLLM {args.model}" if args.start_vllm
             else f"runtime {args.runtime_url}" if args.runtime_url else "simulator over HTTP")
    print(f"profile {args.profile}, load {args.load}, {where}"
          f"{f', runtime on CPUs {args.runtime_cpus}' if args.runtime_cpus else ''}"
          f"{f', gateway and client on CPUs {args.gateway_cpus}' if args.gateway_cpus else ''}, "
          f"{args.duration:g} s trace, rate {args.rate:g}/s (3x bursts of {args.burst_seconds:g} s), "
          f"{args.batch_workers} batch workers, SLO TTFT {args.ttft_slo_ms:g} ms / ITL {args.itl_slo_ms:g} ms, "
          f"seed {args.seed}")
    print("| policy | realtime reqs | TTFT p50 | TTFT p99 | ITL p99 | SLO attainment | batch tok/s | harvest "
          "| preemptions |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        if name == "capacity":
            continue
        print(f"| {name} | {s['realtime_requests']:.0f} | {s['ttft_p50_ms']:.1f} ms ({s['ttft_p50_ratio']:.2f}x) "
              f"| {s['ttft_p99_ms']:.1f} ms ({s['ttft_p99_ratio']:.2f}x) | {s['itl_p99_ms']:.1f} ms "
              f"({s['itl_p99_ratio']:.2f}x) | {s['slo_attainment'] * 100:.1f} % | {s['batch_tokens_per_s']:.0f} "
              f"| {s['harvest'] * 100:.0f} % | {s['preemptions']:.0f} |")
    cap = summary["capacity"]
    print(f"capacity (batch alone): {cap['batch_tokens_per_s']:.0f} tok/s; realtime uses "
          f"{cap['realtime_tokens_per_s']:.0f} tok/s in the baseline")


async def main_async(args: argparse.Namespace) -> int:
    trace = realtime_trace(args.duration, args.rate, args.burst_seconds, args.seed)
    print(f"realtime trace: {len(trace)} requests in {args.duration:g} s, bursts at "
          f"{burst_windows(args.duration, args.burst_seconds)}", flush=True)
    results: dict[str, RunResult] = {}
    chosen = set(args.policies.split(",")) | {"baseline", "capacity"} if args.policies else None
    for policy in policies(args.batch_workers):
        if chosen is not None and policy.name not in chosen:
            continue
        started = time.monotonic()
        if args.virtual:
            results[policy.name] = run_virtual(policy, trace, args)
        else:
            results[policy.name] = await run_http(policy, trace, args)
        r = results[policy.name]
        print(f"  {policy.name}: {len(r.ttft)} realtime ({r.complete.count(False)} cut off), "
              f"{r.batch_requests} batch requests, {r.errors} errors "
              f"({time.monotonic() - started:.0f} s)", flush=True)
    summary = summarize(results, args)
    print_table(summary, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": {
            "profile": args.profile, "load": args.load, "runtime": "vllm" if args.start_vllm else
            args.runtime_url or "simulator", "model": args.model, "runtime_cpus": args.runtime_cpus,
            "gateway_cpus": args.gateway_cpus, "virtual": args.virtual, "duration_s": args.duration, "rate": args.rate,
            "burst_seconds": args.burst_seconds, "batch_workers": args.batch_workers,
            "ttft_slo_ms": args.ttft_slo_ms, "itl_slo_ms": args.itl_slo_ms, "seed": args.seed},
            "policies": summary}, indent=2))
    return 0


def main() -> int:
    global LOAD, MAX_MODEL_LEN, MODEL
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 32 s trace with one burst (under 3 minutes)")
    parser.add_argument("--virtual", action="store_true", help="the engine model in simulated time")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="gpu-like")
    parser.add_argument("--duration", type=float, default=None, help="trace seconds (default 150, quick 32)")
    parser.add_argument("--rate", type=float, default=2.0, help="realtime requests/s outside bursts")
    parser.add_argument("--burst-seconds", type=float, default=None, help="burst length (default 30, quick 20)")
    parser.add_argument("--batch-workers", type=int, default=256,
                        help="N: batch concurrency of every policy with batch (and of the capacity run)")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds of batch before the trace starts")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds after the trace for realtime requests to finish (later: cut off, SLO miss)")
    parser.add_argument("--ttft-slo-ms", type=float, default=300.0)
    parser.add_argument("--itl-slo-ms", type=float, default=50.0)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--gateway-log", metavar="FILE", help="adaptive: keep the gateway's log (level info) here")
    parser.add_argument("--load", choices=sorted(LOADS), default=None,
                        help="request sizes (default gpu; cpu-tier with --start-vllm/--runtime-url)")
    parser.add_argument("--start-vllm", action="store_true",
                        help="run every policy on a fresh real vLLM (VLLM_VENV) serving --model, started with the "
                             "policy's --scheduling-policy, instead of the simulator")
    parser.add_argument("--runtime-url", help="an already running vLLM for every policy (its own scheduling policy)")
    parser.add_argument("--model", help="the model to serve/send (default: the simulator's name; with "
                                        "--start-vllm: /var/cache/llm-gateway/models/tiny-llama-a)")
    parser.add_argument("--runtime-cpus", help="pin the runtime to these CPUs (taskset -c), e.g. 1")
    parser.add_argument("--gateway-cpus", help="pin the gateway and this client to these CPUs, e.g. 0")
    parser.add_argument("--policies", help="only these policies, comma-separated (baseline and capacity always run)")
    args = parser.parse_args()
    if args.duration is None:
        args.duration = 32.0 if args.quick else 150.0
    if args.burst_seconds is None:
        args.burst_seconds = 20.0 if args.quick else 30.0
    real = args.start_vllm or args.runtime_url
    if args.virtual and real:
        parser.error("--virtual runs the engine model; it cannot be combined with a real runtime")
    if args.model is None:
        args.model = "/var/cache/llm-gateway/models/tiny-llama-a" if real else MODEL
    if args.load is None:
        args.load = "cpu-tier" if real else "gpu"
    LOAD = LOADS[args.load]
    MODEL = args.model
    if real:
        MAX_MODEL_LEN = 1024
    if args.gateway_cpus:
        os.sched_setaffinity(0, {int(c) for c in args.gateway_cpus.split(",")})
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
