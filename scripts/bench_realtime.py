#!/usr/bin/env python3
"""Realtime proxy benchmark: the gateway against the simulator directly, measured in the same run.

Prints added latency at concurrency 1 (p50/p99), throughput at concurrency 32 as a ratio of direct,
unpaced streaming chunk rate as a ratio of direct, 500 concurrent paced streams (errors, time to last
token vs direct) and the gateway's RSS at idle and under the stream test.

    .venv/bin/python scripts/bench_realtime.py [--quick]

With --runtime-url and --model, the same measurements run against an already running runtime (e.g. a real
vLLM server) instead of simulators: "direct" is that runtime, "gateway" a gateway in front of it (external
backend), measured in the same run. Requests then add vLLM's ignore_eos, and a stream counts as failed when it
ends without [DONE] (a real tokenizer may emit fewer chunks than tokens).

    .venv/bin/python scripts/bench_realtime.py --runtime-url http://127.0.0.1:8001 --model /path/to/model

Needs Redis at REDIS_URL (default redis://127.0.0.1:6379/0); uses its own key prefix and removes it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
from benchlib import delete_prefix, free_port, pct, rss_mb, stop_processes, wait_up

ROOT = Path(__file__).resolve().parent.parent
MODEL = "bench/model"
EXTRA: dict[str, object] = {}  # added to every request body ({"ignore_eos": true} on a real runtime)
TOKEN = "bench-token-realtime-0001"
MONITOR = "bench-token-monitor-0001"


class Target:
    """One endpoint to load: the simulator directly or the gateway in front of it."""

    def __init__(self, name: str, base: str, headers: dict[str, str]) -> None:
        self.name, self.base, self.headers = name, base, headers


async def one(session: aiohttp.ClientSession, t: Target, body: bytes) -> float:
    start = time.perf_counter()
    async with session.post(t.base + "/v1/completions", data=body, headers=t.headers) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{t.name}: HTTP {resp.status}")
    return time.perf_counter() - start


async def latency_c1(targets: list[Target], n: int) -> dict[str, list[float]]:
    body = json.dumps({"model": MODEL, "prompt": "hello there", "max_tokens": 8, **EXTRA}).encode()
    results: dict[str, list[float]] = {t.name: [] for t in targets}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4)) as session:
        for t in targets:  # warm-up
            for _ in range(50):
                await one(session, t, body)
        # Interleave in small blocks so drift in machine load hits both sides alike.
        for _ in range(n // 20):
            for t in targets:
                for _ in range(20):
                    results[t.name].append(await one(session, t, body))
    return results


async def throughput(t: Target, concurrency: int, seconds: float) -> float:
    body = json.dumps({"model": MODEL, "prompt": "hello there", "max_tokens": 8, **EXTRA}).encode()
    done = 0
    stop_at = time.perf_counter() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await one(session, t, body)
            done += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return done / (time.perf_counter() - start)


async def stream_one(session: aiohttp.ClientSession, t: Target, body: bytes) -> tuple[int, float, float]:
    """(content chunks, time to last token, time to first token) of one streamed request."""
    start = time.perf_counter()
    first = 0.0
    chunks = 0
    done = False
    async with session.post(t.base + "/v1/completions", data=body, headers=t.headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{t.name}: HTTP {resp.status}")
        async for line in resp.content:
            if line.startswith(b"data: {"):
                if not chunks:
                    first = time.perf_counter() - start
                chunks += 1
            elif line.startswith(b"data: [DONE]"):
                done = True
    if EXTRA and not done:  # a real runtime: complete means it ended with [DONE]
        raise RuntimeError(f"{t.name}: stream ended without [DONE]")
    return chunks, time.perf_counter() - start, first


async def stream_rate(t: Target, concurrency: int, seconds: float, tokens: int) -> float:
    body = json.dumps({"model": MODEL, "prompt": "go", "max_tokens": tokens, "stream": True, **EXTRA}).encode()
    total = 0
    stop_at = time.perf_counter() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal total
        while time.perf_counter() < stop_at:
            chunks, _, _ = await stream_one(session, t, body)
            total += chunks

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return total / (time.perf_counter() - start)


async def paced_streams(t: Target, clients: int, tokens: int,
                        gw_pid: int | None) -> tuple[list[float], list[float], int, float]:
    body = json.dumps({"model": MODEL, "prompt": "go", "max_tokens": tokens, "stream": True, **EXTRA}).encode()
    errors = 0
    peak_rss = 0.0
    durations: list[float] = []
    firsts: list[float] = []
    timeout = aiohttp.ClientTimeout(total=120)

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        try:
            chunks, took, first = await stream_one(session, t, body)
            if chunks < tokens and not EXTRA:
                errors += 1
            durations.append(took)
            firsts.append(first)
        except Exception:
            errors += 1

    async def sample_rss() -> None:
        nonlocal peak_rss
        while gw_pid:
            peak_rss = max(peak_rss, rss_mb(gw_pid))
            await asyncio.sleep(0.2)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        sampler = asyncio.create_task(sample_rss())
        await asyncio.gather(*(client(session) for _ in range(clients)))
        sampler.cancel()
    return durations, firsts, errors, peak_rss


def start_sim(*args: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway.simulator", "--model", MODEL, "--host", "127.0.0.1",
                             "--port", str(port), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def start_gateway(runtime_url: str, keys: Path, prefix: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "LISTEN_HOST": "127.0.0.1", "LISTEN_PORT": str(port), "RUNTIME_BACKEND": "external",
           "RUNTIME_URL": runtime_url, "REALTIME_MODEL": MODEL, "AUTH_KEYS_FILE": str(keys), "REDIS_PREFIX": prefix,
           "LOG_LEVEL": "warning", "LOG_FORMAT": "json"}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter runs (smoke test of the script)")
    parser.add_argument("--paced-clients", type=int, default=0,
                        help="concurrent paced streams (default 500, 100 with --quick); fewer show the gateway on "
                        "a machine that is not saturated")
    parser.add_argument("--paced-tokens", type=int, default=100,
                        help="tokens per paced stream (default 100: two seconds at ~50 tokens/s)")
    parser.add_argument("--runtime-url", default="", help="an already running runtime to measure instead of "
                        "simulators (e.g. a real vLLM at http://127.0.0.1:8001)")
    parser.add_argument("--model", default="", help="the model the runtime at --runtime-url serves")
    args = parser.parse_args()
    if bool(args.runtime_url) != bool(args.model):
        parser.error("--runtime-url and --model go together")
    global MODEL
    if args.runtime_url:
        MODEL = args.model
        EXTRA["ignore_eos"] = True
    n_lat = 400 if args.quick else 2000
    secs = 3.0 if args.quick else 10.0
    paced_clients = args.paced_clients or (100 if args.quick else 500)

    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    tmp = Path(tempfile.mkdtemp())
    keys = tmp / "keys.json"
    keys.write_text(json.dumps({"keys": [{"id": "bench", "token": TOKEN, "scopes": ["realtime"]},
                                         {"id": "ops", "token": MONITOR, "scopes": ["monitor"]}]}))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if args.runtime_url:
            sim_url = args.runtime_url.rstrip("/")
        else:
            sim, sim_url = start_sim()
            procs.append(sim)
        await wait_up(sim_url + "/health")
        gw, gw_url = start_gateway(sim_url, keys, prefix)
        procs.append(gw)
        await wait_up(gw_url + "/ready")
        await asyncio.sleep(1)
        direct = Target("direct", sim_url, {"Content-Type": "application/json"})
        gateway = Target("gateway", gw_url, {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
        idle_rss = rss_mb(gw.pid)

        print(f"# realtime benchmark ({'quick' if args.quick else 'full'}), {os.cpu_count()} cores; "
              f"client, gateway and {'the runtime at ' + sim_url if args.runtime_url else 'simulator'} share them")
        lat = await latency_c1([direct, gateway], n_lat)
        d50, d99 = pct(lat["direct"], 0.5) * 1000, pct(lat["direct"], 0.99) * 1000
        g50, g99 = pct(lat["gateway"], 0.5) * 1000, pct(lat["gateway"], 0.99) * 1000
        print(f"latency c=1 non-stream ({n_lat} req each): direct p50 {d50:.3f} ms p99 {d99:.3f} ms | "
              f"gateway p50 {g50:.3f} ms p99 {g99:.3f} ms")
        print(f"  added latency: p50 {g50 - d50:.3f} ms (target <= 0.5), p99 {g99 - d99:.3f} ms (target <= 2)")

        d_rps = await throughput(direct, 32, secs)
        g_rps = await throughput(gateway, 32, secs)
        print(f"throughput c=32: direct {d_rps:.0f} req/s, gateway {g_rps:.0f} req/s, "
              f"ratio {g_rps / d_rps:.1%} (target >= 40%)")

        d_cps = await stream_rate(direct, 8, secs, 200)
        g_cps = await stream_rate(gateway, 8, secs, 200)
        print(f"unpaced streaming c=8, 200 tokens: direct {d_cps:.0f} chunks/s, gateway {g_cps:.0f} chunks/s, "
              f"ratio {g_cps / d_cps:.1%} (target >= 40%)")

        # Paced streams: a simulator emitting ~50 tokens/s per stream (a real runtime paces itself).
        if args.runtime_url:
            paced_url, gw2, gw2_url = sim_url, gw, gw_url
        else:
            paced, paced_url = start_sim("--sim-itl", "0.02")
            procs.append(paced)
            await wait_up(paced_url + "/health")
            gw2, gw2_url = start_gateway(paced_url, keys, prefix)
            procs.append(gw2)
            await wait_up(gw2_url + "/ready")
        tokens = args.paced_tokens
        d_dur, d_first, d_err, _ = await paced_streams(Target("direct", paced_url, direct.headers), paced_clients,
                                                       tokens, None)
        g_dur, g_first, g_err, peak = await paced_streams(Target("gateway", gw2_url, gateway.headers),
                                                          paced_clients, tokens, gw2.pid)
        dm, gm = statistics.mean(d_dur or [0]), statistics.mean(g_dur or [0])
        pacing = "as the runtime generates" if args.runtime_url else "at ~50 tok/s"
        print(f"{paced_clients} paced streams ({tokens} tokens {pacing}): errors direct {d_err}, gateway {g_err}; "
              f"time to last token mean direct {dm:.3f} s, gateway {gm:.3f} s, "
              f"ratio {gm / dm:.3f} (target <= 1.05); p99 direct {pct(d_dur, 0.99):.3f} s, "
              f"gateway {pct(g_dur, 0.99):.3f} s")
        df, gf = statistics.mean(d_first or [0]), statistics.mean(g_first or [0])
        print(f"  of which time to first token (all {paced_clients} clients connect at once): mean direct "
              f"{df * 1000:.0f} ms, gateway {gf * 1000:.0f} ms; first-to-last token: direct {dm - df:.3f} s, "
              f"gateway {gm - gf:.3f} s, ratio {(gm - gf) / max(dm - df, 1e-9):.3f}")
        print(f"gateway RSS: idle {idle_rss:.1f} MB, peak during {paced_clients} streams {peak:.1f} MB, "
              f"after {rss_mb(gw2.pid):.1f} MB")
    finally:
        stop_processes(procs)
        delete_prefix(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), prefix)

if __name__ == "__main__":
    asyncio.run(main())
