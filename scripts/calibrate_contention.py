#!/usr/bin/env python3
"""Measure how TTFT and ITL grow with concurrency on a runtime (real vLLM or the simulator).

For each concurrency C, C closed-loop clients stream completions (a prompt of --prompt-tokens token ids,
--output-tokens tokens with ignore_eos) for --seconds; the script prints TTFT and ITL (p50, p90) and their
ratios against C=1, the shape the simulator's contention model is calibrated to.

    python scripts/calibrate_contention.py --target http://127.0.0.1:8000 --model NAME
    python scripts/calibrate_contention.py --start-vllm            # tiny-llama-a on the CPU (short!)
    python scripts/calibrate_contention.py --start-simulator cpu-tiny
    python scripts/calibrate_contention.py --start-vllm --start-simulator cpu-tiny   # side by side

Starting vLLM needs the venv and models of `make test-vllm`. Keep runs short: the CPU is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import free_port, pct, stop_processes, wait_up

ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(os.environ.get("LLM_GATEWAY_CACHE_DIR", "/var/cache/llm-gateway"))
VLLM_VENV = Path(os.environ.get("VLLM_VENV", str(CACHE_DIR / "vllm-venv")))
TINY_MODEL = str(CACHE_DIR / "models" / "tiny-llama-a")
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_LOGGING_LEVEL": "WARNING"}


@dataclass
class Point:
    """What one concurrency level measured."""

    concurrency: int
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, float]:
        """p50/p90 TTFT and ITL in ms, and output tokens/s."""
        return {"ttft_p50_ms": pct(self.ttft, 0.5) * 1e3, "ttft_p90_ms": pct(self.ttft, 0.9) * 1e3,
                "itl_p50_ms": pct(self.itl, 0.5) * 1e3, "itl_p90_ms": pct(self.itl, 0.9) * 1e3,
                "tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0,
                "requests": float(len(self.ttft))}


async def one_stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any], point: Point) -> None:
    """Send one streaming completion and record its TTFT and the gaps between its tokens."""
    started = time.monotonic()
    last: float | None = None
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {(await response.text())[:200]}")
        buffer = b""
        async for data in response.content.iter_any():
            now = time.monotonic()
            buffer += data
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if not event.startswith(b"data: {"):
                    continue
                chunk = json.loads(event[6:])
                if not chunk.get("choices"):
                    continue
                if last is None:
                    point.ttft.append(now - started)
                else:
                    point.itl.append(now - last)
                last = now
                point.tokens += 1


async def measure(target: str, model: str, concurrency: int, seconds: float, prompt_tokens: int,
                  output_tokens: int) -> Point:
    """C closed-loop clients for `seconds` (each finishes the request it has started)."""
    point = Point(concurrency)
    url = f"{target}/v1/completions"
    deadline = time.monotonic() + seconds

    async def client(index: int) -> None:
        number = 0
        while time.monotonic() < deadline:
            number += 1
            # Distinct prompts, so that no prefix cache makes later requests cheaper.
            prompt = [10 + (index * 7919 + number * 104729 + i) % 1500 for i in range(prompt_tokens)]
            body = {"model": model, "prompt": prompt, "max_tokens": output_tokens, "stream": True,
                    "ignore_eos": True, "temperature": 0}
            await one_stream(session, url, body, point)

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        # One warm-up request outside the figures.
        await one_stream(session, url, {"model": model, "prompt": [11] * prompt_tokens, "max_tokens": 4,
                                        "stream": True, "ignore_eos": True}, Point(0))
        started = time.monotonic()
        await asyncio.gather(*(client(i) for i in range(concurrency)))
        point.seconds = time.monotonic() - started
    return point


def start_vllm(model: str, max_num_seqs: int | None) -> tuple[subprocess.Popen[bytes], str]:
    """vLLM's OpenAI server on the CPU with the tiny model, as tests_vllm starts it."""
    port = free_port()
    args = [str(VLLM_VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "1024", "--dtype", "float32",
            "--enforce-eager"]
    if max_num_seqs:
        args += ["--max-num-seqs", str(max_num_seqs)]
    log = open(f"/tmp/calibrate-vllm-{port}.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, **VLLM_ENV})
    return proc, f"http://127.0.0.1:{port}"


def start_simulator(profile: str, extra: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    """The simulator with the contention model on."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway.simulator", "--model", "sim", "--host", "127.0.0.1",
                             "--port", str(port), "--sim-profile", profile, *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=ROOT)
    return proc, f"http://127.0.0.1:{port}"


async def sweep(name: str, target: str, model: str, args: argparse.Namespace) -> list[Point]:
    """Every concurrency level, one after the other."""
    points = []
    for concurrency in args.concurrency:
        point = await measure(target, model, concurrency, args.seconds, args.prompt_tokens, args.output_tokens)
        s = point.summary()
        print(f"  {name} C={concurrency}: TTFT p50 {s['ttft_p50_ms']:.1f} ms, ITL p50 {s['itl_p50_ms']:.2f} ms, "
              f"{s['tokens_per_s']:.0f} tok/s ({int(s['requests'])} requests)", flush=True)
        points.append(point)
    return points


def table(results: dict[str, list[Point]]) -> str:
    """Markdown: per concurrency, each target's TTFT/ITL p50 and their ratio against C=1."""
    names = list(results)
    head = "| C | " + " | ".join(f"{n} TTFT p50 | ratio | {n} ITL p50 | ratio | {n} tok/s" for n in names) + " |"
    rule = "|---" * (1 + 5 * len(names)) + "|"
    rows = [head, rule]
    for i, point in enumerate(results[names[0]]):
        cells = [str(point.concurrency)]
        for n in names:
            base, s = results[n][0].summary(), results[n][i].summary()
            cells += [f"{s['ttft_p50_ms']:.1f} ms", f"{s['ttft_p50_ms'] / max(base['ttft_p50_ms'], 1e-9):.2f}x",
                      f"{s['itl_p50_ms']:.2f} ms", f"{s['itl_p50_ms'] / max(base['itl_p50_ms'], 1e-9):.2f}x",
                      f"{s['tokens_per_s']:.0f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


async def main_async(args: argparse.Namespace) -> int:
    procs: list[subprocess.Popen[bytes]] = []
    results: dict[str, list[Point]] = {}
    try:
        targets: list[tuple[str, str, str, subprocess.Popen[bytes] | None]] = []
        if args.target:
            targets.append(("target", args.target, args.model, None))
        if args.start_vllm:
            proc, url = start_vllm(args.vllm_model, args.max_num_seqs)
            procs.append(proc)
            targets.append(("vllm", url, args.vllm_model, proc))
        if args.start_simulator:
            extra = ["--max-num-seqs", str(args.max_num_seqs)] if args.max_num_seqs else []
            proc, url = start_simulator(args.start_simulator, extra)
            procs.append(proc)
            targets.append((f"sim:{args.start_simulator}", url, "sim", proc))
        if not targets:
            print("nothing to measure: give --target, --start-vllm or --start-simulator", file=sys.stderr)
            return 2
        for name, url, model, proc in targets:
            print(f"{name}: waiting for {url}", flush=True)
            await wait_up(url + "/health", timeout=args.start_timeout)
            results[name] = await sweep(name, url, model, args)
            if proc is not None:  # one runtime at a time: the CPU is shared
                stop_processes([proc])
        print()
        print(f"prompt {args.prompt_tokens} tokens, output {args.output_tokens} tokens, "
              f"{args.seconds:g} s per level, closed loop")
        print(table(results))
        if args.json:
            Path(args.json).write_text(json.dumps(
                {name: [{"concurrency": p.concurrency, **p.summary()} for p in points]
                 for name, points in results.items()}, indent=2))
    finally:
        stop_processes([p for p in procs if p.poll() is None])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="base URL of a running runtime")
    parser.add_argument("--model", default="sim", help="model name at --target")
    parser.add_argument("--start-vllm", action="store_true", help="start vLLM (CPU) with the tiny model")
    parser.add_argument("--vllm-model", default=TINY_MODEL)
    parser.add_argument("--start-simulator", metavar="PROFILE", help="start the simulator with this profile")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="passed to what is started")
    parser.add_argument("--concurrency", type=lambda t: [int(x) for x in t.split(",")], default=[1, 2, 4, 8, 16])
    parser.add_argument("--seconds", type=float, default=6.0, help="per concurrency level")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("--json", help="write the figures to this file")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
