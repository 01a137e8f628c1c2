"""`llm-gateway nodes`: the fleet's node registry, read through the fleet store (as GET /monitor/nodes)."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.commands.common import RunAsync, print_json, redis_client, table
from gateway.fleet.store import FleetStore, fleet_view
from gateway.redis_keys import RedisKeys
from gateway.settings import load_settings


def _row(node: dict[str, Any], slots: dict[str, str]) -> list[str]:
    runtime = node.get("runtime") or {}
    models = node.get("models") or {}
    batch = node.get("batch") or {}
    realtime = node.get("realtime") or {}
    state = str(runtime.get("state") or "-")
    loaded = ",".join(models.get("loaded") or []) or "-"
    sleeping = ",".join(models.get("sleeping") or []) or "-"
    return [str(node.get("node_id")), str(node.get("address") or "-"), state, loaded, sleeping,
            str(realtime.get("in_flight", 0)), str(batch.get("in_flight", 0)),
            slots.get(str(node.get("node_id")), "-"), str(node.get("version") or "-"),
            f"{node.get('heartbeat_age_seconds', 0):g}s"]


async def nodes(args: argparse.Namespace) -> int:
    """Print every live node: runtime state, models, realtime and batch load, swap slot, version."""
    settings = load_settings()
    async with redis_client(settings) as redis:
        view = await fleet_view(FleetStore(redis, RedisKeys(settings.redis_prefix)))
    if args.json:
        print_json(view)
        return 0
    table([_row(n, view["swap_slots"]) for n in view["data"]],
          ["NODE", "ADDRESS", "RUNTIME", "LOADED", "SLEEPING", "REALTIME", "BATCH", "SWAP_SLOT", "VERSION",
           "HEARTBEAT"])
    return 0


def add_parser(sub: Any, run_async: RunAsync) -> None:
    """Add `nodes`."""
    parser = sub.add_parser("nodes", help="the fleet's node registry (every gateway on this Redis)")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=run_async(nodes))
