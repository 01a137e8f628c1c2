#!/usr/bin/env python3
"""Uploads and OpenAI batches benchmark: a gateway subprocess on the simulator at zero latency.

Prints
- TUS upload throughput (POST + PATCH chunks, each chunk fsynced by the gateway) in MB/s, against
  writing the same bytes in the same chunks to local disk (write + fsync per chunk) in the same run;
- a 10,000-line chat batch through the OpenAI Batches API (upload, create, poll until completed):
  lines per second from create to completed, and the gateway's peak RSS while it runs (sampled from
  /proc/<pid>/status VmRSS) next to its RSS before.

    .venv/bin/python scripts/bench_uploads.py [--quick] [--upload-mib 256] [--lines 10000]

Needs Redis at REDIS_URL (default redis://127.0.0.1:6379/0); uses its own key prefix and removes it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import orjson
from benchlib import delete_prefix, free_port, rss_mb, stop_processes, wait_up

ROOT = Path(__file__).resolve().parent.parent
MODEL = "bench/model"
TOKEN = "bench-token-batch-upload-0001"
MiB = 1024 * 1024


def start_sim() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway.simulator", "--model", MODEL, "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def start_gateway(runtime_url: str, keys: Path, prefix: str, upload_dir: Path,
                  concurrency: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "LISTEN_HOST": "127.0.0.1", "LISTEN_PORT": str(port), "RUNTIME_BACKEND": "external",
           "RUNTIME_URL": runtime_url, "REALTIME_MODEL": MODEL, "AUTH_KEYS_FILE": str(keys), "REDIS_PREFIX": prefix,
           "UPLOAD_DIR": str(upload_dir), "MAX_CONCURRENT_BATCH": str(concurrency), "LOG_LEVEL": "warning",
           "LOG_FORMAT": "json"}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def disk_baseline(directory: Path, data: bytes, chunk: int) -> float:
    """MB/s of writing `data` to a file in `chunk`-sized writes, each followed by an fsync (as the gateway does)."""
    path = directory / "baseline.bin"
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        for start in range(0, len(data), chunk):
            piece = view[start:start + chunk]
            while piece:
                piece = piece[os.write(fd, piece):]
            os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - started
    path.unlink()
    return len(data) / MiB / elapsed


async def tus_upload(base: str, data: bytes, chunk: int) -> float:
    """MB/s of a TUS upload of `data` in `chunk`-sized PATCH requests."""
    headers = {"Authorization": f"Bearer {TOKEN}", "Tus-Resumable": "1.0.0"}
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        async with session.post(f"{base}/v1/upload/", headers={**headers, "Upload-Length": str(len(data))}) as resp:
            assert resp.status == 201, await resp.text()
            location = resp.headers["Location"]
        view = memoryview(data)
        offset = 0
        while offset < len(data):
            piece = bytes(view[offset:offset + chunk])
            patch_headers = {**headers, "Upload-Offset": str(offset),
                             "Content-Type": "application/offset+octet-stream"}
            async with session.patch(f"{base}{location}", data=piece, headers=patch_headers) as resp:
                assert resp.status == 204, await resp.text()
                offset = int(resp.headers["Upload-Offset"])
        elapsed = time.perf_counter() - started
        async with session.delete(f"{base}{location}", headers=headers) as resp:
            assert resp.status == 204
    return len(data) / MiB / elapsed


def batch_input(lines: int) -> bytes:
    return b"".join(orjson.dumps({
        "custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": f"Question number {i}?"}],
                 "max_tokens": 16}}) + b"\n" for i in range(lines))


async def run_batch(base: str, pid: int, lines: int) -> tuple[float, float, float, dict[str, int], float]:
    """(seconds create->completed, seconds to in_progress, peak RSS MB, request_counts, upload seconds)."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    data = batch_input(lines)
    peak = rss_mb(pid)
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_mb(pid))
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    try:
        async with aiohttp.ClientSession() as session:
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", data, filename="bench.jsonl", content_type="application/jsonl")
            t0 = time.perf_counter()
            async with session.post(f"{base}/v1/files", data=form, headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                file_id = (await resp.json())["id"]
            uploaded = time.perf_counter() - t0
            started = time.perf_counter()
            async with session.post(f"{base}/v1/batches", json={
                    "input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
                    headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                batch_id = (await resp.json())["id"]
            to_progress = 0.0
            while True:
                async with session.get(f"{base}/v1/batches/{batch_id}", headers=headers) as resp:
                    batch = await resp.json()
                if not to_progress and batch["status"] != "validating":
                    to_progress = time.perf_counter() - started
                if batch["status"] in ("completed", "failed", "cancelled", "expired"):
                    break
                await asyncio.sleep(0.2)
            elapsed = time.perf_counter() - started
            assert batch["status"] == "completed", batch
            async with session.get(f"{base}/v1/files/{batch['output_file_id']}/content", headers=headers) as resp:
                out = await resp.read()
            assert out.count(b"\n") == lines, "output file is missing lines"
    finally:
        done.set()
        await sampler
    return elapsed, to_progress, peak, batch["request_counts"], uploaded


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke test of the script)")
    parser.add_argument("--upload-mib", type=int, default=None, help="TUS upload size (default 256, quick 32)")
    parser.add_argument("--chunk-mib", type=int, default=8, help="TUS PATCH size")
    parser.add_argument("--lines", type=int, default=None, help="batch lines (default 10000, quick 1000)")
    parser.add_argument("--concurrency", type=int, default=8, help="MAX_CONCURRENT_BATCH of the gateway")
    parser.add_argument("--rounds", type=int, default=3, help="upload rounds (TUS and disk, interleaved)")
    args = parser.parse_args()
    upload_mib = args.upload_mib or (32 if args.quick else 256)
    lines = args.lines or (1000 if args.quick else 10_000)
    chunk = args.chunk_mib * MiB

    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    tmp = Path(tempfile.mkdtemp(dir=ROOT / "var" if (ROOT / "var").is_dir() else None))
    upload_dir = tmp / "uploads"
    keys = tmp / "keys.json"
    keys.write_text(json.dumps({"keys": [{"id": "bench", "token": TOKEN, "scopes": ["upload", "batch"]}]}))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        sim, sim_url = start_sim()
        procs.append(sim)
        await wait_up(sim_url + "/health")
        gw, gw_url = start_gateway(sim_url, keys, prefix, upload_dir, args.concurrency)
        procs.append(gw)
        await wait_up(gw_url + "/ready")
        print(f"# uploads and batches benchmark ({'quick' if args.quick else 'full'}), {os.cpu_count()} cores "
              f"shared by client, gateway and simulator; upload dir {upload_dir}")

        data = os.urandom(upload_mib * MiB)
        upload_dir.mkdir(parents=True, exist_ok=True)
        # Interleaved rounds, medians: the shared disk's speed drifts a lot from one second to the next.
        disks: list[float] = []
        tuses: list[float] = []
        for _ in range(args.rounds):
            disks.append(disk_baseline(upload_dir, data, chunk))
            tuses.append(await tus_upload(gw_url, data, chunk))
        disk, tus = statistics.median(disks), statistics.median(tuses)
        print(f"TUS upload {upload_mib} MiB in {args.chunk_mib} MiB PATCHes: {tus:.0f} MB/s; local disk, same chunks "
              f"+ fsync: {disk:.0f} MB/s; ratio {tus / disk:.1%} (medians of {args.rounds} interleaved rounds; "
              f"TUS {', '.join(f'{x:.0f}' for x in tuses)}; disk {', '.join(f'{x:.0f}' for x in disks)})")
        del data

        idle = rss_mb(gw.pid)
        elapsed, to_progress, peak, counts, uploaded = await run_batch(gw_url, gw.pid, lines)
        print(f"batch of {lines} lines (simulator at zero latency, MAX_CONCURRENT_BATCH={args.concurrency}): "
              f"{lines / elapsed:.0f} lines/s ({elapsed:.1f} s from create to completed; validated and "
              f"in_progress after {to_progress:.2f} s; file upload {uploaded:.2f} s); request_counts {counts}")
        print(f"gateway RSS: before the batch {idle:.1f} MB, peak during it {peak:.1f} MB, after "
              f"{rss_mb(gw.pid):.1f} MB")
    finally:
        stop_processes(procs)
        shutil.rmtree(tmp, ignore_errors=True)
        delete_prefix(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), prefix)

if __name__ == "__main__":
    asyncio.run(main())
