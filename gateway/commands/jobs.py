"""`llm-gateway jobs`: list, show, cancel and requeue batch jobs, through the job queue's own store."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson
from redis.asyncio import Redis

from gateway.batch.queue import JobQueue
from gateway.commands.common import CliError, RunAsync, print_json, redis_client, table, when
from gateway.redis_client import keys_for
from gateway.settings import Settings, load_settings


def _queue(redis: Redis, settings: Settings) -> JobQueue:
    return JobQueue(redis, keys_for(settings), settings)


async def jobs_list(args: argparse.Namespace) -> int:
    """Jobs of every key (or one), newest first."""
    settings = load_settings()
    async with redis_client(settings) as redis:
        page = await _queue(redis, settings).list(args.key or None, limit=args.limit, status=args.status,
                                                  model=args.model)
    jobs = page.jobs
    if args.json:
        print_json(jobs)
        return 0
    table([[j.get("id", ""), j.get("key_id", ""), j.get("status", ""), j.get("model", ""),
             j.get("priority", "0"), f"{j.get('attempt', '0')}/{j.get('max_attempts', '?')}",
             when(j.get("created_at")), (j.get("error") or "")[:60]] for j in jobs],
           ["ID", "KEY", "STATUS", "MODEL", "PRI", "ATTEMPT", "CREATED (UTC)", "ERROR"])
    return 0


async def jobs_show(args: argparse.Namespace) -> int:
    """One job as the API shows it (plus the key id, and the request body with --request)."""
    from gateway.batch.jobs import job_view

    settings = load_settings()
    async with redis_client(settings) as redis:
        queue = _queue(redis, settings)
        job = await queue.get(args.job_id)
        reason = await queue.explain(job) if job is not None else None
    if job is None:
        raise CliError(f"no job {args.job_id!r} (wrong id, REDIS_PREFIX, or expired after BATCH_JOB_TTL_SECONDS)")
    view = job_view(job, waiting_reason=reason)
    view["key_id"] = job.get("key_id")
    view["owner"] = job.get("owner") or None
    view["requeue_reason"] = job.get("requeue_reason") or None
    if args.request:
        view["request"] = orjson.loads(job["request"]) if job.get("request") else None
    print_json(view)
    return 0


async def jobs_cancel(args: argparse.Namespace) -> int:
    """Cancel queued or running jobs (a running one is stopped by whichever gateway holds it)."""
    settings = load_settings()
    failures = 0
    async with redis_client(settings) as redis:
        queue = _queue(redis, settings)
        for job_id in args.job_ids:
            job = await queue.get(job_id)
            if job is None:
                print(f"{job_id}: no such job", file=sys.stderr)
                failures += 1
                continue
            outcome, _ = await queue.cancel(job_id, job.get("key_id", ""))
            if outcome == "cancelled":
                print(f"{job_id}: cancelled")
            else:
                print(f"{job_id}: not cancelled, it is {outcome.removeprefix('already:')}", file=sys.stderr)
                failures += 1
    return 1 if failures else 0


async def jobs_requeue(args: argparse.Namespace) -> int:
    """Put failed jobs back in the queue with fresh attempts."""
    settings = load_settings()
    failures = 0
    async with redis_client(settings) as redis:
        queue = _queue(redis, settings)
        job_ids = list(args.job_ids)
        if args.all_failed:
            after: str | None = None
            while True:
                page = await queue.list(args.key or None, limit=500, after=after, status="failed",
                                        model=args.model)
                job_ids.extend(j["id"] for j in page.jobs)
                if page.next_cursor is None:
                    break
                after = page.next_cursor
        if not job_ids:
            raise CliError("name job ids, or use --all-failed")
        for job_id in job_ids:
            outcome = await queue.requeue_failed(job_id, "operator")
            if outcome == "requeued":
                print(f"{job_id}: requeued")
            elif outcome == "missing":
                print(f"{job_id}: no such job", file=sys.stderr)
                failures += 1
            else:
                print(f"{job_id}: not requeued, it is {outcome} (only failed jobs are)", file=sys.stderr)
                failures += 1
    return 1 if failures else 0




def add_parser(sub: Any, run_async: RunAsync) -> None:
    """Add `jobs list|show|cancel|requeue`."""
    jobs = sub.add_parser("jobs", help="batch jobs in Redis: list, show, cancel, requeue")
    jobs_sub = jobs.add_subparsers(dest="jobs_command")
    jl = jobs_sub.add_parser("list", help="jobs of all keys, newest first")
    jl.add_argument("--key", help="only this key id")
    jl.add_argument("--status", choices=["queued", "running", "completed", "failed", "cancelled"])
    jl.add_argument("--model")
    jl.add_argument("--limit", type=int, default=50)
    jl.add_argument("--json", action="store_true")
    jl.set_defaults(func=run_async(jobs_list))
    js = jobs_sub.add_parser("show", help="one job as JSON")
    js.add_argument("job_id")
    js.add_argument("--request", action="store_true", help="include the request body")
    js.set_defaults(func=run_async(jobs_show))
    jc = jobs_sub.add_parser("cancel", help="cancel queued or running jobs")
    jc.add_argument("job_ids", nargs="+")
    jc.set_defaults(func=run_async(jobs_cancel))
    jr = jobs_sub.add_parser("requeue", help="put failed jobs back in the queue with fresh attempts")
    jr.add_argument("job_ids", nargs="*")
    jr.add_argument("--all-failed", action="store_true", help="every failed job (of --key / --model)")
    jr.add_argument("--key")
    jr.add_argument("--model")
    jr.set_defaults(func=run_async(jobs_requeue))
