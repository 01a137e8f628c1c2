"""Redis round trips and time per batch job through the queue, against main's queue in the same run.

Drives N jobs through enqueue -> claim (16 at a time) -> mark-sent -> finish, with the current
`gateway/batch/queue.py` and with the one on git's `main` branch (loaded from `git show`), on the Redis
at REDIS_URL under a throwaway prefix (deleted afterwards). A round trip is one command or one
pipeline sent. Prints both and their ratio. No runtime, no HTTP: only the queue's Redis work.

    python scripts/bench_queue_redis.py [--jobs 2000] [--baseline-ref main]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis.asyncio as aredis
from redis.asyncio.client import Pipeline

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import delete_prefix  # noqa: E402

from gateway.batch.jobs import Endpoint, Submission  # noqa: E402
from gateway.redis_keys import RedisKeys  # noqa: E402
from gateway.settings import Settings  # noqa: E402

MODEL = "bench/queue-model"


class Counter:
    """Counts round trips: single commands on the client, and pipeline executions."""

    def __init__(self, client: aredis.Redis) -> None:
        self.trips = 0
        original = client.execute_command

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.trips += 1
            return await original(*args, **kwargs)

        client.execute_command = counted  # type: ignore[method-assign]
        self._pipeline_execute = Pipeline.execute
        counter = self

        async def pipeline_execute(pipe: Pipeline, raise_on_error: bool = True) -> Any:
            counter.trips += 1
            return await counter._pipeline_execute(pipe, raise_on_error)

        Pipeline.execute = pipeline_execute  # type: ignore[method-assign,assignment]

    def restore(self) -> None:
        Pipeline.execute = self._pipeline_execute  # type: ignore[method-assign]


def load_queue_module(ref: str) -> Any:
    """gateway/batch/queue.py as it is on `ref`, imported under another name."""
    source = subprocess.run(["git", "show", f"{ref}:gateway/batch/queue.py"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "queue_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("queue_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


async def drive(queue_cls: Any, redis_url: str, jobs: int, slots: int) -> tuple[float, float]:
    """(round trips per job, seconds per job) for `jobs` jobs through one queue class."""
    prefix = f"bench-queue:{uuid.uuid4().hex[:8]}:"
    settings = Settings(_env_file=None, redis_url=redis_url, redis_prefix=prefix)  # type: ignore[call-arg]
    client = aredis.Redis.from_url(redis_url)
    queue = queue_cls(client, RedisKeys(prefix), settings)
    body = b'{"model": "%s", "prompt": "x", "max_tokens": 1}' % MODEL.encode()
    counter = Counter(client)
    try:
        started = time.perf_counter()
        for _ in range(jobs):
            await queue.enqueue("bench-key", Submission(Endpoint.COMPLETIONS, MODEL, 0, {}, body))
        done = 0
        while done < jobs:
            held = await queue.claim(MODEL, slots, "bench-owner")
            if not held:
                break

            async def run(job: Any) -> None:
                if hasattr(queue, "mark_sent"):
                    await queue.mark_sent(job)
                await queue.finish(job, {"status": "completed", "response": b'{"ok": true}'}, "completed")

            await asyncio.gather(*(run(job) for job in held))
            done += len(held)
        elapsed = time.perf_counter() - started
        return counter.trips / jobs, elapsed / jobs
    finally:
        counter.restore()
        await client.aclose()
        delete_prefix(redis_url, prefix)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--baseline-ref", default="main")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    from gateway.batch.queue import JobQueue

    baseline = load_queue_module(args.baseline_ref).JobQueue
    print(f"--- {args.jobs} jobs, claimed {args.slots} at a time, Redis {args.redis_url}")
    base_trips, base_s = await drive(baseline, args.redis_url, args.jobs, args.slots)
    trips, seconds = await drive(JobQueue, args.redis_url, args.jobs, args.slots)
    print(f"{args.baseline_ref}: {base_trips:.2f} round trips per job, {base_s * 1000:.3f} ms per job")
    print(f"this tree: {trips:.2f} round trips per job, {seconds * 1000:.3f} ms per job")
    print(f"ratio (this / {args.baseline_ref}): round trips {trips / base_trips:.2f}, time {seconds / base_s:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
