#!/usr/bin/env python3
"""Fleet benchmark: several `python -m gateway serve` nodes on one Redis sharing one batch queue.

Every node manages its own simulated runtime (the process backend, 100 ms per request, so any node can
swap to the second model) and keeps MAX_CONCURRENT_BATCH requests in flight with a fixed limit. The same
job mix (JOBS jobs, OTHER_JOBS of them for a second model, spread evenly through the queue) runs three
times:

1. on one node: the throughput baseline;
2. on NODES nodes: exactly-once, swaps done against the minimum needed, realtime availability (the share
   of 100 ms samples in which at least one node's /ready says the realtime model is served), throughput;
3. on NODES nodes with one killed by kill -9 once a third of the jobs are done: exactly-once again, and the
   take-over time (from the kill until the last job the dead node held has been started by another node).

Jobs are put on the queue through the queue's store (JobQueue.enqueue, what POST /v1/batch/* calls), so
the enqueue rate of the HTTP API does not cap the figures. Outcomes come from the job event stream and the
job records. Needs Redis at REDIS_URL (default redis://127.0.0.1:6379/0); each run uses its own key prefix
and removes it afterwards.

Every node gets its own NODE_ID (they share one host) and the run's shared UPLOAD_DIR, as a fleet needs
(docs/fleet.md); leases, swap slots and the swap rules are the gateway's defaults.

With --cluster the script starts a local 3-master Redis Cluster from redis-server (the one the tests use,
scripts/benchlib.py LocalCluster) and runs every node with REDIS_CLUSTER=true against it instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import LocalCluster, delete_prefix, free_port, wait_up  # noqa: E402

from gateway.batch.jobs import Endpoint, parse_submission  # noqa: E402
from gateway.batch.queue import JobQueue  # noqa: E402
from gateway.redis_client import REDIS_ERRORS, keys_for, open_client  # noqa: E402
from gateway.settings import Settings  # noqa: E402

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
CLUSTER: LocalCluster | None = None
"""The local Redis Cluster of a --cluster run (started in main)."""
MODEL = "bench/realtime"
OTHER = "bench/batch-model"
BATCH_KEY_ID = "bench-fleet-batch"
MONITOR_TOKEN = "bench-fleet-monitor-token-0001"
TERMINAL = {"completed", "failed", "cancelled", "expired"}
_SWAPS = re.compile(r'^llm_gateway_batch_swaps_total\{reason="([^"]+)"\}\s+([0-9.e+]+)', re.M)


@dataclass
class Node:
    """One gateway process with its own simulated runtime."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    pid_file: Path
    killed: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill9(self) -> None:
        """kill -9 the gateway (its runtime, a separate process, keeps running: see stop())."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.killed = True

    def stop(self) -> None:
        """SIGTERM the gateway; after a kill -9, stop the runtime it left behind (named in its pid file)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        try:
            record = json.loads(self.pid_file.read_text())
            cmdline = Path(f"/proc/{int(record['pid'])}/cmdline").read_bytes()
        except (OSError, ValueError, KeyError):
            return
        if b"gateway.simulator" in cmdline:
            os.kill(int(record["pid"]), signal.SIGKILL)


@dataclass
class RunResult:
    """What one run measured."""

    nodes: int
    jobs: int
    seconds: float
    completed_once: int
    completed_twice: int
    not_completed: int
    swaps: Counter[str]
    availability: float
    takeover_seconds: float | None = None
    takeover_jobs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.jobs / self.seconds


def write_keys(path: Path) -> None:
    keys = [{"id": BATCH_KEY_ID, "token": "bench-fleet-batch-token-0001", "scopes": ["batch"]},
            {"id": "bench-fleet-monitor", "token": MONITOR_TOKEN, "scopes": ["monitor"]}]
    path.write_text(json.dumps({"keys": keys}))


def redis_url() -> str:
    return CLUSTER.url if CLUSTER else REDIS_URL


def start_node(name: str, tmp: Path, prefix: str, keys: Path, args: argparse.Namespace, uploads: Path) -> Node:
    port = free_port()
    workdir = tmp / name
    workdir.mkdir(parents=True, exist_ok=True)
    pid_file = workdir / "runtime.pid"
    env = {**os.environ, "LISTEN_HOST": "127.0.0.1", "LISTEN_PORT": str(port), "REDIS_URL": redis_url(),
           "REDIS_CLUSTER": "true" if CLUSTER else "false", "NODE_ID": name,
           "NODE_ADDRESS": f"http://127.0.0.1:{port}",
           "REDIS_PREFIX": prefix, "AUTH_KEYS_FILE": str(keys), "RUNTIME_BACKEND": "process",
           "RUNTIME_ARGS": f"--sim-ttft {args.request_seconds}", "RUNTIME_PID_FILE": str(pid_file),
           "REALTIME_MODEL": MODEL, "LOG_FORMAT": "json", "LOG_LEVEL": "warning", "SHUTDOWN_TIMEOUT": "5",
           "UPLOAD_DIR": str(uploads), "RUNTIME_FAILURE_DIR": str(workdir / "failures"),
           "EUROEVAL_DEBUG_LOG": str(workdir / "euroeval.log"), "EUROEVAL_WORK_DIR": str(workdir / "euroeval"),
           "MAX_CONCURRENT_BATCH": str(args.slots), "COSERVE_ADAPTIVE": "false",
           "BATCH_LEASE_SECONDS": str(args.lease_seconds), "PYTHONPATH": str(ROOT)}
    with (workdir / "gateway.log").open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], cwd=workdir, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    return Node(name, proc, f"http://127.0.0.1:{port}", pid_file)


async def swaps_of(http: aiohttp.ClientSession, node: Node) -> Counter[str]:
    """The node's llm_gateway_batch_swaps_total by reason (from its /metrics)."""
    async with http.get(node.url + "/metrics", headers={"Authorization": f"Bearer {MONITOR_TOKEN}"}) as resp:
        text = await resp.text()
    return Counter({reason: int(float(value)) for reason, value in _SWAPS.findall(text)})


async def run(n_nodes: int, args: argparse.Namespace, tmp: Path, keys: Path, *, kill: bool = False) -> RunResult:
    prefix = f"bench-fleet:{uuid.uuid4().hex[:10]}:"
    settings = Settings(_env_file=None, redis_url=redis_url(), redis_prefix=prefix,  # type: ignore[call-arg]
                        redis_cluster=CLUSTER is not None, realtime_model=MODEL, auth_keys_file=str(keys))
    redis = await open_client(settings)
    queue = JobQueue(redis, keys_for(settings), settings)
    uploads = tmp / f"uploads-{prefix.split(':')[1]}"  # shared by the run's nodes, as a fleet needs
    nodes = [start_node(f"{'kill-' if kill else ''}n{n_nodes}-{i}", tmp, prefix, keys, args, uploads)
             for i in range(n_nodes)]
    events: list[dict[str, str]] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        await asyncio.gather(*(wait_up(node.url + "/ready", 180) for node in nodes))
        last = await queue.latest_event_id()
        done: set[str] = set()
        stop = asyncio.Event()

        async def follow() -> None:
            nonlocal last
            while not stop.is_set():
                try:
                    batch = await queue.read_events(last, 2000, 200)
                except REDIS_ERRORS as exc:  # the shared Redis dropped the connection: reconnect, go on
                    print(f"event stream: {exc!r}; reading on", file=sys.stderr)
                    await asyncio.sleep(0.2)
                    continue
                for e in batch:
                    last = e.id
                    events.append(e.fields)
                    if e.fields.get("event") in TERMINAL:
                        done.add(e.fields["job_id"])

        samples: list[bool] = []

        async def sample(http: aiohttp.ClientSession) -> None:
            async def ready(node: Node) -> bool:
                if node.killed:
                    return False
                try:
                    async with http.get(node.url + "/ready", timeout=aiohttp.ClientTimeout(total=1)) as resp:
                        return resp.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    return False

            while not stop.is_set():
                tick = time.monotonic()
                samples.append(any(await asyncio.gather(*(ready(n) for n in nodes))))
                await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - tick)))

        async with aiohttp.ClientSession() as http:
            follower = asyncio.create_task(follow())
            sampler = asyncio.create_task(sample(http))
            tasks.extend((follower, sampler))
            # OTHER_JOBS jobs for the second model, spread evenly through the queue.
            every = args.jobs // args.other_jobs if args.other_jobs else 0
            subs = []
            for i in range(args.jobs):
                model = OTHER if every and i % every == every - 1 and i // every < args.other_jobs else MODEL
                subs.append(parse_submission({"model": model, "prompt": f"job {i}", "max_tokens": 4},
                                             Endpoint.COMPLETIONS, max_metadata_items=16))
            started = time.time()
            sem = asyncio.Semaphore(64)

            async def put(sub: Any) -> str:
                async with sem:
                    return (await queue.enqueue(BATCH_KEY_ID, sub))["id"]

            ids = await asyncio.gather(*(put(s) for s in subs))

            killed_at: float | None = None
            victim: Node | None = None
            deadline = time.monotonic() + args.timeout
            while len(done) < len(ids):
                if follower.done() or sampler.done():
                    raise RuntimeError("a measuring task ended early") from (follower.exception()
                                                                             or sampler.exception())
                if kill and victim is None and len(done) >= len(ids) // 3:
                    victim = nodes[1]
                    killed_at = time.time()
                    victim.kill9()
                assert time.monotonic() < deadline, f"{len(ids) - len(done)} jobs not done after {args.timeout} s"
                await asyncio.sleep(0.05)
            finished = max(float(e["at"]) for e in events if e.get("event") in TERMINAL)
            swaps: Counter[str] = Counter()
            for node in nodes:
                if not node.killed:
                    swaps.update(await swaps_of(http, node))
            stop.set()
            await asyncio.gather(follower, sampler)

        statuses = Counter([(await queue.get(job_id) or {}).get("status", "missing") for job_id in ids])
        completions = Counter(e["job_id"] for e in events if e.get("event") == "completed")
        once = sum(1 for job_id in ids if completions[job_id] == 1)
        twice = sum(1 for job_id in ids if completions[job_id] > 1)
        result = RunResult(nodes=n_nodes, jobs=len(ids), seconds=finished - started, completed_once=once,
                           completed_twice=twice, not_completed=len(ids) - statuses["completed"], swaps=swaps,
                           availability=sum(samples) / max(1, len(samples)),
                           extra={"statuses": dict(statuses)})
        if victim is not None and killed_at is not None:
            result.takeover_seconds, result.takeover_jobs = takeover(events, victim.pid, killed_at)
        return result
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for node in nodes:
            node.stop()
        await redis.aclose()
        delete_prefix(redis_url(), prefix, CLUSTER)


def takeover(events: list[dict[str, str]], pid: int, killed_at: float) -> tuple[float, int]:
    """Seconds from the kill until the last job the dead node held was started by another node."""
    mark = f":{pid}:"
    held: dict[str, bool] = {}
    for e in events:
        if float(e["at"]) >= killed_at:
            break
        if e.get("event") == "started":
            held[e["job_id"]] = mark in e.get("owner", "")
        elif e.get("event") in TERMINAL or e.get("event") == "requeued":
            held.pop(e["job_id"], None)
    victims = {job_id for job_id, by_victim in held.items() if by_victim}
    resumed: dict[str, float] = {}
    for e in events:
        job_id = e.get("job_id", "")
        if job_id not in victims or job_id in resumed or float(e["at"]) < killed_at:
            continue
        if e.get("event") == "started" and mark not in e.get("owner", ""):
            resumed[job_id] = float(e["at"]) - killed_at
        elif e.get("event") in TERMINAL:
            # Written by the victim in the instant between the clock reading and the signal.
            victims.discard(job_id)
    if not victims:
        raise RuntimeError("the killed node held no job at the kill: the take-over time would mean nothing")
    if len(resumed) < len(victims):
        raise RuntimeError(f"{len(victims) - len(resumed)} of the dead node's jobs were never started again")
    return max(resumed.values()), len(victims)


def print_run(r: RunResult) -> None:
    label = f"{r.nodes} node{'s' if r.nodes > 1 else ''}{', kill -9' if r.takeover_seconds is not None else ''}"
    print(f"{label:>16}: {r.seconds:6.1f} s, {r.throughput:6.1f} jobs/s; completed exactly once "
          f"{r.completed_once}/{r.jobs} (twice: {r.completed_twice}, not completed: {r.not_completed}); "
          f"swaps {dict(r.swaps)}; realtime available {r.availability * 100:.1f} %", flush=True)


def report(one: RunResult, fleet: RunResult, killed: RunResult, args: argparse.Namespace) -> None:
    where = "a local 3-master Redis Cluster" if CLUSTER else "one Redis"
    print(f"\n== fleet benchmark on {where}: {args.jobs} jobs ({args.other_jobs} for a second model), simulator at "
          f"{args.request_seconds * 1000:.0f} ms per request, {args.slots} slots per node, "
          f"BATCH_LEASE_SECONDS={args.lease_seconds:g}")
    for r in (one, fleet, killed):
        print_run(r)
    minimum = 1 if args.other_jobs else 0
    out = fleet.swaps["batch_group"]
    print(f"exactly-once: {fleet.completed_once}/{fleet.jobs} ({fleet.nodes} nodes), "
          f"{killed.completed_once}/{killed.jobs} (with a node killed)")
    print(f"swaps to the second model: {out} against a minimum of {minimum} ({fleet.nodes} nodes)")
    print(f"realtime availability: {fleet.availability * 100:.1f} % of the run with at least one node serving "
          f"{MODEL} (target 100 %)")
    if killed.takeover_seconds is not None:
        print(f"take-over after kill -9: {killed.takeover_seconds:.1f} s for the {killed.takeover_jobs} jobs the "
              f"dead node held (target <= 10 s)")
    print(f"throughput: {fleet.nodes} nodes {fleet.throughput:.1f} jobs/s against 1 node {one.throughput:.1f} "
          f"jobs/s = {fleet.throughput / one.throughput:.2f}x (target >= 2.5x)")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--other-jobs", type=int, default=None,
                        help="jobs for the second model among --jobs (default: a tenth of them)")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--slots", type=int, default=2,
                        help="MAX_CONCURRENT_BATCH of every node (default 2: three nodes of 8 slots at 100 ms "
                        "need more CPU than a shared 2-core machine has)")
    parser.add_argument("--request-seconds", type=float, default=0.1, help="the simulator's time per request")
    parser.add_argument("--lease-seconds", type=float, default=Settings.model_fields["batch_lease_seconds"].default,
                        help="BATCH_LEASE_SECONDS (default: the gateway's)")
    parser.add_argument("--timeout", type=float, default=600, help="give up a run after this many seconds")
    parser.add_argument("--quick", action="store_true", help="500 jobs (about 1.5 minutes)")
    parser.add_argument("--cluster", action="store_true", help="run on a local 3-master Redis Cluster "
                        "(started from redis-server) with REDIS_CLUSTER=true, instead of the Redis at REDIS_URL")
    args = parser.parse_args()
    if args.quick:
        args.jobs = 500
    if args.other_jobs is None:
        args.other_jobs = args.jobs // 10
    if not 0 <= args.other_jobs <= args.jobs or args.nodes < 2:
        parser.error("need 0 <= --other-jobs <= --jobs and --nodes >= 2")
    global CLUSTER
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp_name:
        tmp = Path(tmp_name)
        keys = tmp / "keys.json"
        write_keys(keys)
        if args.cluster:
            (tmp / "cluster").mkdir()
            CLUSTER = LocalCluster.start(tmp / "cluster")
            print(f"Redis Cluster: 3 masters on ports {', '.join(map(str, CLUSTER.ports))}", flush=True)
        try:
            one = await run(1, args, tmp, keys)
            print_run(one)
            fleet = await run(args.nodes, args, tmp, keys)
            print_run(fleet)
            killed = await run(args.nodes, args, tmp, keys, kill=True)
            print_run(killed)
        finally:
            if CLUSTER is not None:
                CLUSTER.stop()
    report(one, fleet, killed, args)


if __name__ == "__main__":
    asyncio.run(main())
