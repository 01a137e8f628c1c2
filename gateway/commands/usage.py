"""`llm-gateway usage`: per-key usage, read through the usage store."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.commands.common import RunAsync, print_json, redis_client, table, when
from gateway.redis_client import keys_for
from gateway.settings import load_settings
from gateway.usage_store import FIELDS, UsageStore, utc_days


def _day(raw: str) -> str:
    if raw == "today":
        return datetime.now(UTC).strftime("%Y%m%d")
    if raw == "yesterday":
        return (datetime.now(UTC) - timedelta(days=1)).strftime("%Y%m%d")
    if len(raw) != 8 or not raw.isdigit():
        raise argparse.ArgumentTypeError("use YYYYMMDD, today or yesterday")
    return raw


async def usage_top(args: argparse.Namespace) -> int:
    """The busiest keys, all-time or on one UTC day."""
    settings = load_settings()
    async with redis_client(settings) as redis:
        rows = await UsageStore(redis, keys_for(settings)).top(limit=args.limit, bucket=args.day)
    if args.json:
        print_json(rows)
        return 0
    table([[str(r[name]) for name in ("key_id", *FIELDS)] + [when(r.get("last_used_at"))]  # type: ignore[arg-type]
           for r in rows], ["KEY", "REQUESTS", "OK", "ERRORS", "PROMPT_TOKENS", "COMPLETION_TOKENS", "LAST_USED (UTC)"])
    return 0


async def usage_days(args: argparse.Namespace) -> int:
    """Usage per UTC day over the last N days, for one key or summed over all keys."""
    settings = load_settings()
    days = list(reversed(utc_days(args.days)))  # newest first
    async with redis_client(settings) as redis:
        totals = await UsageStore(redis, keys_for(settings)).day_totals(days, args.key or None)
    rows = [{"day": day, "key_id": args.key, **totals[day]} for day in days]
    if args.json:
        print_json(rows)
        return 0
    table([[str(r[name]) for name in ("day", *FIELDS)] for r in rows],
          ["DAY (UTC)", "REQUESTS", "OK", "ERRORS", "PROMPT_TOKENS", "COMPLETION_TOKENS"])
    return 0


def add_parser(sub: Any, run_async: RunAsync) -> None:
    """Add `usage top|days`."""
    usage = sub.add_parser("usage", help="per-key usage from Redis")
    usage_sub = usage.add_subparsers(dest="usage_command")
    ut = usage_sub.add_parser("top", help="busiest keys (all-time, or one UTC day with --day)")
    ut.add_argument("--day", type=_day, help="YYYYMMDD, today or yesterday")
    ut.add_argument("--limit", type=int, default=20)
    ut.add_argument("--json", action="store_true")
    ut.set_defaults(func=run_async(usage_top))
    ud = usage_sub.add_parser("days", help="usage per UTC day (one key, or all keys summed)")
    ud.add_argument("--key")
    ud.add_argument("--days", type=int, default=30)
    ud.add_argument("--json", action="store_true")
    ud.set_defaults(func=run_async(usage_days))
